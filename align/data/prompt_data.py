"""Prompts for online RL: files -> conversations to answer + the columns rewards read + row report.

Formats (the same files SFT reads work here):
- {"prompt": str | messages, ...}: the prompt; every other field is a column for the reward.
- {"prompt": ..., "completion": str}: the completion becomes the ``reference`` column (GSM8K's
  worked answer, which the exact-answer rule reads).
- {"messages": [...]}: a final assistant message is removed and becomes ``reference``.
A ``reference`` field in the row wins over both. Prompt ids are ``encode_prompt``'s, the ids the
rollout engine samples after; prompts longer than data.max_length tokens are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.config import DataConfig
from align.data.formats import Message, RowError, _check_messages, _text
from align.data.report import RowReport, encode_records
from align.data.splits import load_splits
from align.data.templating import check_no_special_tokens, control_token_texts, encode_prompt

SKIPPED_COLUMNS = {"prompt", "messages", "completion"}


@dataclass
class PromptExample:
    messages: list[Message]
    prompt_ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)  # e.g. reference: the dataset's answer


def to_prompt(row: dict[str, Any], system_prompt: str | None = None) -> tuple[list[Message], dict[str, Any]]:
    """(messages to answer, reward columns); raises RowError naming the field."""
    columns = {k: v for k, v in row.items() if k not in SKIPPED_COLUMNS}
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        messages = (
            _check_messages(prompt, "prompt")
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(row, "prompt")}]
        )
        if isinstance(row.get("completion"), str):
            columns.setdefault("reference", row["completion"])
    elif "messages" in row:
        messages = _check_messages(row["messages"], "messages")
        if messages and messages[-1]["role"] == "assistant":
            columns.setdefault("reference", messages[-1]["content"])
            messages = messages[:-1]
    else:
        raise RowError("prompt", "a prompt row needs a 'prompt' or a 'messages' field", "missing_field")
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not messages or messages[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in messages):
        raise RowError("prompt", "the prompt must end with a user turn for the policy to answer", "bad_field")
    return messages, columns


def encode_prompt_files(
    paths: list[str], tokenizer, cfg: DataConfig, name: str
) -> tuple[list[PromptExample], RowReport]:
    specials = control_token_texts(tokenizer)

    def encode(row: dict) -> tuple[PromptExample, bool]:
        messages, columns = to_prompt(row, cfg.system_prompt)
        check_no_special_tokens(messages, specials)
        prompt_ids = encode_prompt(tokenizer, messages)
        if len(prompt_ids) > cfg.max_length:
            raise RowError(
                "prompt", f"prompt is {len(prompt_ids)} tokens, data.max_length is {cfg.max_length}", "prompt_too_long"
            )
        return PromptExample(messages, prompt_ids, columns), False

    return encode_records(paths, name, encode, {"prompt_too_long"})


def load_prompts(
    cfg: DataConfig, tokenizer, seed: int
) -> tuple[list[PromptExample], list[PromptExample], list[RowReport]]:
    """Train and held-out prompts with their row reports; strict mode fails here, before any model loads."""
    return load_splits(cfg, seed, lambda paths, c, name: encode_prompt_files(paths, tokenizer, c, name), "prompts")


def concatenate(sets: dict[str, list]) -> tuple[list, dict[str, slice]]:
    """Every set's items in one list, and each set's slice of it (named held-out sets are sampled
    together and judged apart).

    >>> concatenate({"a": [1, 2], "b": [3]})
    ([1, 2, 3], {'a': slice(0, 2, None), 'b': slice(2, 3, None)})
    """
    items, spans = [], {}
    for name, part in sets.items():
        spans[name] = slice(len(items), len(items) + len(part))
        items += part
    return items, spans
