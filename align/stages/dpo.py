"""Direct preference optimisation (`align dpo`): DPO, cDPO, robust DPO, IPO, SimPO, + optional RPO term.

Written on transformers' Trainer rather than TRL's DPOTrainer because the pairs, their shared
prompt ids and their one-budget truncation are ours (align/data/preference_data.py) and TRL
re-tokenizes; tests/test_dpo.py checks our loss and gradients against TRL's DPOTrainer on the
same ids. The losses are the small functions in align/losses.py.

The reference policy is the starting policy, with no second copy of the base in memory:
- precomputed (default): its logprobs for every pair are computed once, before step 0;
- live: computed every step with the adapter disabled (fresh adapter) or with a frozen copy of
  the starting adapter (``from: sft``).

    1. data -> pairs                (row report; bad rows stop us here)
    2. model + adapter              (fresh, or the `from` stage's adapter, trainable)
    3. reference                    (precomputed logprobs, or how the live one is obtained)
    4. output folder + plan
    5. train                        (policy logprobs of chosen and rejected in one forward)
    6. save
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from align.config import DPOConfig, RecipeError
from align.console import console, print_plan
from align.data.batching import PairCollator
from align.data.preference_data import Pair, load_pairs, pair_rows
from align.losses import PreferenceLoss
from align.models.adapters import add_adapter, load_adapter_for_training, reference_mode, trainable_summary
from align.models.loading import autocast, load_base_model, load_tokenizer, resolve_precision
from align.models.output_layer import next_token_logps
from align.models.resolve import resolve_model
from align.stages.checkup import checkup_status, raise_if_collapsed, run_checkup, with_training_alarm
from align.stages.common import (
    adapter_line,
    check_longest_batch,
    loraplus_optimizer,
    loss_only_prediction,
    merge_stats,
    prepare_output,
    process_state,
    resume_line,
    save_stage,
    source_stage,
    stage_callbacks,
    steps_line,
    total_steps,
    trainer_plan,
    training_arguments,
)
from align.tokens import IGNORE_INDEX


def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed logprobs of the labelled (completion) tokens and their counts, [2B] each.

    The model runs from the first completion position on (``logits_to_keep``) and only the labelled
    positions' logits are made, a chunk at a time (``next_token_logps``): no [2B, T, V] tensor.
    """
    labels = batch["labels"]
    first = int((labels != IGNORE_INDEX).int().argmax(-1).min())  # earliest completion token in the batch (>= 1)
    targets = labels[:, first:]
    logps = next_token_logps(model, targets, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return logps.sum(-1), (targets != IGNORE_INDEX).sum(-1)


@torch.no_grad()
def precompute_reference(
    model, pairs: list[Pair], collator: PairCollator, batch_size: int, precision: str
) -> list[dict]:
    """Rows with the reference logprobs of each side, computed once with the starting policy."""
    rows = pair_rows(pairs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        with autocast(precision):
            sums, _ = completion_logps(model, batch)
        n = len(chunk)
        for row, chosen, rejected in zip(chunk, sums[:n].tolist(), sums[n:].tolist()):
            row["ref_chosen"], row["ref_rejected"] = chosen, rejected
    model.train(was_training)
    return rows


class PreferenceTrainer(Trainer):
    """transformers' Trainer with a preference loss; rewards/* metrics named as TRL names them."""

    def __init__(self, *args, options, reference_adapter: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.loss_kind = PreferenceLoss[options.loss]
        self.reference_adapter = reference_adapter
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs; the Trainer scales it for accumulation
        self._stats: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = completion_logps(model, inputs)
        n = sums.shape[0] // 2
        policy_chosen, policy_rejected = sums[:n], sums[n:]
        terms = dict(
            policy_chosen=policy_chosen,
            policy_rejected=policy_rejected,
            chosen_tokens=counts[:n],
            rejected_tokens=counts[n:],
            beta=self.options.beta,
            label_smoothing=self.options.label_smoothing,
            gamma=self.options.simpo_gamma,
        )
        ref = None
        if self.loss_kind.needs_reference:
            ref = inputs.get("ref_logps")
            if ref is None:
                unwrapped = self.accelerator.unwrap_model(model)
                with torch.no_grad(), reference_mode(unwrapped, self.reference_adapter):
                    ref, _ = completion_logps(model, inputs)
            terms.update(ref_chosen=ref[:n].to(sums.dtype), ref_rejected=ref[n:].to(sums.dtype))
        loss = self.loss_kind(**terms).mean()
        if self.options.rpo_alpha:
            # per-pair token-mean NLL of the chosen answer, then the mean over pairs: independent of how
            # the batch is split into micro-batches
            loss = loss + self.options.rpo_alpha * -(policy_chosen / counts[:n].clamp(min=1)).mean()
        self._record(
            policy_chosen.detach(), policy_rejected.detach(), ref, counts, prefix="" if model.training else "eval_"
        )
        return (loss, {}) if return_outputs else loss

    def _record(self, policy_chosen, policy_rejected, ref, counts, prefix: str) -> None:
        n = policy_chosen.shape[0]
        stats = self._stats
        stats[prefix + "logps/chosen"].append(policy_chosen.mean().item())
        stats[prefix + "logps/rejected"].append(policy_rejected.mean().item())
        if ref is not None:
            chosen = self.options.beta * (policy_chosen - ref[:n])
            rejected = self.options.beta * (policy_rejected - ref[n:])
            stats[prefix + "rewards/chosen"].append(chosen.mean().item())
            stats[prefix + "rewards/rejected"].append(rejected.mean().item())
            stats[prefix + "rewards/accuracies"].append((chosen > rejected).float().mean().item())
            stats[prefix + "rewards/margins"].append((chosen - rejected).mean().item())
            # per-token log-ratio to the reference on the dataset's answers: how far the policy moved
            # (not a KL: these answers are not sampled from the policy)
            logratio = torch.cat([policy_chosen - ref[:n], policy_rejected - ref[n:]]).sum() / counts.sum()
            stats[prefix + "logratio_per_token"].append(logratio.item())
            # the chosen answers alone: falling far below the start is DPO's way of wrecking a model
            stats[prefix + "chosen_logratio_per_token"].append(
                ((policy_chosen - ref[:n]).sum() / counts[:n].sum()).item()
            )
        else:
            margin = policy_chosen / counts[:n] - policy_rejected / counts[n:]
            stats[prefix + "rewards/accuracies"].append((margin > 0).float().mean().item())
            stats[prefix + "rewards/margins"].append(margin.mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return loss_only_prediction(self, model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        merge_stats(self._stats, logs)
        super().log(logs, start_time)


class ChosenWatch(TrainerCallback):
    """DPO's side of the collapse alarm: training stops when the policy's log-probability of the
    chosen answers, per token, falls more than checkup.max_chosen_drop below the reference's (both
    answers pushed down, the likelihood displacement that makes DPO'd models ramble)."""

    def __init__(self, checkup):
        self.checkup = checkup
        self.reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, where in (("eval_chosen_logratio_per_token", "held-out"), ("chosen_logratio_per_token", "training")):
            value = (logs or {}).get(key)
            if self.checkup.alarm and value is not None and value < -self.checkup.max_chosen_drop and not self.reason:
                self.reason = (
                    f"step {state.global_step}: the {where} chosen answers' log-probability fell {value:.3f} per token "
                    "below "
                    f"the start's (threshold checkup.max_chosen_drop {self.checkup.max_chosen_drop})"
                )
                control.should_training_stop = True


def plan(cfg: DPOConfig, tokenizer) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan; reading every pair is the validation."""
    train, held_out, _ = load_pairs(cfg.data, tokenizer, cfg.seed)
    return trainer_plan(cfg, train, held_out)


def run_dpo(
    cfg: DPOConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    from_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
) -> Path:
    from transformers import set_seed

    started = time.time()
    output_dir = Path(output_dir)
    state = process_state()
    loss_kind = PreferenceLoss[cfg.dpo.loss]

    # 1. Data.
    with state.main_process_first():
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    train_pairs, eval_pairs, reports = load_pairs(cfg.data, tokenizer, cfg.seed)
    steps = total_steps(cfg, len(train_pairs), state.num_processes)

    # 2. Model: a fresh adapter, or the `from` stage's adapter, trainable.
    source = source_stage(cfg, recipe_name, from_dir)
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    quantized = cfg.quantization.mode != "none"
    if cfg.adapter.method == "full":
        raise RecipeError("dpo: adapter.method=full would need a second full model as reference; use an adapter")
    base = load_base_model(cfg.model, cfg.quantization, precision, model_path)
    live = loss_kind.needs_reference and cfg.dpo.reference == "live"
    if source is None:
        model = add_adapter(base, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing, steps)
        reference_adapter, reference_line = None, "the base with the adapter disabled"
    else:
        model = load_adapter_for_training(
            base,
            source / "adapter",
            quantized,
            cfg.train.gradient_checkpointing,
            frozen_copy="reference" if live else None,
        )
        reference_adapter, reference_line = (
            ("reference" if live else None),
            f"the starting adapter from {source} (frozen)",
        )
    model.config.use_cache = False
    trainable, total = trainable_summary(model)

    # 3. Reference: computed once now, or every step - on the device training will use, so the
    #    reference runs exactly as the policy will at step 0.
    if torch.cuda.is_available() and not quantized:
        model.to(state.device)
    collator = PairCollator(tokenizer.pad_token_id)
    reference_started = time.time()
    if not loss_kind.needs_reference or live:
        reference_line = f"live every step: {reference_line}" if live else f"none ({cfg.dpo.loss} is reference-free)"
        train_rows, eval_rows = pair_rows(train_pairs), pair_rows(eval_pairs)
    else:
        reference_line = f"precomputed before step 0 from {reference_line}"
        if source is None:
            with model.disable_adapter():
                train_rows = precompute_reference(model, train_pairs, collator, cfg.train.batch_size, precision)
                eval_rows = precompute_reference(model, eval_pairs, collator, cfg.train.batch_size, precision)
        else:
            train_rows = precompute_reference(model, train_pairs, collator, cfg.train.batch_size, precision)
            eval_rows = precompute_reference(model, eval_pairs, collator, cfg.train.batch_size, precision)

    reference_seconds = round(time.time() - reference_started, 1)

    # 4. Output folder and plan.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    if state.is_main_process:
        print_plan(
            f"align dpo - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}" if source else ""),
                "loss": f"{cfg.dpo.loss}, beta {cfg.dpo.beta}"
                + (f", label smoothing {cfg.dpo.label_smoothing}" if cfg.dpo.label_smoothing else "")
                + (f", + {cfg.dpo.rpo_alpha} x SFT loss on chosen" if cfg.dpo.rpo_alpha else ""),
                "reference": reference_line,
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": steps_line(cfg, steps, state.num_processes, unit="pairs"),
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

    # 5. Train (ChosenWatch stops it if the chosen answers' likelihood collapses).
    has_eval = bool(eval_rows)
    watch = ChosenWatch(cfg.checkup)
    trainer = PreferenceTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision, has_eval, resume_from, f"{recipe_name}/dpo"),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[*stage_callbacks(output_dir, cfg, model), watch],
        optimizers=(loraplus_optimizer(model, cfg), None),
        options=cfg.dpo,
        reference_adapter=reference_adapter,
    )
    check_longest_batch(trainer, train_rows)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final_eval = trainer.evaluate() if has_eval else {}

    # 6. Save (a frozen reference copy is not part of the result).
    if trainer.is_world_process_zero():
        if reference_adapter:
            model.delete_adapter(reference_adapter)
        checkup = with_training_alarm(run_checkup(cfg, model, tokenizer, source, precision), watch.reason)
        save_stage(
            trainer,
            tokenizer,
            output_dir,
            "adapter",
            started,
            stage="dpo",
            kind="dpo",
            recipe=recipe_name,
            from_stage=str(source) if source else None,
            base_model=cfg.model.name,
            base_model_path=str(model_path),
            precision=precision,
            quantization=cfg.quantization.mode if quantized else "none",
            loss=cfg.dpo.loss,
            beta=cfg.dpo.beta,
            reference=reference_line,
            reference_seconds=reference_seconds,
            data={r.name: r.as_dict() for r in reports},
            steps=result.global_step,
            train_loss=result.training_loss,
            eval_loss=final_eval.get("eval_loss"),
            eval_reward_accuracy=final_eval.get("eval_rewards/accuracies"),
            resumed_from=str(resume_from) if resume_from else None,
            checkup=checkup,
            status=checkup_status(cfg, checkup),
            **(provenance or {}),
        )
        raise_if_collapsed(cfg, checkup, output_dir)
        if final_eval:
            console.print(
                f"held-out reward accuracy {final_eval.get('eval_rewards/accuracies', float('nan')):.3f}, loss "
                f"{final_eval['eval_loss']:.4f}"
            )
        console.print(f'next: align generate --model {output_dir} --prompt "..."')
    return output_dir
