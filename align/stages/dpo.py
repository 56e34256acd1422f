"""Preference optimisation on pairs: `align dpo` (DPO, cDPO, robust DPO, IPO, SimPO, + optional RPO
term) and `align orpo` (ORPO: the SFT loss plus an odds-ratio term, no reference), one runner.

Written on transformers' Trainer rather than TRL's DPOTrainer because the pairs, their shared
prompt ids and their one-budget truncation are ours (align/data/preference_data.py) and TRL
re-tokenizes; tests/test_dpo.py checks our loss and gradients against TRL's DPOTrainer on the
same ids (ORPO against TRL's ORPOTrainer). The losses are the small functions in align/losses.py.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from align.config import DPOConfig, ORPOConfig
from align.console import console, print_plan
from align.data.preference_data import load_pairs, pair_rows
from align.losses import PreferenceLoss, orpo_log_odds
from align.models.adapters import reference_mode, trainable_summary
from align.models.loading import load_tokenizer, resolve_precision
from align.models.output_layer import next_token_logps
from align.models.resolve import resolve_model
from align.stages.common import (
    adapter_line,
    loraplus_optimizer,
    loss_only_prediction,
    merge_stats,
    pair_layout,
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
from align.stages.preference import (
    ChosenWatch,
    completion_logps,
    reference_rows,
    start_policy,
    train_and_save,
)
from align.tokens import IGNORE_INDEX


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs of every real token after the first (prompt and completion), [2B, T-1], and which of
    them are completion tokens: ORPO's SFT term over the whole sequence, as TRL's ORPOTrainer scores it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    logps = next_token_logps(model, targets, input_ids=ids, attention_mask=mask)[0]
    return logps, batch["labels"][:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class PreferenceSettings:
    """What the preference trainer reads, from a dpo stage's `dpo:` section or an orpo stage's `orpo:`."""

    loss: str  # a PreferenceLoss name
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference: str = "precomputed"
    sft_on_prompt: bool = False  # orpo: the SFT term scores the prompt tokens too

    @classmethod
    def of(cls, cfg: DPOConfig | ORPOConfig) -> "PreferenceSettings":
        if cfg.kind == "orpo":
            return cls(loss="orpo", beta=cfg.orpo.beta, sft_on_prompt=cfg.orpo.sft_on_prompt)
        return cls(**cfg.dpo.model_dump())

    def describe(self) -> str:
        if self.loss == "orpo":
            where = "prompt and chosen answer" if self.sft_on_prompt else "chosen answer"
            return f"orpo: SFT loss on the {where} + {self.beta} x odds-ratio term"
        return (
            f"{self.loss}, beta {self.beta}"
            + (f", label smoothing {self.label_smoothing}" if self.label_smoothing else "")
            + (f", + {self.rpo_alpha} x SFT loss on chosen" if self.rpo_alpha else "")
        )


class PreferenceTrainer(Trainer):
    """transformers' Trainer with a preference loss; rewards/* metrics named as TRL names them."""

    def __init__(self, *args, options: PreferenceSettings, reference_adapter: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.loss_kind = PreferenceLoss[options.loss]
        self.reference_adapter = reference_adapter
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs; the Trainer scales it for accumulation
        self._stats: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = len(inputs["ends"]) // 2 if "ends" in inputs else inputs["input_ids"].shape[0] // 2
        sft = None
        if self.options.sft_on_prompt:
            logps, completion = sequence_logps(model, inputs)
            sums, counts = (logps * completion).sum(-1), completion.sum(-1)
            sft = -logps[:n].sum() / (inputs["attention_mask"][:n, 1:].sum()).clamp(min=1)
        else:
            sums, counts = completion_logps(model, inputs)
            if self.loss_kind is PreferenceLoss.orpo:
                sft = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
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
        if sft is not None:
            # ORPO's SFT half: the mean NLL over every scored token of the micro-batch's chosen rows (as
            # the ORPO authors' code and TRL take it), so a long answer weighs more than a short one
            loss = loss + sft
            self._record_orpo(sft.detach(), policy_chosen.detach(), policy_rejected.detach(), counts, model.training)
        if self.options.rpo_alpha:
            # per-pair token-mean NLL of the chosen answer, then the mean over pairs: independent of how
            # the batch is split into micro-batches
            loss = loss + self.options.rpo_alpha * -(policy_chosen / counts[:n].clamp(min=1)).mean()
        self._record(
            policy_chosen.detach(), policy_rejected.detach(), ref, counts, prefix="" if model.training else "eval_"
        )
        return (loss, {}) if return_outputs else loss

    def _record_orpo(self, sft, policy_chosen, policy_rejected, counts, training: bool) -> None:
        n, prefix = policy_chosen.shape[0], "" if training else "eval_"
        log_odds = orpo_log_odds(policy_chosen, policy_rejected, counts[:n], counts[n:])
        self._stats[prefix + "nll_loss"].append(sft.item())
        self._stats[prefix + "log_odds_chosen"].append(log_odds.mean().item())  # TRL's names
        self._stats[prefix + "log_odds_ratio"].append(torch.nn.functional.logsigmoid(log_odds).mean().item())

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
            # each side alone, per token: the collapse watch (preference.ChosenWatch) reads both
            stats[prefix + "chosen_logratio_per_token"].append(
                ((policy_chosen - ref[:n]).sum() / counts[:n].sum()).item()
            )
            stats[prefix + "rejected_logratio_per_token"].append(
                ((policy_rejected - ref[n:]).sum() / counts[n:].sum()).item()
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


def plan(cfg: DPOConfig | ORPOConfig, tokenizer) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan; reading every pair is the validation."""
    train, held_out, _ = load_pairs(cfg.data, tokenizer, cfg.seed)
    return trainer_plan(cfg, train, held_out)


def run_dpo(
    cfg: DPOConfig | ORPOConfig,
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
    options = PreferenceSettings.of(cfg)
    loss_kind = PreferenceLoss[options.loss]

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
    live = loss_kind.needs_reference and options.reference == "live"
    model, reference_adapter = start_policy(cfg, model_path, source, steps, live, precision)
    trainable, total = trainable_summary(model)

    # 3. Reference: computed once now, or every step.
    sft_on_prompt = "orpo.sft_on_prompt scores the prompt tokens, which a shared row holds once"
    collator, layout = pair_layout(cfg, model, tokenizer.pad_token_id, sft_on_prompt if options.sft_on_prompt else "")
    train_rows, eval_rows, reference_line, reference_seconds = reference_rows(
        cfg,
        model,
        source,
        (pair_rows(train_pairs), pair_rows(eval_pairs)),
        collator,
        None if loss_kind.needs_reference else f"none ({options.loss} is reference-free)",
        live,
        precision,
    )

    # 4. Output folder and plan.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    if state.is_main_process:
        print_plan(
            f"align {cfg.kind} - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}" if source else ""),
                "loss": options.describe(),
                "batches": layout,
                "reference": reference_line,
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": steps_line(cfg, steps, state.num_processes, unit="pairs"),
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

    # 5. Train (ChosenWatch stops it if the chosen answers' likelihood collapses), 6. save.
    has_eval = bool(eval_rows)
    watch = ChosenWatch(cfg.checkup)
    trainer = PreferenceTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision, has_eval, resume_from, f"{recipe_name}/{cfg.kind}"),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[*stage_callbacks(output_dir, cfg, model), watch],
        optimizers=(loraplus_optimizer(model, cfg), None),
        options=options,
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
        loss=options.loss,
        beta=options.beta,
        reference=reference_line,
        reference_seconds=reference_seconds,
        data={r.name: r.as_dict() for r in reports},
        **(provenance or {}),
    )
    if final_eval is not None:
        if final_eval:
            console.print(
                f"held-out reward accuracy {final_eval.get('eval_rewards/accuracies', float('nan')):.3f}, loss "
                f"{final_eval['eval_loss']:.4f}"
            )
        console.print(f'next: align generate --model {output_dir} --prompt "..."')
    return output_dir
