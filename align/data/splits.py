"""Train / held-out splits shared by every stage's data: shuffle, hold out, cap, strict mode, and
weighted mixtures of several train files."""

from __future__ import annotations

import random
from typing import Callable, TypeVar

from align.config import DataConfig
from align.data.loading import DataError
from align.data.report import RowReport

Example = TypeVar("Example")
Encoder = Callable[[list[str], DataConfig, str], tuple[list, RowReport]]


def load_splits(cfg: DataConfig, seed: int, encode: Encoder, what: str) -> tuple[list, list, list[RowReport]]:
    """(train, held_out, reports). Bad rows stop here in strict mode, before any model is loaded."""
    if not cfg.train:
        raise DataError(f"data.train is empty: name at least one file of {what}")
    if cfg.train_weights is None:
        train, train_report = encode(cfg.train, cfg, "train")
        reports = [train_report]
        origins = None
    else:  # each file on its own, so each has a row report and its rows stay known
        reports, train, origins = [], [], []
        for index, path in enumerate(cfg.train):
            rows, report = encode([path], cfg, f"train {path}")
            reports.append(report)
            train += rows
            origins += [index] * len(rows)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)  # one shuffle for rows and their origins (the same as shuffling the rows)
    train = [train[i] for i in order]
    origins = [origins[i] for i in order] if origins is not None else None
    if cfg.eval:
        held_out, eval_report = encode(cfg.eval, cfg, "eval")
        reports.append(eval_report)
    else:
        held_out, train = train[: cfg.eval_rows], train[cfg.eval_rows :]
        origins = origins[cfg.eval_rows :] if origins is not None else None
    if origins is not None:
        train = mix(cfg, train, origins, reports, seed)
    else:
        train = train[: cfg.max_rows] if cfg.max_rows else train
    held_out = held_out[: cfg.max_eval_rows] if cfg.max_eval_rows else held_out
    if cfg.on_bad_rows == "error":
        for report in reports:
            report.raise_if_bad()
    if not train:
        summary = "; ".join(r.summary() for r in reports if r.name != "eval")
        raise DataError(f"{', '.join(cfg.train)}: no training rows left ({summary}): nothing would be supervised")
    return train, held_out, reports


def mixture_counts(total: int, weights: list[float]) -> list[int]:
    """``total`` rows split in proportion to ``weights``, whole numbers summing to ``total`` (the
    largest remainders get the rows the rounding leaves)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(cfg: DataConfig, rows: list, origins: list[int], reports: list[RowReport], seed: int) -> list:
    """A weighted mixture of the train files' (shuffled, held-out-removed) rows: data.max_rows rows, or
    as many as the files hold, drawn in the weights' proportions. A file asked for more rows than it
    has gives each of them once per pass and a seeded sample for the rest; fewer, a seeded sample.
    The drawn rows are shuffled together; the same seed gives the same rows in the same order."""
    pools = [[row for row, origin in zip(rows, origins) if origin == index] for index in range(len(cfg.train))]
    total = cfg.max_rows or len(rows)
    counts = mixture_counts(total, cfg.train_weights)
    rng = random.Random(seed + 1)  # not the split's stream: the draw must not repeat the shuffle above
    drawn = []
    for index, (pool, count) in enumerate(zip(pools, counts)):
        if count and not pool:
            raise DataError(
                f"data.train[{index}] ({cfg.train[index]}): no usable rows ({reports[index].summary()}), but its "
                f"weight asks for {count} of the mixture's {total}"
            )
        picked = []
        while count - len(picked) >= len(pool) > 0:
            picked += rng.sample(pool, len(pool))
        picked += rng.sample(pool, count - len(picked))
        reports[index].drawn, reports[index].share = count, cfg.train_weights[index] / sum(cfg.train_weights)
        drawn += picked
    rng.shuffle(drawn)
    return drawn
