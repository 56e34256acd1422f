"""Preference pairs: files -> (prompt, chosen, rejected) -> shared prompt ids + two completions + row report.

Formats:
- {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
- {"chosen": messages, "rejected": messages}: the shared leading messages are the prompt.

Both completions are encoded with the same templating code as SFT (prompt-masked labels, end
of turn trained), so their prompt ids are identical and equal the ids a rollout engine sees.
Truncation is one budget per pair: the prompt is kept whole and both completions are cut to
the same number of tokens; a pair with no room for a completion token is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.config import DataConfig
from align.data.formats import Message, RowError, _check_messages, _text
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

LENGTH_REASONS = {"prompt_too_long", "identical_after_truncation"}


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens only, through the end-of-turn token
    rejected_ids: list[int]
    truncated: bool = False
    margin: float | None = None  # optional per-pair margin column (reward models)


def to_pair_messages(row: dict[str, Any], system_prompt: str | None = None) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen text, rejected text); raises RowError naming the field."""
    for field in ("chosen", "rejected"):
        if field not in row or row[field] is None:
            raise RowError(field, f"field '{field}' is missing or null", "missing_field")
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        messages = (
            _check_messages(prompt, "prompt")
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(row, "prompt")}]
        )
        chosen, rejected = (_completion(row, f) for f in ("chosen", "rejected"))
    else:
        chosen_messages = _check_messages(row["chosen"], "chosen")
        rejected_messages = _check_messages(row["rejected"], "rejected")
        shared = 0
        while (
            shared < min(len(chosen_messages), len(rejected_messages)) - 1
            and chosen_messages[shared] == rejected_messages[shared]
        ):
            shared += 1
        messages = chosen_messages[:shared]
        if (
            not messages
            or chosen_messages[shared:] == []
            or len(chosen_messages) != shared + 1
            or len(rejected_messages) != shared + 1
        ):
            raise RowError(
                "chosen", "chosen and rejected must share all messages but a final assistant answer", "bad_field"
            )
        for field, last in (("chosen", chosen_messages[-1]), ("rejected", rejected_messages[-1])):
            if last["role"] != "assistant" or not last["content"].strip():
                raise RowError(
                    field, f"the last message of '{field}' must be a non-empty assistant answer", "bad_field"
                )
        chosen, rejected = chosen_messages[-1]["content"], rejected_messages[-1]["content"]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if messages[-1]["role"] == "assistant":
        raise RowError("prompt", "the prompt ends with an assistant message; nothing is left to answer", "bad_field")
    return messages, chosen, rejected


def _completion(row: dict[str, Any], field: str) -> str:
    value = row[field]
    if isinstance(value, list):
        messages = _check_messages(value, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RowError(field, f"'{field}' must be one assistant message", "bad_field")
        value = messages[0]["content"]
    elif not isinstance(value, str):
        raise RowError(field, f"field '{field}' must be a string or a message list", "bad_field")
    if not value.strip():
        raise RowError(field, f"field '{field}' is empty", "empty_field")
    return value


def encode_pair(
    tokenizer, prompt: list[Message], chosen: str, rejected: str, max_length: int, eot_ids: set[int]
) -> Pair:
    prompt_ids = encode_prompt(tokenizer, prompt)  # the whole history, as a rollout engine sees it
    completions = []
    for text in (chosen, rejected):
        encoded = encode_conversation(
            tokenizer, prompt + [{"role": "assistant", "content": text}], max_length=1 << 30, eot_ids=eot_ids
        )
        if (
            encoded.input_ids[: len(prompt_ids)] != prompt_ids
        ):  # impossible with a prefix-stable template; never train on it
            raise RowError("prompt", "the prompt's ids are not a prefix of prompt + answer", "template_error")
        last = max(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        completions.append(encoded.input_ids[len(prompt_ids) : last + 1])
    chosen_ids, rejected_ids = completions
    if chosen_ids == rejected_ids:
        raise RowError("rejected", "chosen and rejected are identical after templating", "identical_pair")
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise RowError("prompt", f"prompt is {len(prompt_ids)} tokens, max_length is {max_length}", "prompt_too_long")
    truncated = max(len(chosen_ids), len(rejected_ids)) > budget
    chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    if chosen_ids == rejected_ids:
        raise RowError(
            "rejected",
            f"chosen and rejected only differ after the first {budget} answer tokens",
            "identical_after_truncation",
        )
    return Pair(prompt_ids, chosen_ids, rejected_ids, truncated)


def _margin(row: dict[str, Any]) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("margin", f"field 'margin' must be a number, got {value!r}", "bad_field")
    return float(value)


def encode_pair_files(paths: list[str], tokenizer, cfg: DataConfig, name: str) -> tuple[list[Pair], RowReport]:
    eot_ids = end_of_turn_ids(tokenizer)
    specials = control_token_texts(tokenizer)

    def encode(row: dict) -> tuple[Pair, bool]:
        prompt, chosen, rejected = to_pair_messages(row, cfg.system_prompt)
        check_no_special_tokens(
            prompt + [{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}], specials
        )
        pair = encode_pair(tokenizer, prompt, chosen, rejected, cfg.max_length, eot_ids)
        pair.margin = _margin(row)
        return pair, pair.truncated

    return encode_records(paths, name, encode, LENGTH_REASONS)


def load_pairs(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[Pair], list[Pair], list[RowReport]]:
    """Train and held-out pairs with their row reports."""
    return load_splits(
        cfg, seed, lambda paths, c, name: encode_pair_files(paths, tokenizer, c, name), "preference pairs"
    )


def pair_rows(pairs: list[Pair]) -> list[dict]:
    """Pairs as the rows PairCollator batches; the margin column only when every pair has one."""
    rows = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    if pairs and all(p.margin is not None for p in pairs):
        for row, pair in zip(rows, pairs):
            row["margin"] = pair.margin
    return rows
