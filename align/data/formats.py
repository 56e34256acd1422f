"""Row formats for SFT, detected from a row's keys and normalised to a list of chat messages.

- messages:           {"messages": [{"role": "user", "content": "..."}, ...]}
- prompt_completion:  {"prompt": "...", "completion": "..."} (prompt may be a message list)
- alpaca:             {"instruction": "...", "input": "...", "output": "..."}
- preference:         a preference pair (align/data/preference_data.py's formats): SFT on the chosen
                      answer, the rejected one unread - the usual first stage before DPO or KTO

A row of the first two formats may carry KTO's "label" (true/false): SFT trains on the desirable
answers and counts the others as skipped, so one labelled file serves an SFT stage and a KTO stage.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("chosen",),
}

Message = dict[str, str]


class RowError(ValueError):
    """One row is unusable: ``field`` names the offending field, ``reason`` is the row report's key."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field = field
        self.reason = reason


def detect_format(row: dict[str, Any]) -> str | None:
    for name, keys in FORMAT_KEYS.items():
        if all(key in row for key in keys):
            return name
    return None


def to_messages(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> list[Message]:
    """Normalise one row to chat messages; raises RowError naming the field that is wrong."""
    if fmt == "messages":
        messages = _check_messages(row.get("messages"), "messages")
    elif fmt == "prompt_completion":
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            messages = _check_messages(prompt, "prompt")
        else:
            messages = [{"role": "user", "content": _text(row, "prompt")}]
        messages.append({"role": "assistant", "content": _text(row, "completion")})
    elif fmt == "alpaca":
        instruction = _text(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError("input", f"field 'input' must be a string, got {type(extra).__name__}", "bad_field")
        content = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": _text(row, "output")}]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages", "no assistant message: nothing to train on", "no_assistant_turn")
    return messages


def _text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(field, f"field '{field}' is missing or null", "missing_field")
    if not isinstance(value, str):
        raise RowError(field, f"field '{field}' must be a string, got {type(value).__name__}", "bad_field")
    if not value.strip():
        raise RowError(field, f"field '{field}' is empty", "empty_field")
    return value


def _check_messages(value: Any, field: str) -> list[Message]:
    if value is None:
        raise RowError(field, f"field '{field}' is missing or null", "missing_field")
    if not isinstance(value, list) or not value:
        raise RowError(field, f"field '{field}' must be a non-empty list of messages", "empty_field")
    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RowError(where, f"{where} must be an object with 'role' and 'content'", "bad_field")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(
                f"{where}.role", f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}", "unknown_role"
            )
        content = message.get("content")
        if content is None:
            raise RowError(f"{where}.content", f"{where}.content is missing or null", "missing_field")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"{where}.content must be a string", "bad_field")
        if role == "assistant" and not content.strip():
            raise RowError(f"{where}.content", f"{where}.content is an empty assistant message", "empty_field")
        messages.append({"role": role, "content": content})
    return messages
