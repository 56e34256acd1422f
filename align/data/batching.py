"""Batches for causal-LM training: right padding, or packing several examples into one row.

Padding is masked by the attention mask and by labels built from lengths, never by comparing
token ids with pad_token_id (SmolLM2 has pad == eos, and the eos it must learn would vanish).

Preference pairs come in two layouts: PairCollator's 2B padded rows (chosen, then rejected), or
SharedPromptCollator's B rows of [prompt, chosen, rejected] with a 4D mask that keeps the answers
apart, so the prompt's tokens run through the model once instead of twice.

Packed rows carry position ids that restart at 0 for each example and no attention mask;
transformers then builds a block-diagonal causal mask from the position ids, so no token
attends across examples, and each example sees the same positions as unpacked. It does so only
when no KV cache is in play, so packed batches also carry use_cache=False (a model left with
use_cache=True would otherwise attend across examples without a word).
"""

from __future__ import annotations

import torch

from align.data.templating import Encoded
from align.tokens import IGNORE_INDEX


class PaddingCollator:
    """List of Encoded-like dicts -> right-padded tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator:
    """Packed rows (already concatenated) -> tensors with per-example position ids, no attention mask, no cache.

    Rows shorter than the longest in the batch are filled with a padding "example" whose labels
    are ignored and whose positions restart at 0, so it never shares attention with real tokens.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            position_ids[row, :n] = torch.tensor(feature["position_ids"])
            position_ids[row, n:] = torch.arange(longest - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def pack(examples: list[Encoded], max_length: int) -> list[dict]:
    """First-fit-decreasing packing into rows of at most max_length tokens.

    The first label of each example is ignored: with shifted labels it would be the target of
    the previous example's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(max_length - size)
    rows = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for index in sorted(members):  # keep data order inside a row
            example = examples[index]
            row["input_ids"] += example.input_ids
            row["labels"] += [IGNORE_INDEX] + example.labels[1:]
            row["position_ids"] += list(range(len(example.input_ids)))
        rows.append(row)
    return rows


def as_rows(examples: list[Encoded]) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


class PairCollator:
    """Preference pairs -> one batch of 2B rows: the B chosen sequences, then the B rejected ones
    (one forward for both). Labels are -100 on prompt and padding; reference logprobs, when
    precomputed, ride along as ``ref_logps`` [2B] in the same order.

    ``sides`` names the two answers of a row (KTO's are its completion and its mismatched KL
    answer); a row's boolean ``label`` (KTO: desirable) rides along as ``label`` [B]."""

    def __init__(self, pad_token_id: int, sides: tuple[str, str] = ("chosen", "rejected")):
        self.padding = PaddingCollator(pad_token_id)
        self.sides = sides

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for side in self.sides:
            for f in features:
                completion = f[f"{side}_ids"]
                rows.append(
                    {
                        "input_ids": f["prompt_ids"] + completion,
                        "labels": [IGNORE_INDEX] * len(f["prompt_ids"]) + completion,
                    }
                )
        batch = self.padding(rows)
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        if "label" in features[0]:
            batch["label"] = torch.tensor([f["label"] for f in features], dtype=torch.bool)
        first, second = self.sides
        if f"ref_{first}" in features[0]:
            batch["ref_logps"] = torch.tensor(
                [f[f"ref_{first}"] for f in features] + [f[f"ref_{second}"] for f in features], dtype=torch.float32
            )
        return batch


class SharedPromptCollator:
    """Preference pairs -> B rows of [prompt, chosen, rejected]: the prompt computed once for both answers.

    A 4D boolean attention mask [B, 1, T, T] keeps the answers apart: a chosen token sees the prompt and
    the chosen tokens before it; a rejected token sees the prompt and the rejected tokens before it, never
    a chosen one; and the rejected positions restart where the prompt ends. Each answer's hidden states
    are therefore those of its own [prompt, answer] sequence (exact up to rounding), while the model
    runs len(prompt) + len(chosen) + len(rejected) tokens instead of twice the prompt plus padding.
    Padding attends to itself only (a query that sees nothing would make softmax NaN).

    Written by hand: transformers passes a custom 4D mask to the attention as is, and neither it nor
    TRL builds prefix-shared pairs. ``ends`` [2B] is each answer's last token (chosen ones, then
    rejected ones: PairCollator's order); ``answer_lengths`` [2B] their lengths in the same order.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sizes = [(len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features]
        longest = max(p + c + r for p, c, r in sizes)
        rows = len(features)
        input_ids = torch.full((rows, longest), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((rows, longest), dtype=torch.long)
        mask = torch.zeros((rows, 1, longest, longest), dtype=torch.bool)
        causal = torch.ones((longest, longest), dtype=torch.bool).tril()
        chosen_ends, rejected_ends = [], []
        for row, (feature, (p, c, r)) in enumerate(zip(features, sizes)):
            n = p + c + r
            input_ids[row, :n] = torch.tensor(feature["prompt_ids"] + feature["chosen_ids"] + feature["rejected_ids"])
            position_ids[row, : p + c] = torch.arange(p + c)
            position_ids[row, p + c : n] = torch.arange(p, p + r)
            position_ids[row, n:] = torch.arange(longest - n)
            mask[row, 0, :n, :n] = causal[:n, :n]
            mask[row, 0, p + c : n, p : p + c] = False  # rejected tokens never see the chosen answer
            mask[row, 0, n:, n:] = torch.eye(longest - n, dtype=torch.bool)  # padding: itself only
            chosen_ends.append(p + c - 1)
            rejected_ends.append(n - 1)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            "ends": torch.tensor(chosen_ends + rejected_ends),
            "answer_lengths": torch.tensor([c for _, c, _ in sizes] + [r for _, _, r in sizes]),
        }
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        return batch
