"""An RL step's record and the alarms that read it: the step log (metrics.jsonl, trackers, samples),
the engine sync with the step's statistics gathered over processes, the dead-run and collapse alarms."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from align.artifacts import ROLLOUTS_FILE
from align.data.prompt_data import PromptExample
from align.rollout.engine import Rollout
from align.stages.ranks import gathered, gathered_rollouts, is_main, mean_over_ranks


class DeadRunAlarm:
    """RELIABILITY 16: RL that cannot learn. The stage stops early, says why and records the reason
    in its manifest when, for ``patience`` steps in a row, there is no signal:

    - every completion is truncated and every reward is the same (any algorithm), or
    - every advantage is zero (GRPO/RLOO: each group's rewards are all equal, so the policy
      gradient is zero whatever the lengths).
    """

    def __init__(self, patience: int, max_new_tokens: int):
        self.patience = patience
        self.max_new_tokens = max_new_tokens
        self.streak = 0

    def check(self, truncated_fraction: float, reward_std: float, zero_advantage: bool = False) -> str | None:
        truncated_and_flat = truncated_fraction == 1.0 and reward_std == 0.0
        self.streak = self.streak + 1 if truncated_and_flat or zero_advantage else 0
        if not (self.patience and self.streak >= self.patience):
            return None
        if truncated_and_flat:
            return (
                f"no learning signal for {self.streak} steps: every completion hit max_new_tokens "
                f"({self.max_new_tokens}) and every reward was the same. Raise rollout.max_new_tokens, check the "
                "reward on a few completions (align generate), or lower the temperature."
            )
        return (
            f"no learning signal for {self.streak} steps: within every group all samples got the same reward, "
            "so every advantage is zero. The task is too hard or too easy for this policy under this reward: "
            "check the reward on a few completions (align generate), use a graded reward, raise "
            "rollout.samples_per_prompt or the temperature, or pick easier prompts."
        )


class StepLog:
    """Collects one RL step's numbers and appends them to metrics.jsonl: the means of what was added,
    the seconds of each timed phase, and ``time/step``, the wall clock since the previous step was written
    (the first: since the log was made), so what no phase times (KL, advantages, logging) shows too."""

    def __init__(self, path: Path, tracker=None, samples_every: int = 0):
        self.path = path
        self.tracker = tracker  # align/tracking.py's Tracker: the same records to wandb / trackio
        self.samples_every = samples_every
        self.values: dict[str, list[float]] = defaultdict(list)
        self.times: dict[str, float] = defaultdict(float)
        self.last_write = time.perf_counter()

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.values[key].append(float(value))

    def timed(self, phase: str):
        log = self

        class _Timer:
            def __enter__(self):
                self.started = time.perf_counter()

            def __exit__(self, *exc):
                log.times[phase] += time.perf_counter() - self.started

        return _Timer()

    def write(self, step: int) -> dict:
        """The step's record - across processes the ranks' mean of each number, the same on every rank -
        appended to metrics.jsonl by process 0."""
        values = mean_over_ranks(
            {
                **{k: sum(v) / len(v) for k, v in self.values.items()},
                **{f"time/{k}": v for k, v in self.times.items()},
                "time/step": time.perf_counter() - self.last_write,
            }
        )
        record = {"step": step, **{k: round(v, 3) if k.startswith("time/") else v for k, v in values.items()}}
        self.last_write = time.perf_counter()
        if is_main():
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)
        self.values.clear()
        self.times.clear()
        return record

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def samples(self, step: int, prompts: list[PromptExample], rollouts: list[Rollout], rewards: torch.Tensor) -> None:
        """Every samples_every steps (and the first), the step's prompts, completions and rewards: appended
        to rollouts.jsonl beside metrics.jsonl, and a table for wandb / trackio - samples to read, not
        only curves."""
        if not self.samples_every or (step != 1 and step % self.samples_every) or not is_main():
            return
        rows = [
            {
                "step": step,
                "prompt": prompts[r.prompt_index].messages,
                "completion": r.text,
                "reward": float(reward),
                "tokens": len(r.completion_ids),
                "finish_reason": r.finish_reason,
            }
            for r, reward in zip(rollouts, rewards.tolist())
        ]
        with self.path.with_name(ROLLOUTS_FILE).open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
        if self.tracker is not None:
            columns = ["step", "prompt", "completion", "reward", "tokens"]
            table = [
                [step, row["prompt"][-1]["content"], row["completion"], row["reward"], row["tokens"]] for row in rows
            ]
            self.tracker.table("rollouts", columns, table, step=step)


def open_step_log(cfg, output_dir: Path, stage: str) -> StepLog:
    """metrics.jsonl (+ rollouts.jsonl), and wandb / trackio when the recipe's tracking asks."""
    from align.tracking import Tracker

    tracker = Tracker(cfg.tracking, output_dir, stage, cfg.model_dump(mode="json", by_alias=True))
    return StepLog(output_dir / "metrics.jsonl", tracker, cfg.rollout.log_samples_every)


def sync_and_gather(engine, policy, log, rollouts: list[Rollout], prompts: int, rewards: torch.Tensor, old):
    """The end of an RL step, shared by grpo and ppo: the engine takes the new weights (verified), then
    the step's rollouts and rewards from every process (the same on each, so every process stops alike),
    their statistics, and how far the sampler's logprobs were from the trainer's ``old`` [B, C], all
    logged. Returns (the step's rollouts, their rewards, the statistics)."""
    from align.rollout.scoring import logprob_mismatch

    with log.timed("sync"):
        engine.sync_weights(policy)
    log.add(**getattr(engine, "fidelity", {}))  # vLLM: its greedy answers to real prompts vs the trainer
    log.add(**getattr(engine, "sync_seconds", {}))  # vLLM: push, probe and faithfulness check
    step_rollouts = gathered_rollouts(rollouts, prompts)
    step_rewards = torch.tensor(gathered(rewards.tolist()))
    stats = rollout_stats(step_rollouts, step_rewards)
    trainer = [row[: len(r.logprobs)].tolist() for row, r in zip(old, rollouts)]
    log.add(**stats, **logprob_mismatch([r.logprobs for r in rollouts], trainer))
    return step_rollouts, step_rewards, stats


def rollout_stats(rollouts: list[Rollout], rewards: torch.Tensor) -> dict[str, float]:
    from align.eval.health import distinct_n, has_loop

    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "completion_length": lengths.mean().item(),
        "truncated_fraction": sum(r.truncated for r in rollouts) / len(rollouts),
        "loop_fraction": sum(has_loop(r.completion_ids) for r in rollouts) / len(rollouts),
        "distinct_2": distinct_n([r.completion_ids for r in rollouts], 2),
    }


class CollapseWatch:
    """The RL side of the collapse alarm, every step: the KL to the reference (when the loss has one)
    past checkup.max_kl, or the share of looping rollouts risen past checkup.max_loop_rise above the
    first step's. Off when checkup.alarm is false; the reason stops the loop like the dead-run alarm."""

    def __init__(self, checkup):
        self.checkup = checkup
        self.first_loops: float | None = None

    def check(self, loop_fraction: float, kl: float | None) -> str | None:
        if self.first_loops is None:
            self.first_loops = loop_fraction
        if not self.checkup.alarm:
            return None
        if kl is not None and kl > self.checkup.max_kl:
            return f"KL to the reference {kl:.3f} per token (threshold checkup.max_kl {self.checkup.max_kl})"
        if loop_fraction - self.first_loops > self.checkup.max_loop_rise:
            return (
                f"rollouts stuck in a repeated loop rose from {self.first_loops:.2f} to {loop_fraction:.2f} "
                f"(threshold checkup.max_loop_rise {self.checkup.max_loop_rise})"
            )
        return None
