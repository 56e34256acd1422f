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
        return self.padding(rows) | pair_extras(features, self.sides)


class SharedPromptCollator:
    """Preference pairs -> B rows of [prompt, first answer, prompt's last token again, second answer]:
    the prompt runs through the model once for both answers.

    A 4D boolean attention mask [B, 1, T, T] keeps the answers apart. The first answer sees the prompt
    and itself, as in its own row. The repeated last prompt token sits at that token's position and
    sees the prompt before it and itself - the same inputs, so the same hidden state - and predicts
    the second answer's first token, as the prompt's end does in the second answer's own row; the
    second answer sees the prompt (through that copy) and itself, never the first answer, at the
    positions it has in its own row. So every answer token gets the logits (and every answer end the
    hidden state) of the two-row layout up to rounding, and ``labels`` shift as usual, while the
    model runs P + A + 1 + B tokens a pair instead of 2P + A + B plus padding. Padding sees only
    itself (a query that sees nothing would make softmax NaN).

    Written by hand: transformers passes a custom 4D mask to the attention as is, and neither it nor
    TRL lays pairs out this way. Besides input_ids, position_ids, attention_mask and labels (-100 off
    the answers): ``split`` [B], the copy's index (label positions from there on are the second
    answer's); ``ends`` [2B], each answer's last token, first answers then second ones (PairCollator's
    order); ``answer_lengths`` [2B] in the same order. ``margin``, ``label`` and ``ref_logps`` ride
    along as in PairCollator.
    """

    def __init__(self, pad_token_id: int, sides: tuple[str, str] = ("chosen", "rejected")):
        self.pad_token_id = pad_token_id
        self.sides = sides

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        first, second = self.sides
        parts = [(f["prompt_ids"], f[f"{first}_ids"], f[f"{second}_ids"]) for f in features]
        if any(not prompt for prompt, _, _ in parts):
            raise ValueError("a shared-prompt pair needs a prompt of at least one token")
        longest = max(len(p) + len(a) + 1 + len(b) for p, a, b in parts)
        rows = len(features)
        input_ids = torch.full((rows, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((rows, longest), dtype=torch.long)
        mask = torch.zeros((rows, 1, longest, longest), dtype=torch.bool)
        causal = torch.ones((longest, longest), dtype=torch.bool).tril()
        splits, first_ends, second_ends = [], [], []
        for row, (prompt, a, b) in enumerate(parts):
            p, split = len(prompt), len(prompt) + len(a)
            n = split + 1 + len(b)
            input_ids[row, :n] = torch.tensor(prompt + a + prompt[-1:] + b)
            labels[row, p:split] = torch.tensor(a, dtype=torch.long)
            labels[row, split + 1 : n] = torch.tensor(b, dtype=torch.long)
            position_ids[row, :split] = torch.arange(split)
            position_ids[row, split:n] = torch.arange(p - 1, p + len(b))
            position_ids[row, n:] = torch.arange(longest - n)
            mask[row, 0, :n, :n] = causal[:n, :n]
            mask[row, 0, split:n, p - 1 : split] = False  # the copy and b see neither the original last token nor a
            mask[row, 0, n:, n:] = torch.eye(longest - n, dtype=torch.bool)  # padding: itself only
            splits.append(split)
            first_ends.append(split - 1)
            second_ends.append(n - 1)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            "labels": labels,
            "split": torch.tensor(splits),
            "ends": torch.tensor(first_ends + second_ends),
            "answer_lengths": torch.tensor([len(a) for _, a, _ in parts] + [len(b) for _, _, b in parts]),
        }
        return batch | pair_extras(features, self.sides)


def pair_extras(features: list[dict], sides: tuple[str, str]) -> dict[str, torch.Tensor]:
    """What rides along with a pair batch in either layout: ``margin`` [B], ``label`` [B] (KTO: desirable),
    ``ref_logps`` [2B] (first answers, then second ones)."""
    extras = {}
    if "margin" in features[0]:
        extras["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
    if "label" in features[0]:
        extras["label"] = torch.tensor([f["label"] for f in features], dtype=torch.bool)
    first, second = sides
    if f"ref_{first}" in features[0]:
        extras["ref_logps"] = torch.tensor(
            [f[f"ref_{first}"] for f in features] + [f[f"ref_{second}"] for f in features], dtype=torch.float32
        )
    return extras
