"""SFT data: files -> validated conversations -> token ids with prompt-masked labels + row report."""

from __future__ import annotations

from dataclasses import dataclass

from align.config import DataConfig
from align.data.formats import Message, RowError, detect_format, to_messages
from align.data.loading import DataError, read_records
from align.data.preference_data import to_pair_messages
from align.data.report import RowProblem, RowReport
from align.data.splits import load_splits
from align.data.templating import (
    Encoded,
    check_no_special_tokens,
    control_token_texts,
    encode_conversation,
    end_of_turn_ids,
)

# Drops that are not a broken row: the length budget's, and answers labelled undesirable (KTO data).
# Counted in the row report, never fatal.
LENGTH_REASONS = {"prompt_too_long", "no_trained_tokens"}
NOT_BAD = LENGTH_REASONS | {"undesirable"}


@dataclass
class SFTData:
    train: list[Encoded]
    eval: list[Encoded]
    reports: list[RowReport]


def encode_files(paths: list[str], tokenizer, cfg: DataConfig, name: str) -> tuple[list[Encoded], RowReport]:
    """Read, validate and encode every row of ``paths``; the report accounts for each row."""
    report = RowReport(name=name)
    examples: list[Encoded] = []
    eot_ids = end_of_turn_ids(tokenizer)
    specials = control_token_texts(tokenizer)
    for path in paths:
        fmt = None if cfg.format == "auto" else cfg.format
        undetected: list[RowProblem] = []
        for record in read_records(path):
            report.read += 1
            if record.error:
                report.drop(RowProblem(record.source, record.row, "<row>", record.error, "unreadable"), bad_row=True)
                continue
            row_format = fmt or detect_format(record.data)
            if row_format is None:
                problem = RowProblem(
                    record.source,
                    record.row,
                    "<row>",
                    f"cannot tell the format from keys {sorted(record.data)}",
                    "unknown_format",
                )
                undetected.append(problem)
                report.drop(problem, bad_row=True)
                continue
            fmt = row_format  # the first row that matches a format decides it for the file
            try:
                messages = sft_messages(record.data, fmt, cfg.system_prompt)
                check_no_special_tokens(messages, specials)
                encoded = encode_conversation(tokenizer, messages, cfg.max_length, eot_ids)
            except RowError as err:
                problem = RowProblem(record.source, record.row, err.field, str(err), err.reason)
                report.drop(problem, bad_row=err.reason not in NOT_BAD)
                continue
            except Exception as err:  # the chat template refused this row (jinja raise_exception, role order, ...)
                problem = RowProblem(
                    record.source, record.row, "messages", f"chat template failed: {err}", "template_error"
                )
                report.drop(problem, bad_row=True)
                continue
            examples.append(encoded)
            report.keep(encoded.truncated)
        if fmt is None and undetected:
            first = undetected[0]
            raise DataError(
                f"{first.source}, row {first.row}: {first.message}; expected "
                "'messages', 'prompt'+'completion', 'instruction'+'output', or 'chosen'+'rejected' "
                "(or set data.format)"
            )
    report.check_balanced()
    return examples, report


def sft_messages(row: dict, fmt: str, system_prompt: str | None) -> list[Message]:
    """The conversation SFT trains on: a pair's chosen answer; a labelled row only if its label is true."""
    if fmt == "preference":
        prompt, chosen, _ = to_pair_messages(row, system_prompt)
        return prompt + [{"role": "assistant", "content": chosen}]
    label = row.get("label")
    if isinstance(label, bool):  # KTO's thumbs up/down: SFT learns the answers marked desirable only
        if not label:
            raise RowError("label", "labelled undesirable (label false): not trained on", "undesirable")
    elif label in (0, 1) or (isinstance(label, str) and label.strip().lower() in ("true", "false")):
        # looks like a thumbs up/down that is not a JSON boolean: training on it could learn the bad answers
        raise RowError("label", f"field 'label' must be true or false (a JSON boolean), got {label!r}", "bad_field")
    return to_messages(row, fmt, system_prompt)


def load_sft_data(cfg: DataConfig, tokenizer, seed: int) -> SFTData:
    """Train and held-out examples; raises DataError before training on bad rows or empty data."""
    train, held_out, reports = load_splits(
        cfg, seed, lambda paths, c, name: encode_files(paths, tokenizer, c, name), "training rows"
    )
    return SFTData(train=train, eval=held_out, reports=reports)
