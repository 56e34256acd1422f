"""`align ppo`: RLHF with PPO and a value head (Ouyang et al. 2022; Ziegler et al. 2019).

TRL no longer ships PPO, so the loop is written here, following the "N implementation details
of RLHF with PPO" checklist. Each step:
  1. rollout    - a batch of prompts through the rollout engine (hf or vLLM)
  2. score      - the recipe's reward; optional missing-EOS penalty, running normalisation, clipping
  3. recompute  - the trainer's logprobs of the sampled tokens (never the engine's), the reference's
                  (adapter disabled / frozen starting adapter: no second base) and the values; a vLLM
                  sampler's tokens get truncated importance weights min(pi_trainer / pi_vllm, cap)
  4. rewards    - per token: -kl_coef x KL estimate, plus the score on the last completion token
  5. GAE        - advantages and returns (gamma, lambda); advantages whitened over the batch
  6. update     - epochs x minibatches of the (weighted) clipped policy loss + vf_coef x clipped value loss;
                  an epoch loop stops early when the approximate KL passes early_stop_kl
  7. sync + log - the engine takes the new weights (verified); the KL controller adapts kl_coef
Before the first step, every monitor.every steps and after the last: one answer per held-out prompt,
scored by the training reward (the proxy) and by the monitor rewards, never trained on (as GRPO).
The value head is a linear layer on the policy's final hidden state, trained with its own
learning rate and saved beside the adapter as value_head.safetensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import get_scheduler, set_seed

from align.config import PPOConfig
from align.console import console, print_plan
from align.data.prompt_data import load_prompts
from align.faults import fault_point
from align.losses import (
    KLController,
    RunningScale,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    per_token_rewards,
    whiten,
)
from align.models.adapters import trainable_summary
from align.models.loading import autocast, load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.models.reward import value_head_for
from align.rollout.scoring import policy_outputs, rollout_batch
from align.stages.checkup import checkup_status, raise_if_collapsed, run_checkup, with_training_alarm
from align.stages.common import adapter_line, prepare_output, process_state, referenced_dirs, resume_line, source_stage
from align.stages.monitors import HeldOut, build_monitors
from align.stages.ptx import ptx_term
from align.stages.ranks import (
    barrier,
    gathered,
    my_rows,
    share,
    summed,
    whole_step,
    world,
)
from align.stages.rl_checkpoints import checkpoint_if_due, load_rl_checkpoint, save_rl_stage
from align.stages.rl_log import CollapseWatch, DeadRunAlarm, open_step_log, sync_and_gather
from align.stages.rl_setup import (
    check_longest_rollout_batch,
    check_shares,
    importance_weights,
    load_policy,
    prompt_batches,
    rl_steps,
)
from align.stages.rl_update import columns, minibatch_updates, rollout_logprobs, select_rows
from align.stages.rollouts import rollout_engine, sampling, score

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOTargets:
    """What one step's update trains towards, a row per rollout: the rollout batch, and [B, T]
    mask, sampling-time logprobs and values, advantages, returns, importance weights (or None)."""

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    old: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    is_weights: torch.Tensor | None


def ppo_micro_batch(
    policy, value_head, t: PPOTargets, cfg, device, precision, log, rows: list[int], tokens: float, size: int
) -> tuple[float, float]:
    """Forward and backward of some rows of a minibatch (``size`` rows and ``tokens`` completion tokens,
    every process's): the clipped policy loss (importance-weighted when the sampler is not the trainer)
    plus vf_coef x the clipped value loss, over the minibatch's tokens. Returns (its loss, its
    approximate KL)."""
    opts = cfg.ppo
    tokens = torch.tensor(tokens).clamp(min=1)
    micro = select_rows(t.batch, rows, device)
    with autocast(precision):
        logps, _, values = policy_outputs(policy, micro, cfg.rollout.temperature, value_head)
    width = micro["completion_ids"].shape[1]
    m, old_rows, logps = columns(t.mask, rows, width, device), columns(t.old, rows, width, device), logps.float()
    advantages = columns(t.advantages, rows, width, device)
    policy_loss, clipped = clipped_policy_loss(logps, old_rows, advantages, opts.clip)
    if t.is_weights is not None:
        policy_loss = policy_loss * columns(t.is_weights, rows, width, device)
    value_loss, value_clipped = clipped_value_loss(
        values.float(),
        columns(t.old_values, rows, width, device),
        columns(t.returns, rows, width, device),
        opts.value_clip,
    )
    loss = ((policy_loss + opts.vf_coef * value_loss) * m).sum() / tokens.to(device)
    loss.backward()
    kl_now = approx_kl(logps, old_rows, m).item()
    log.add(
        policy_loss=masked_mean(policy_loss, m).item(),
        value_loss=masked_mean(value_loss, m).item(),
        clip_fraction=masked_mean(clipped, m).item(),
        value_clip_fraction=masked_mean(value_clipped, m).item(),
        approx_kl=kl_now,
    )
    return loss.item(), kl_now


def run_ppo(
    cfg: PPOConfig,
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
    opts = cfg.ppo

    # 0. Prompts, reward and starting stage: all checked before any model loads.
    model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    prompts, held_out, reports = load_prompts(cfg.data, tokenizer, cfg.seed)
    ptx = ptx_term(cfg, tokenizer)  # None unless ptx.coef > 0
    reports += [ptx.report] if ptx else []
    reward_stages = referenced_dirs(cfg, recipe_name)
    reward = build_reward(cfg.reward, reward_stages, cfg.model.trust_remote_code)
    monitors = build_monitors(cfg, recipe_name)  # judged by, never trained on
    source = source_stage(cfg, recipe_name, from_dir)

    # Policy + reference on one base, value head, optimizer (two learning rates), engine.
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    needs_reference = opts.kl_coef > 0 or opts.target_kl is not None
    policy, reference, reference_line = load_policy(cfg, model_path, precision, source, needs_reference)
    value_head = value_head_for(policy, opts.value_head_init, next(iter(reward_stages.values()), None))
    trainable, total = trainable_summary(policy)
    steps = rl_steps(cfg, len(prompts))
    completions_per_step = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    minibatch = min(opts.minibatch_size or completions_per_step, completions_per_step)
    updates = steps * opts.epochs * math.ceil(completions_per_step / minibatch)
    rank, processes = world()
    check_shares(cfg.rollout.prompts_per_step, processes)
    console.quiet = console.quiet or rank > 0  # process 0 prints the plan and the steps for all of them
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": policy_params, "lr": cfg.train.lr},
            {"params": list(value_head.parameters()), "lr": opts.value_lr or cfg.train.lr},
        ],
        weight_decay=cfg.train.weight_decay,
    )
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, int(cfg.train.warmup_ratio * updates), updates)
    kl_control = KLController(opts.kl_coef, opts.target_kl, opts.kl_horizon)
    scale = RunningScale()
    # Output folder; resuming restores weights, value head, optimizer and the loop's state before
    # the rollout engine starts, so the engine serves the restored weights.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    loop = {"step": 0}
    if resume_from:
        from safetensors.torch import load_file

        loop = load_rl_checkpoint(resume_from, policy, optimizer, scheduler)
        value_head.load_state_dict(load_file(str(resume_from / VALUE_HEAD_FILE)))
        kl_control.coef = loop["kl_coef"]
        scale.count, scale.mean, scale.m2 = loop["scale"]
    log = open_step_log(cfg, output_dir, f"{recipe_name}/ppo")
    engine = rollout_engine(
        cfg, policy, tokenizer, precision, prompts + held_out, max(completions_per_step, len(held_out))
    )
    try:  # closed on every exit: a vLLM engine holds a model-sized copy in /dev/shm
        check_longest_rollout_batch(policy, prompts, cfg, precision, tokenizer.pad_token_id, value_head)
        device = next(policy.parameters()).device
        quantized = cfg.quantization.mode != "none"
        print_plan(
            f"align ppo - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}" if source else ""),
                "value head": f"linear on the final hidden state, init {opts.value_head_init}, lr "
                f"{opts.value_lr or cfg.train.lr}",
                "objective": f"clip {opts.clip}, value clip {opts.value_clip}, vf_coef {opts.vf_coef}, GAE gamma "
                f"{opts.gamma} lambda {opts.lam}, "
                f"KL {opts.kl_estimator} x {opts.kl_coef}"
                + (f" adapting to {opts.target_kl}" if opts.target_kl else " (fixed)"),
                "reward": getattr(reward, "name", str(cfg.reward)),
                "reference": reference_line,
                **({"ptx": ptx.describe()} if ptx else {}),
                "rollouts": f"{engine.describe()}; {cfg.rollout.prompts_per_step} prompts x "
                f"{cfg.rollout.samples_per_prompt}, "
                f"temperature {cfg.rollout.temperature}, <= {cfg.rollout.max_new_tokens} new tokens",
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": f"{steps} RL steps x {opts.epochs} epoch(s) x {math.ceil(completions_per_step / minibatch)} "
                f"minibatch(es) = {updates} optimizer steps",
                "processes": f"{processes}: each rolls out {cfg.rollout.prompts_per_step // processes} prompts x "
                f"{cfg.rollout.samples_per_prompt} samples a step with its own engine; gradients summed",
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

        alarm = DeadRunAlarm(opts.dead_steps, cfg.rollout.max_new_tokens)
        alarm.streak = loop.get("dead_streak", 0)
        stopped = collapsed = None
        watch = CollapseWatch(cfg.checkup)
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
                raw_scores = score(reward, my_prompts, rollouts)
                scores = raw_scores.clone()
                if opts.missing_eos_penalty is not None:
                    scores -= opts.missing_eos_penalty * torch.tensor([float(r.truncated) for r in rollouts])
                if opts.normalize_rewards:
                    scale.update(torch.tensor(gathered(scores.tolist())))  # every process's scores
                    scores = scores / scale.std
                if opts.reward_clip is not None:
                    scores = scores.clamp(-opts.reward_clip, opts.reward_clip)
            # 3. Recompute logprobs, reference logprobs and values with the trainer, without gradients.
            batch = rollout_batch(rollouts, tokenizer.pad_token_id)
            mask = batch["completion_mask"].float()
            with log.timed("logprobs"):
                old, entropy, ref, old_values = rollout_logprobs(
                    policy,
                    reference,
                    batch,
                    cfg,
                    precision,
                    device,
                    policy_pass=True,
                    reference_pass=needs_reference,
                    value_head=value_head,
                )
            ref = old if ref is None else ref  # no reference: the KL term is exactly 0
            # The sampler is not the trainer (vLLM): truncated importance weights make the gradient the trainer's.
            is_weights = importance_weights(cfg, engine, rollouts, old, mask, log)
            # 4. Per-token rewards: the KL penalty on every token, the score on the last one.
            kl = kl_estimate(old, ref, opts.kl_estimator) * mask
            token_rewards = per_token_rewards(kl, scores, mask, kl_control.coef)
            if opts.whiten_rewards:  # over the whole step's tokens, every process's rows
                whitened = whiten(whole_step(token_rewards), whole_step(mask), shift_mean=False)
                token_rewards = my_rows(whitened, token_rewards)
            # 5. GAE and whitened advantages.
            advantages, returns = gae(token_rewards, old_values, mask, opts.gamma, opts.lam)
            advantages = my_rows(whiten(whole_step(advantages), whole_step(mask)), advantages)
            # 6. PPO epochs over minibatches; micro-batches accumulate into one optimizer step.
            targets = PPOTargets(batch, mask, old, old_values, advantages, returns, is_weights)
            with log.timed("training"):
                minibatch_updates(
                    mask,
                    batch,
                    partial(ppo_micro_batch, policy, value_head, targets, cfg, device, precision, log),
                    epochs=opts.epochs,
                    minibatch=minibatch,
                    cfg=cfg,
                    step=step,
                    params=policy_params + list(value_head.parameters()),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    log=log,
                    ptx=partial(ptx.backward, policy, precision=precision) if ptx else None,
                    early_stop_kl=opts.early_stop_kl,
                )
            # 7. Sync, adapt the KL coefficient, log; stop a run with no learning signal.
            step_rollouts, step_scores, stats = sync_and_gather(
                engine, policy, log, rollouts, len(my_prompts), raw_scores, old
            )
            kl_per_completion = summed(kl.sum().item()) / (len(rollouts) * processes)
            log.add(
                score_mean=scores.mean().item(),
                kl=kl_per_completion,
                kl_coef=kl_control.coef,
                entropy=masked_mean(entropy, mask).item(),
                explained_variance=explained_variance(old_values, returns, mask),
                value_mean=masked_mean(old_values, mask).item(),
                lr=scheduler.get_last_lr()[0],
            )
            kl_control.update(kl_per_completion, len(step_rollouts))
            hacked = held.after_step(step, log)  # monitor.every: held-out rewards, into this step's row
            record = log.write(step)
            log.samples(step, batch_prompts, step_rollouts, step_scores)
            console.print(
                f"step {step}/{steps}: reward {stats['reward_mean']:.3f} (std {stats['reward_std']:.3f}), KL "
                f"{kl_per_completion:.4f}, "
                f"length {stats['completion_length']:.0f}, truncated {stats['truncated_fraction']:.0%}, loss "
                f"{record['loss']:+.4f}"
            )
            stopped = alarm.check(stats["truncated_fraction"], stats["reward_std"])
            # PPO logs KL per completion (the penalty's sum); the alarm's threshold is per token
            collapsed = watch.check(stats["loop_fraction"], kl_per_completion / max(stats["completion_length"], 1.0))
            stopped = stopped or (f"collapse: {collapsed}" if collapsed else None)
            stopped = stopped or hacked  # monitor.on_hacking: stop
            if stopped:
                console.print(f"[yellow]stopping early: {stopped}[/]")
                break
            fault_point("ppo", "step", step)
            checkpoint_if_due(
                steps,
                output_dir,
                step,
                cfg,
                policy,
                optimizer,
                scheduler,
                {
                    "dead_streak": alarm.streak,
                    "kl_coef": kl_control.coef,
                    "scale": [scale.count, scale.mean, scale.m2],
                    **held.state(),
                },
                {VALUE_HEAD_FILE: value_head.state_dict(), **held.tensors()},
            )

        # 8. Held-out rewards after training (raw, before any normalisation), then save.
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
        extra_files={VALUE_HEAD_FILE: value_head.state_dict()},
        stage="ppo",
        kind="ppo",
        recipe=recipe_name,
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
        final_kl_coef=kl_control.coef,
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
