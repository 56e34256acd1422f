"""`align grpo`: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024), one loop.

Each step:
  1. rollout   - prompts_per_step prompts x samples_per_prompt completions from the rollout engine
  2. score     - the recipe's reward (rule, learned reward model, judge, or a weighted sum)
  3. advantage - relative to the prompt's group: GRPO (r - mean) / std (Dr. GRPO: no std), or RLOO
                 r - mean of the other samples; one advantage for every token of a completion
  4. logprobs  - the trainer recomputes the rollout policy's logprobs (never the engine's) and,
                 when kl_coef > 0, the reference's (adapter disabled / frozen starting adapter);
                 a vLLM sampler's tokens get truncated importance weights min(pi_trainer / pi_vllm, cap)
  5. update    - epochs x minibatches of the (weighted) clipped objective + kl_coef x KL(k3), aggregated
                 per token, per sequence or by a constant (see GRPOOptions.loss_aggregation)
  6. sync      - the engine takes the new weights (verified) and the step is logged
Before the first step, every monitor.every steps and after the last: one answer per held-out prompt,
scored by the training reward (the proxy) and by the monitor rewards, never trained on.
Written here rather than on TRL's GRPOTrainer/RLOOTrainer: see align/stages/rl_setup.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import get_scheduler, set_seed

from align.config import GRPOConfig
from align.console import console, print_plan
from align.data.prompt_data import load_prompts
from align.faults import fault_point
from align.losses import (
    aggregate_loss,
    approx_kl,
    clipped_policy_loss,
    group_advantages,
    importance_stats,
    kl_estimate,
    masked_mean,
    rloo_advantages,
    truncated_importance_weights,
)
from align.models.adapters import trainable_summary
from align.models.loading import autocast, load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.rollout.scoring import policy_outputs, rollout_batch
from align.stages.checkup import checkup_status, raise_if_collapsed, run_checkup, with_training_alarm
from align.stages.common import adapter_line, prepare_output, process_state, referenced_dirs, resume_line, source_stage
from align.stages.monitors import HeldOut, build_monitors
from align.stages.ptx import ptx_term
from align.stages.ranks import barrier, share, summed, world
from align.stages.rl_checkpoints import checkpoint_if_due, load_rl_checkpoint, save_rl_stage
from align.stages.rl_log import CollapseWatch, DeadRunAlarm, open_step_log, sync_and_gather
from align.stages.rl_setup import (
    check_longest_rollout_batch,
    check_shares,
    load_policy,
    prompt_batches,
    rl_steps,
    sampler_logprobs,
)
from align.stages.rl_update import columns, minibatch_updates, rollout_logprobs, select_rows
from align.stages.rollouts import rollout_engine, sampling, score


@dataclass
class GRPOTargets:
    """What one step's update trains towards, a row per rollout: the rollout batch, and [B, C] mask,
    the rollout policy's logprobs and entropy (filled by the update itself when ``fused``), advantages
    [B], the sampler's logprobs (None: the sampler is the trainer) and the reference's (None: no KL)."""

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    old: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor
    sampler: torch.Tensor | None
    ref: torch.Tensor | None
    fused: bool


def grpo_micro_batch(
    policy, t: GRPOTargets, cfg, device, precision, log, rows: list[int], tokens: float, size: int
) -> tuple[float, float]:
    """Forward and backward of some rows of a minibatch of ``size`` rows and ``tokens`` completion
    tokens (every process's): the clipped objective, importance-weighted when the sampler is not the
    trainer, plus kl_coef x KL to the reference, aggregated as grpo.loss_aggregation says. Returns (its
    loss, its approximate KL)."""
    opts = cfg.grpo
    micro = select_rows(t.batch, rows, device)
    width = micro["completion_ids"].shape[1]
    with autocast(precision):
        logps, ent, _ = policy_outputs(policy, micro, cfg.rollout.temperature, entropy=t.fused)
        logps = logps.float()
    if t.fused:  # the policy has not moved before this one update: its forward gives the rollout logprobs
        t.old[rows, :width], t.entropy[rows, :width] = logps.detach().cpu(), ent.float().cpu()
    m, old_rows = columns(t.mask, rows, width, device), columns(t.old, rows, width, device)
    adv = t.advantages[rows].to(device).unsqueeze(1)
    token_loss, clipped = clipped_policy_loss(logps, old_rows, adv, opts.clip)
    if t.sampler is not None:
        cap = cfg.rollout.importance_cap
        weights = truncated_importance_weights(old_rows, columns(t.sampler, rows, width, device), cap)[0]
        token_loss = token_loss * weights
    if t.ref is not None:
        kl = kl_estimate(logps, columns(t.ref, rows, width, device), opts.kl_estimator)
        token_loss = token_loss + opts.kl_coef * kl
        log.add(kl_in_loss=masked_mean(kl, m).item())
    loss = aggregate_loss(token_loss, m, opts.loss_aggregation, size, int(tokens), cfg.rollout.max_new_tokens)
    loss.backward()
    kl_now = approx_kl(logps, old_rows, m).item()
    log.add(clip_fraction=masked_mean(clipped, m).item(), approx_kl=kl_now)
    return loss.item(), kl_now


def run_grpo(
    cfg: GRPOConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    from_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
) -> Path:
    from reward_models import build_reward

    started = time.time()
    output_dir = Path(output_dir)
    state = process_state()
    opts, k = cfg.grpo, cfg.rollout.samples_per_prompt

    # 1. Prompts, reward and starting stage: all checked before any model loads.
    model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    prompts, held_out, reports = load_prompts(cfg.data, tokenizer, cfg.seed)
    ptx = ptx_term(cfg, tokenizer)  # None unless ptx.coef > 0
    reports += [ptx.report] if ptx else []
    reward = build_reward(cfg.reward, referenced_dirs(cfg, recipe_name), cfg.model.trust_remote_code)
    monitors = build_monitors(cfg, recipe_name)  # judged by, never trained on
    source = source_stage(cfg, recipe_name, from_dir)

    # 2. Policy (+ reference on the same base), optimizer, output folder (resuming: the checkpoint's
    #    weights and optimizer), then the rollout engine, which serves the weights as they now are.
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    policy, reference, reference_line = load_policy(
        cfg, model_path, precision, source, needs_reference=opts.kl_coef > 0
    )
    trainable, total = trainable_summary(policy)
    steps = rl_steps(cfg, len(prompts))
    completions_per_step = cfg.rollout.prompts_per_step * k
    minibatch = min(opts.minibatch_size or completions_per_step, completions_per_step)
    updates = steps * opts.epochs * math.ceil(completions_per_step / minibatch)
    fused = update_gives_old_logprobs(opts.epochs, minibatch, completions_per_step)
    rank, processes = world()
    console.quiet = console.quiet or rank > 0  # process 0 prints the plan and the steps for all of them
    check_shares(cfg.rollout.prompts_per_step, processes)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, int(cfg.train.warmup_ratio * updates), updates)
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    loop = load_rl_checkpoint(resume_from, policy, optimizer, scheduler) if resume_from else {"step": 0}
    log = open_step_log(cfg, output_dir, f"{recipe_name}/grpo")
    engine = rollout_engine(
        cfg, policy, tokenizer, precision, prompts + held_out, max(completions_per_step, len(held_out))
    )
    try:  # closed on every exit: a vLLM engine holds a model-sized copy in /dev/shm
        check_longest_rollout_batch(policy, prompts, cfg, precision, tokenizer.pad_token_id)
        device = next(policy.parameters()).device
        pad = tokenizer.pad_token_id
        quantized = cfg.quantization.mode != "none"
        print_plan(
            f"align grpo - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}" if source else ""),
                "algorithm": f"{opts.algorithm}"
                + (", rewards / group std" if opts.algorithm == "grpo" and opts.scale_rewards else "")
                + f", clip {opts.clip}, loss per {opts.loss_aggregation}, kl_coef {opts.kl_coef} ({opts.kl_estimator})",
                "reward": getattr(reward, "name", str(cfg.reward)),
                "reference": reference_line,
                **({"ptx": ptx.describe()} if ptx else {}),
                "rollouts": f"{engine.describe()}; {cfg.rollout.prompts_per_step} prompts x {k} samples, temperature "
                f"{cfg.rollout.temperature}, "
                f"<= {cfg.rollout.max_new_tokens} new tokens",
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": f"{steps} RL steps x {opts.epochs} epoch(s) x {math.ceil(completions_per_step / minibatch)} "
                f"minibatch(es) = {updates} optimizer steps",
                "processes": f"{processes}: each rolls out {cfg.rollout.prompts_per_step // processes} prompts x {k} "
                f"samples a step with its own engine; gradients summed",
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

        stopped = collapsed = None
        alarm = DeadRunAlarm(opts.dead_steps, cfg.rollout.max_new_tokens)
        watch = CollapseWatch(cfg.checkup)
        alarm.streak = loop.get("dead_streak", 0)
        held = HeldOut(cfg, engine, policy, reward, monitors, held_out, loop, resume_from)  # the start
        policy.train()
        step = start = loop["step"]
        for step, batch_prompts in zip(
            range(start + 1, steps + 1), prompt_batches(prompts, cfg.rollout.prompts_per_step, cfg.seed, start)
        ):
            # 1. Rollout: this process's share of the step's prompts (all of them in one process).
            my_prompts = share(batch_prompts)
            with log.timed("generation"):
                rollouts = engine.generate([p.messages for p in my_prompts], sampling(cfg, step, rank))
            # 2. Score.
            with log.timed("scoring"):
                rewards = score(reward, my_prompts, rollouts)
            # 3. Advantages relative to each prompt's group (rollouts are prompt-major: k in a row).
            advantages = (
                group_advantages(rewards, k, opts.scale_rewards)
                if opts.algorithm == "grpo"
                else rloo_advantages(rewards, k)
            )
            # 4. The reference's logprobs (kl_coef > 0) and the rollout policy's, recomputed by the trainer -
            #    unless one update uses the rollouts once (one epoch, one minibatch): the policy has not moved
            #    before that update, so its own forward gives the rollout policy's logprobs (as TRL does).
            batch = rollout_batch(rollouts, pad)
            mask = batch["completion_mask"].float()
            with log.timed("logprobs"):
                old, entropy, ref, _ = rollout_logprobs(
                    policy,
                    reference,
                    batch,
                    cfg,
                    precision,
                    device,
                    policy_pass=not fused,
                    reference_pass=opts.kl_coef > 0,
                )
            if fused:
                old, entropy = torch.zeros(mask.shape), torch.zeros(mask.shape)  # filled by the update's forward
            # The sampler is not the trainer (vLLM): truncated importance weights make the gradient the trainer's.
            sampler = sampler_logprobs(cfg, engine, rollouts, mask.shape)
            # 5. Updates: epochs x minibatches, micro-batches accumulated into one optimizer step.
            targets = GRPOTargets(batch, mask, old, entropy, advantages, sampler, ref, fused)
            with log.timed("training"):
                minibatch_updates(
                    mask,
                    batch,
                    partial(grpo_micro_batch, policy, targets, cfg, device, precision, log),
                    epochs=opts.epochs,
                    minibatch=minibatch,
                    cfg=cfg,
                    step=step,
                    params=params,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    log=log,
                    ptx=partial(ptx.backward, policy, precision=precision) if ptx else None,
                )
            if ref is not None:  # the rollout policy's KL to the reference, with the loss's estimator
                log.add(kl=masked_mean(kl_estimate(old, ref, opts.kl_estimator), mask).item())
            if sampler is not None:
                log.add(
                    **importance_stats(*truncated_importance_weights(old, sampler, cfg.rollout.importance_cap), mask)
                )
            # 6. Sync the engine (verified), log, and stop a run that has nothing to learn from.
            step_rollouts, step_rewards, stats = sync_and_gather(
                engine, policy, log, rollouts, len(my_prompts), rewards, old
            )
            log.add(
                entropy=masked_mean(entropy, mask).item(),
                advantage_abs=advantages.abs().mean().item(),
                lr=scheduler.get_last_lr()[0],
            )
            hacked = held.after_step(step, log)  # monitor.every: held-out rewards, into this step's row
            record = log.write(step)
            log.samples(step, batch_prompts, step_rollouts, step_rewards)
            console.print(
                f"step {step}/{steps}: reward {stats['reward_mean']:.3f} (std {stats['reward_std']:.3f}), "
                f"length {stats['completion_length']:.0f}, truncated {stats['truncated_fraction']:.0%}, loss "
                f"{record['loss']:+.4f}"
            )
            stopped = alarm.check(
                stats["truncated_fraction"],
                stats["reward_std"],
                zero_advantage=summed(float((advantages != 0).any())) == 0,
            )
            collapsed = watch.check(stats["loop_fraction"], record.get("kl"))
            stopped = stopped or (f"collapse: {collapsed}" if collapsed else None)
            stopped = stopped or hacked  # monitor.on_hacking: stop
            if stopped:
                console.print(f"[yellow]stopping early: {stopped}[/]")
                break
            fault_point("grpo", "step", step)
            checkpoint_if_due(
                steps,
                output_dir,
                step,
                cfg,
                policy,
                optimizer,
                scheduler,
                {"dead_streak": alarm.streak, **held.state()},
                held.tensors(),
            )

        # 7. Held-out rewards after training (the last step's, when monitor.every measured it), then save.
        held.finish(step)
    finally:
        engine.close()
        log.close()
    if rank != 0:  # process 0 writes the stage; the others wait for it, then return together
        barrier()
        return output_dir
    checkup = with_training_alarm(run_checkup(cfg, policy, tokenizer, source, precision), collapsed)
    save_rl_stage(
        policy,
        tokenizer,
        output_dir,
        started,
        stage="grpo",
        kind="grpo",
        recipe=recipe_name,
        algorithm=opts.algorithm,
        from_stage=str(source) if source else None,
        base_model=cfg.model.name,
        base_model_path=str(model_path),
        precision=precision,
        quantization=cfg.quantization.mode if quantized else "none",
        engine=engine.name,
        steps=step,
        stopped_early=stopped,
        reward=getattr(reward, "name", str(cfg.reward)),
        data={r.name: r.as_dict() for r in reports},
        **held.manifest(step),
        resumed_from=str(resume_from) if resume_from else None,
        checkup=checkup,
        status=checkup_status(cfg, checkup),
        **(provenance or {}),
    )
    held.plot(output_dir, step)
    barrier()
    if held.line():
        console.print(held.line())
    raise_if_collapsed(cfg, checkup, output_dir)
    return output_dir


def update_gives_old_logprobs(epochs: int, minibatch: int, completions_per_step: int) -> bool:
    """True when the rollouts feed exactly one optimizer step (one epoch, one minibatch): the policy has
    not moved before it, so the update's own forward gives the rollout policy's logprobs and the separate
    no-grad pass would compute the same numbers again (about a fifth of a step, BENCHMARKS.md)."""
    return epochs == 1 and minibatch == completions_per_step
