"""Unpaired answers labelled desirable or not (KTO's data): files -> prompt ids + completion + label.

Formats:
- {"prompt": str | messages, "completion": str | assistant message, "label": true | false}
- {"messages": [..., assistant answer], "label": true | false}: the last message is the completion
- a preference pair (any format of align/data/preference_data.py): two examples, the chosen answer
  desirable and the rejected one not (what TRL's unpair_preference_dataset does)

The completion is encoded with the same templating code as SFT and DPO, so its prompt ids equal
the ids a rollout engine sees. Truncation keeps the prompt whole and cuts the answer; a prompt
with no room for an answer token is dropped and counted. The label must be a JSON boolean: 0/1 or
"yes" are refused by name, as a guessed label would train the model the wrong way.

KL answers: KTO estimates its reference point from mismatched pairs (a prompt with another row's
answer). TRL pairs each row with its neighbour in a fixed, unshuffled batch; here each prompt gets
the answer of its successor in one seeded cycle over the split (``with_kl_answers``), fixed before
training, so the reference logprobs of the mismatched pairs can be precomputed and batches can be
drawn in any order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from align.config import DataConfig
from align.data.formats import Message, RowError, _check_messages
from align.data.loading import DataError
from align.data.preference_data import LENGTH_REASONS, _completion, to_pair_messages
from align.data.report import RowReport, encode_records
from align.data.splits import load_splits
from align.data.templating import (
    check_no_special_tokens,
    control_token_texts,
    encode_conversation,
    encode_prompt,
    end_of_turn_ids,
)
from align.tokens import IGNORE_INDEX


@dataclass
class Labelled:
    prompt_ids: list[int]
    completion_ids: list[int]  # completion tokens only, through the end-of-turn token
    desirable: bool
    truncated: bool = False


def _label(row: dict[str, Any]) -> bool:
    value = row.get("label")
    if value is None:
        raise RowError(
            "label", "field 'label' is missing or null (true = desirable, false = undesirable)", "missing_field"
        )
    if not isinstance(value, bool):
        raise RowError("label", f"field 'label' must be true or false, got {value!r}", "bad_field")
    return value


def to_labelled_messages(
    row: dict[str, Any], system_prompt: str | None = None
) -> list[tuple[list[Message], str, bool]]:
    """[(prompt messages, completion text, desirable)]: one for a labelled row, two for a pair."""
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = to_pair_messages(row, system_prompt)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    desirable = _label(row)
    if "completion" in row:
        if row.get("prompt") is None:
            raise RowError("prompt", "field 'prompt' is missing or null", "missing_field")
        prompt = row["prompt"]
        messages = (
            _check_messages(prompt, "prompt")
            if isinstance(prompt, list)
            else [{"role": "user", "content": _completion(row, "prompt")}]
        )
        completion = _completion(row, "completion")
    elif "messages" in row:
        conversation = _check_messages(row["messages"], "messages")
        last = conversation[-1]
        if last["role"] != "assistant" or len(conversation) < 2:
            raise RowError("messages", "the last message must be the assistant answer that is labelled", "bad_field")
        messages, completion = conversation[:-1], last["content"]
    else:
        raise RowError(
            "completion",
            "a row needs prompt + completion + label, messages + label, or chosen + rejected",
            "missing_field",
        )
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if messages[-1]["role"] == "assistant":
        raise RowError("prompt", "the prompt ends with an assistant message; nothing is left to answer", "bad_field")
    return [(messages, completion, desirable)]


def encode_labelled(
    tokenizer, prompt: list[Message], completion: str, desirable: bool, max_length: int, eot_ids: set[int]
) -> Labelled:
    prompt_ids = encode_prompt(tokenizer, prompt)
    encoded = encode_conversation(
        tokenizer, prompt + [{"role": "assistant", "content": completion}], max_length=1 << 30, eot_ids=eot_ids
    )
    if (
        encoded.input_ids[: len(prompt_ids)] != prompt_ids
    ):  # impossible with a prefix-stable template; never train on it
        raise RowError("prompt", "the prompt's ids are not a prefix of prompt + answer", "template_error")
    last = max(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    completion_ids = encoded.input_ids[len(prompt_ids) : last + 1]
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise RowError("prompt", f"prompt is {len(prompt_ids)} tokens, max_length is {max_length}", "prompt_too_long")
    return Labelled(prompt_ids, completion_ids[:budget], desirable, truncated=len(completion_ids) > budget)


def encode_labelled_files(
    paths: list[str], tokenizer, cfg: DataConfig, name: str
) -> tuple[list[list[Labelled]], RowReport]:
    """Each row's examples (two for a pair row, which counts once in the report) and the row report."""
    eot_ids = end_of_turn_ids(tokenizer)
    specials = control_token_texts(tokenizer)

    def encode(row: dict) -> tuple[list[Labelled], bool]:
        parts = to_labelled_messages(row, cfg.system_prompt)
        for prompt, completion, _ in parts:
            check_no_special_tokens(prompt + [{"role": "assistant", "content": completion}], specials)
        encoded = [encode_labelled(tokenizer, p, c, d, cfg.max_length, eot_ids) for p, c, d in parts]
        return encoded, any(e.truncated for e in encoded)

    return encode_records(paths, name, encode, LENGTH_REASONS)


def load_labelled(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[Labelled], list[Labelled], list[RowReport]]:
    """Train and held-out examples with their row reports. Rows are split, shuffled and capped
    (data.eval_rows, data.max_rows count rows), so a pair's two answers stay on one side."""
    train, held_out, reports = load_splits(
        cfg, seed, lambda paths, c, name: encode_labelled_files(paths, tokenizer, c, name), "labelled answers"
    )
    return [e for row in train for e in row], [e for row in held_out for e in row], reports


def with_kl_answers(examples: list[Labelled], seed: int, max_length: int) -> list[dict]:
    """Rows for ``PairCollator(sides=("completion", "kl"))``: each example with the answer of its
    successor in a seeded cycle over the split as its mismatched KL answer (never its own: a cycle
    of two or more moves every row), cut to the prompt's token budget, and its label."""
    if len(examples) < 2:
        raise DataError(
            f"KTO needs at least 2 examples per split to pair prompts with other answers, got {len(examples)}"
        )
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    successor = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return [
        {
            "prompt_ids": e.prompt_ids,
            "completion_ids": e.completion_ids,
            "kl_ids": examples[successor[i]].completion_ids[: max_length - len(e.prompt_ids)],
            "label": e.desirable,
        }
        for i, e in enumerate(examples)
    ]
