"""Train / held-out splits shared by every stage's data: shuffle, hold out, cap, strict mode."""

from __future__ import annotations

import random
from typing import Callable, TypeVar

from align.data.loading import DataError
from align.data.report import RowReport
from align.config import DataConfig

Example = TypeVar("Example")
Encoder = Callable[[list[str], DataConfig, str], tuple[list, RowReport]]


def load_splits(cfg: DataConfig, seed: int, encode: Encoder, what: str) -> tuple[list, list, list[RowReport]]:
    """(train, held_out, reports). Bad rows stop here in strict mode, before any model is loaded."""
    if not cfg.train:
        raise DataError(f"data.train is empty: name at least one file of {what}")
    train, train_report = encode(cfg.train, cfg, "train")
    reports = [train_report]
    random.Random(seed).shuffle(train)
    if cfg.eval:
        held_out, eval_report = encode(cfg.eval, cfg, "eval")
        reports.append(eval_report)
    else:
        held_out, train = train[: cfg.eval_rows], train[cfg.eval_rows:]
    train = train[: cfg.max_rows] if cfg.max_rows else train
    held_out = held_out[: cfg.max_eval_rows] if cfg.max_eval_rows else held_out
    if cfg.on_bad_rows == "error":
        for report in reports:
            report.raise_if_bad()
    if not train:
        raise DataError(f"{', '.join(cfg.train)}: no training rows left ({train_report.summary()}): nothing would be supervised")
    return train, held_out, reports
