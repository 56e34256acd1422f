"""The ptx term of an online-RL update (InstructGPT's PPO-ptx, Ouyang et al. 2022): ``ptx.coef`` x the
SFT loss on rows of other data, added to every optimizer step of grpo and ppo, so the policy keeps what
that data asks of it (general conversation, the task's worked answers) while RL moves it.

Neither TRL's GRPOTrainer nor its PPO trainer has such a term, so it is written here, on align's own
SFT encoding (prompt-masked labels, align/data/sft_data.py) and its labelled-positions-only forward.

Which rows an optimizer step reads is a function of the seed and the step's number alone: the rows in
a seeded order, ``ptx.rows`` at a time, reshuffled at each pass over them. So a resumed run reads what
the uninterrupted one read, and under torchrun process r takes every N-th of the step's rows with the
step's whole token count as denominator: the summed gradients are one process's.
"""

from __future__ import annotations

import random

from align.data.batching import PaddingCollator, as_rows
from align.data.loading import DataError
from align.data.sft_data import encode_files
from align.data.templating import Encoded
from align.models.loading import autocast
from align.models.output_layer import next_token_logps
from align.stages.ranks import spread, summed


class PtxTerm:
    """``coef`` x the mean -log p per labelled token of a step's ptx rows, backward into the policy's
    gradients. Built, and its rows checked (data.on_bad_rows as for training data), before any model loads."""

    def __init__(self, cfg, tokenizer):
        ptx = cfg.ptx
        data = cfg.data.model_copy(update={"format": "auto", "max_length": ptx.max_length or cfg.data.max_length})
        self.coef, self.rows_per_step, self.seed, self.files = ptx.coef, ptx.rows, cfg.seed, ptx.data
        self.examples, self.report = encode_files(ptx.data, tokenizer, data, "ptx.data")
        if cfg.data.on_bad_rows == "error":
            self.report.raise_if_bad()
        if not self.examples:
            raise DataError(f"ptx.data {', '.join(ptx.data)}: no row left to train on ({self.report.summary()})")
        self.pad, self.batch_size = tokenizer.pad_token_id, cfg.train.batch_size
        self._order: tuple[int, list[int]] = (-1, [])

    def describe(self) -> str:
        return (
            f"+ {self.coef} x the SFT loss of {self.rows_per_step} rows an optimizer step, from "
            f"{self.report.used} rows of {', '.join(self.files)}"
        )

    def rows(self, update: int) -> list[Encoded]:
        """The rows of optimizer step ``update`` (0, 1, ...): the next ``ptx.rows`` of a seeded order of
        every row, a new order for each pass over them."""
        picked = []
        for position in range(update * self.rows_per_step, (update + 1) * self.rows_per_step):
            passes, index = divmod(position, len(self.examples))
            if self._order[0] != passes:
                order = list(range(len(self.examples)))
                random.Random(self.seed * 7919 + passes).shuffle(order)
                self._order = (passes, order)
            picked.append(self.examples[self._order[1][index]])
        return picked

    def backward(self, policy, update: int, precision: str) -> float:
        """Adds coef x optimizer step ``update``'s ptx loss to the gradients (this process's every N-th
        row, over the step's whole token count); returns the step's mean -log p per labelled token."""
        step_rows = self.rows(update)
        tokens = sum(e.trained_tokens for e in step_rows)
        mine = spread(step_rows)
        device = next(policy.parameters()).device
        total = 0.0
        for start in range(0, len(mine), self.batch_size):
            batch = PaddingCollator(self.pad)(as_rows(mine[start : start + self.batch_size]))
            batch = {k: v.to(device) for k, v in batch.items()}
            targets = batch.pop("labels")[:, 1:]  # position t predicts token t + 1
            with autocast(precision):
                logps = next_token_logps(policy, targets, **batch)[0]
            nll = -logps.float().sum()
            (self.coef * nll / tokens).backward()
            total += nll.item()
        return summed(total) / tokens


def ptx_term(cfg, tokenizer) -> PtxTerm | None:
    """The stage's ptx term, or None when ptx.coef is 0 (then nothing about the update changes)."""
    return PtxTerm(cfg, tokenizer) if cfg.ptx.coef > 0 else None
