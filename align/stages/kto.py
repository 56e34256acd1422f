"""KTO (`align kto`): preference optimisation from unpaired answers labelled desirable or not.

Written on transformers' Trainer beside the DPO stage, whose policy set-up and reference handling
it shares (align/stages/dpo.py): the reference is the starting policy, precomputed before step 0
or live, never a second base in memory. tests/test_kto.py checks the loss and gradients against
TRL's KTOTrainer on the same ids. The loss is ``align.losses.kto``.

Each example is scored twice per step: its own answer (with gradient) and a mismatched answer
(another row's, no gradient) whose policy/reference log-ratio, averaged over the batch, is the
reference point z0 (the KL estimate of the paper). See align/data/unpaired_data.py for how the
mismatched answers are chosen.

    1. data -> labelled answers     (row report; bad rows stop us here)
    2. model + adapter              (fresh, or the `from` stage's adapter, trainable)
    3. reference                    (precomputed logprobs, or how the live one is obtained)
    4. output folder + plan
    5. train
    6. save
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from align.config import KTOConfig
from align.console import console, print_plan
from align.data.batching import PairCollator
from align.data.unpaired_data import Labelled, load_labelled, with_kl_answers
from align.losses import kto
from align.models.adapters import reference_mode, trainable_summary
from align.models.loading import load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.stages.common import (
    adapter_line,
    loraplus_optimizer,
    loss_only_prediction,
    merge_stats,
    prepare_output,
    process_state,
    resume_line,
    source_stage,
    stage_callbacks,
    steps_line,
    total_steps,
    trainer_plan,
    training_arguments,
)
from align.stages.preference import ChosenWatch, completion_logps, reference_rows, start_policy, train_and_save

SIDES = ("completion", "kl")  # a row's own answer, then its mismatched answer (PairCollator's two halves)


def _half(batch: dict[str, torch.Tensor], first: bool) -> dict[str, torch.Tensor]:
    n = batch["input_ids"].shape[0] // 2
    rows = slice(0, n) if first else slice(n, 2 * n)
    return {key: batch[key][rows] for key in ("input_ids", "attention_mask", "labels")}


class KTOTrainer(Trainer):
    """transformers' Trainer with the KTO loss; kl and rewards/* metrics named as TRL names them."""

    def __init__(self, *args, options, reference_adapter: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.reference_adapter = reference_adapter
        self.model_accepts_loss_kwargs = False  # the loss is a mean over examples
        self._stats: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answers, mismatched = _half(inputs, True), _half(inputs, False)
        with torch.no_grad():
            policy_kl, _ = completion_logps(model, mismatched)
        policy, counts = completion_logps(model, answers)
        ref = inputs.get("ref_logps")
        if ref is None:
            unwrapped = self.accelerator.unwrap_model(model)
            with torch.no_grad(), reference_mode(unwrapped, self.reference_adapter):
                ref = torch.cat([completion_logps(model, answers)[0], completion_logps(model, mismatched)[0]])
        n = policy.shape[0]
        ref_answers, ref_kl = ref[:n].to(policy.dtype), ref[n:].to(policy.dtype)
        # z0, the reference point: the mean mismatched log-ratio over the whole batch (every process,
        # as TRL gathers it), clamped at 0 and without gradient
        z0 = self.accelerator.gather((policy_kl - ref_kl).mean().detach().reshape(1)).mean().clamp(min=0)
        desirable = inputs["label"]
        o = self.options
        loss = kto(policy, ref_answers, desirable, z0, o.beta, o.desirable_weight, o.undesirable_weight).mean()
        self._record(policy.detach(), ref_answers, desirable, counts, z0, "" if model.training else "eval_")
        return (loss, {}) if return_outputs else loss

    def _record(self, policy, ref, desirable, counts, z0, prefix: str) -> None:
        stats = self._stats
        stats[prefix + "kl"].append(z0.item())
        rewards = self.options.beta * (policy - ref)
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                stats[f"{prefix}rewards/{name}"].append(rewards[rows].mean().item())
                stats[f"{prefix}logps/{name}"].append(policy[rows].mean().item())
                # each kind alone, per token: the collapse watch (preference.ChosenWatch) reads both
                logratio = (policy - ref)[rows].sum() / counts[rows].sum()
                stats[f"{prefix}{name}_logratio_per_token"].append(logratio.item())
        if desirable.any() and not desirable.all():  # TRL's margin: the two kinds' mean rewards, where both occur
            stats[prefix + "rewards/margins"].append((rewards[desirable].mean() - rewards[~desirable].mean()).item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return loss_only_prediction(self, model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        merge_stats(self._stats, logs)
        super().log(logs, start_time)


def label_balance(cfg: KTOConfig, examples: list[Labelled]) -> str:
    """The plan's line on desirable vs undesirable examples and the paper's weight rule (its eq. 8:
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]); a warning when the weights fall outside it."""
    good = sum(e.desirable for e in examples)
    bad = len(examples) - good
    line = f"{good} desirable, {bad} undesirable"
    if not good or not bad:
        return line + " [yellow](only one kind: KTO learns from both, see kto.*_weight)[/]"
    ratio = cfg.kto.desirable_weight * good / (cfg.kto.undesirable_weight * bad)
    if 1 <= ratio <= 4 / 3:
        return line + f"; weighted ratio {ratio:.2f}, in the paper's [1, 4/3]"
    advice = (
        f"e.g. kto.undesirable_weight={cfg.kto.desirable_weight * good / bad:.2f}"
        if ratio < 1
        else f"e.g. kto.desirable_weight={cfg.kto.undesirable_weight * bad / good:.2f}"
    )
    return line + f" [yellow](weighted ratio {ratio:.2f} is outside the paper's [1, 4/3]: {advice})[/]"


def plan(cfg: KTOConfig, tokenizer) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan; reading every row is the validation."""
    train, held_out, _ = load_labelled(cfg.data, tokenizer, cfg.seed)
    return trainer_plan(cfg, train, held_out)


def run_kto(
    cfg: KTOConfig,
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

    # 1. Data, and each prompt's mismatched answer.
    with state.main_process_first():
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    train, held_out, reports = load_labelled(cfg.data, tokenizer, cfg.seed)
    rows = (
        with_kl_answers(train, cfg.seed, cfg.data.max_length),
        with_kl_answers(held_out, cfg.seed, cfg.data.max_length) if held_out else [],
    )
    steps = total_steps(cfg, len(train), state.num_processes)

    # 2. Model, 3. reference: as the DPO stage's.
    source = source_stage(cfg, recipe_name, from_dir)
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    quantized = cfg.quantization.mode != "none"
    live = cfg.kto.reference == "live"
    model, reference_adapter = start_policy(cfg, model_path, source, steps, live, precision)
    trainable, total = trainable_summary(model)
    collator = PairCollator(tokenizer.pad_token_id, sides=SIDES)
    train_rows, eval_rows, reference_line, reference_seconds = reference_rows(
        cfg, model, source, rows, collator, None, live, precision
    )

    # 4. Output folder and plan.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    if state.is_main_process:
        print_plan(
            f"align kto - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}" if source else ""),
                "loss": f"kto, beta {cfg.kto.beta}, weights desirable {cfg.kto.desirable_weight} / undesirable "
                f"{cfg.kto.undesirable_weight}",
                "labels": label_balance(cfg, train),
                "reference": reference_line,
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": steps_line(cfg, steps, state.num_processes, unit="answers"),
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

    # 5. Train (ChosenWatch stops it if the desirable answers' likelihood collapses), 6. save.
    has_eval = bool(eval_rows)
    watch = ChosenWatch(cfg.checkup)
    trainer = KTOTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision, has_eval, resume_from, f"{recipe_name}/kto"),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[*stage_callbacks(output_dir, cfg, model), watch],
        optimizers=(loraplus_optimizer(model, cfg), None),
        options=cfg.kto,
        reference_adapter=reference_adapter,
    )
    final_eval = train_and_save(
        cfg,
        trainer,
        train_rows,
        watch,
        tokenizer,
        source,
        reference_adapter,
        resume_from,
        started,
        output_dir,
        recipe=recipe_name,
        from_stage=str(source) if source else None,
        base_model=cfg.model.name,
        base_model_path=str(model_path),
        precision=precision,
        quantization=cfg.quantization.mode if quantized else "none",
        loss="kto",
        beta=cfg.kto.beta,
        reference=reference_line,
        reference_seconds=reference_seconds,
        data={r.name: r.as_dict() for r in reports},
        **(provenance or {}),
    )
    if final_eval is not None:
        if final_eval:
            console.print(
                f"held-out reward margin (desirable - undesirable) "
                f"{final_eval.get('eval_rewards/margins', float('nan')):.3f}, loss {final_eval['eval_loss']:.4f}"
            )
        console.print(f'next: align generate --model {output_dir} --prompt "..."')
    return output_dir
