"""Bradley-Terry reward model training (`align rm`).

On transformers' Trainer rather than TRL's RewardTrainer for the same reason as DPO: the pairs
and their truncation are ours, and the score must be read at the last real token (pad == eos
breaks the library's pooling, see align/models/reward.py).

    1. data -> pairs                (the same pair encoding as DPO; row report)
    2. model                        (base + scalar head, adapter with the head saved beside it)
    3. output folder + plan
    4. train                        (chosen and rejected scored in one forward, sharing the prompt's pass)
    5. held-out report              (accuracy, margin, score mean/std, score-length correlation)
    6. save
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from align.config import RecipeError, RewardConfig
from align.console import console, print_plan
from align.data.loading import DataError
from align.data.preference_data import load_pairs, pair_rows
from align.eval.reward_quality import pair_diagnostics
from align.losses import bradley_terry
from align.models.adapters import add_adapter, start_from_adapter, trainable_summary
from align.models.loading import load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.models.reward import load_reward_base, pair_scores
from align.stages.common import (
    adapter_line,
    check_longest_batch,
    final_evaluation,
    loraplus_optimizer,
    loss_only_prediction,
    merge_stats,
    pair_layout,
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


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


class RewardTrainer(Trainer):
    """Pairwise loss on scalar scores; held-out metrics over the whole eval set."""

    def __init__(self, *args, options, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.model_accepts_loss_kwargs = False
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._eval_scores: list[torch.Tensor] = []
        self._eval_lengths: list[torch.Tensor] = []
        self._eval_margins: list[torch.Tensor] = []
        self.held_out_diagnostics: dict = {}  # the last evaluation's (align/eval/reward_quality.py)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = pair_scores(model, inputs)
        n = scores.shape[0] // 2
        chosen, rejected = scores[:n], scores[n:]
        margin = inputs.get("margin") if self.options.margin else None
        loss = bradley_terry(chosen, rejected, margin, self.options.label_smoothing).mean()
        if self.options.center_coef:
            loss = loss + self.options.center_coef * ((chosen + rejected) ** 2).mean()
        prefix = "" if model.training else "eval_"
        self._stats[prefix + "accuracy"].append((chosen > rejected).float().mean().item())
        self._stats[prefix + "margin"].append((chosen - rejected).mean().item())
        if not model.training:
            self._eval_scores.append(scores.detach().cpu())
            self._eval_margins.append((chosen - rejected).detach().float().cpu())
            lengths = (
                inputs["answer_lengths"] if "answer_lengths" in inputs else (inputs["labels"] != IGNORE_INDEX).sum(-1)
            )
            self._eval_lengths.append(lengths.cpu())
        else:
            self._stats["score_mean"].append(scores.mean().item())
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return loss_only_prediction(self, model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = merge_stats(self._stats, logs)
        if prefix and self._eval_scores:
            scores, lengths = torch.cat(self._eval_scores), torch.cat(self._eval_lengths)
            self.held_out_diagnostics = pair_diagnostics(torch.cat(self._eval_margins).tolist())
            logs.update(
                {
                    "eval_score_mean": scores.mean().item(),
                    "eval_score_std": scores.std().item() if len(scores) > 1 else 0.0,
                    "eval_length_correlation": pearson(scores, lengths.float()),
                    # the scalars; the accuracy by margin quarter goes to the manifest only
                    **{
                        f"eval_{key}": self.held_out_diagnostics[key]
                        for key in ("accuracy_low", "accuracy_high", "calibration_error")
                    },
                }
            )
            self._eval_scores, self._eval_lengths, self._eval_margins = [], [], []
        super().log(logs, start_time)


def plan(cfg: RewardConfig, tokenizer) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan; reading every pair is the validation."""
    train, held_out, _ = load_pairs(cfg.data, tokenizer, cfg.seed)
    return trainer_plan(cfg, train, held_out)


def run_reward(
    cfg: RewardConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
    from_dir: str | Path | None = None,
) -> Path:
    from transformers import set_seed

    started = time.time()
    output_dir = Path(output_dir)
    state = process_state()

    # 1. Data.
    with state.main_process_first():
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    train_pairs, eval_pairs, reports = load_pairs(cfg.data, tokenizer, cfg.seed)
    if cfg.reward.margin and any(p.margin is None for p in train_pairs + eval_pairs):
        raise DataError("reward.margin is on, but some pairs have no numeric 'margin' field")
    steps = total_steps(cfg, len(train_pairs), state.num_processes)
    source = source_stage(cfg, recipe_name, from_dir)
    if source and cfg.adapter.method == "full":
        raise RecipeError(f"rm: from {source} starts an adapter; adapter.method=full trains the whole model instead")

    # 2. Model: base + scalar head; the adapter's task is SEQ_CLS so peft trains and saves the head.
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    full = cfg.adapter.method == "full"
    quantized = cfg.quantization.mode != "none" and not full
    model = load_reward_base(cfg.model, cfg.quantization, precision, model_path, full_finetune=full)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = add_adapter(
        model, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing, steps, task_type="SEQ_CLS"
    )
    if source:  # before any step; a resumed run then loads its checkpoint's weights over these
        copied = start_from_adapter(model, source / "adapter")
    model.config.use_cache = False
    trainable, total = trainable_summary(model)
    collator, layout = pair_layout(cfg, model, tokenizer.pad_token_id)

    # 3. Output folder and plan.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)
    if state.is_main_process:
        print_plan(
            f"align rm - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path}) + scalar head, scored at the last real token",
                "batches": layout,
                "adapter": adapter_line(cfg, quantized, precision, trainable, total)
                + (f"; starts from {source}'s adapter ({copied} tensors), the head new" if source else ""),
                "loss": "Bradley-Terry"
                + (" with margins" if cfg.reward.margin else "")
                + (f", centering {cfg.reward.center_coef}" if cfg.reward.center_coef else "")
                + (f", label smoothing {cfg.reward.label_smoothing}" if cfg.reward.label_smoothing else ""),
                **{f"data {r.name}": r.summary() for r in reports},
                "steps": steps_line(cfg, steps, state.num_processes, unit="pairs"),
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

    # 4. Train.
    eval_rows = pair_rows(eval_pairs)
    train_rows = pair_rows(train_pairs)
    trainer = RewardTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision, bool(eval_rows), resume_from, f"{recipe_name}/rm"),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=stage_callbacks(output_dir, cfg, model),
        optimizers=(loraplus_optimizer(model, cfg), None),
        options=cfg.reward,
    )
    check_longest_batch(trainer, train_rows)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # 5. Held-out report.
    final = final_evaluation(trainer, bool(eval_rows))

    # 6. Save: the adapter file carries the head (peft modules_to_save).
    if trainer.is_world_process_zero():
        held_out = {
            k.removeprefix("eval_"): v
            for k, v in final.items()
            if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
        }
        if held_out:  # accuracy over the pairs themselves (not a mean of batch means), its interval, calibration
            held_out.update(trainer.held_out_diagnostics)
        save_stage(
            trainer,
            tokenizer,
            output_dir,
            "model" if full else "adapter",
            started,
            stage="reward",
            kind="rm",
            recipe=recipe_name,
            base_model=cfg.model.name,
            from_stage=str(source) if source else None,
            base_model_path=str(model_path),
            precision=precision,
            quantization=cfg.quantization.mode if quantized else "none",
            data={r.name: r.as_dict() for r in reports},
            steps=result.global_step,
            train_loss=result.training_loss,
            eval_loss=final.get("eval_loss"),
            held_out=held_out,
            resumed_from=str(resume_from) if resume_from else None,
            **(provenance or {}),
        )
        if held_out:
            console.print(
                f"held-out: accuracy {held_out['accuracy']:.3f} (95% interval {held_out['accuracy_low']:.3f}-"
                f"{held_out['accuracy_high']:.3f}, {held_out['pairs']} pairs; calibration error "
                f"{held_out['calibration_error']:.3f}), margin {held_out['margin']:.3f}, "
                f"score mean {held_out['score_mean']:.3f} std {held_out['score_std']:.3f}, "
                f"score-length correlation {held_out['length_correlation']:+.3f}"
            )
        console.print(f"next: align rm score --model {output_dir} --data PAIRS.jsonl")
    return output_dir


def score_file(model_dir: str | Path, data: str | Path, output: str | Path | None = None, batch_size: int = 8) -> dict:
    """`align rm score`: pairs -> accuracy and margin; prompt/completion rows -> a scores JSONL file."""
    import json

    from align.data.formats import RowError
    from align.data.loading import read_records
    from align.data.preference_data import to_pair_messages
    from reward_models.learned import LearnedReward

    reward = LearnedReward(model_dir, batch_size=batch_size)
    records = [r for r in read_records(data) if r.data is not None]
    if not records:
        raise DataError(f"{data}: no readable rows")
    if "chosen" in records[0].data:
        prompts, chosen, rejected = [], [], []
        for record in records:
            try:
                prompt, good, bad = to_pair_messages(record.data)
            except RowError as err:
                raise DataError(f"{record.where}, field '{err.field}': {err}") from None
            prompts.append(prompt), chosen.append(good), rejected.append(bad)
        good_scores, bad_scores = reward(prompts, chosen), reward(prompts, rejected)
        margins = [g - b for g, b in zip(good_scores, bad_scores)]
        result = {**pair_diagnostics(margins), "margin": sum(margins) / len(margins)}
        console.print(
            f"{data}: {result['pairs']} pairs, accuracy {result['accuracy']:.3f} (95% interval "
            f"{result['accuracy_low']:.3f}-{result['accuracy_high']:.3f}), mean margin {result['margin']:.3f}, "
            f"calibration error {result['calibration_error']:.3f}"
        )
        for group in result["accuracy_by_margin"]:
            console.print(
                f"  |margin| {group['abs_margin_low']:.3f}-{group['abs_margin_high']:.3f}: accuracy "
                f"{group['accuracy']:.3f} ({group['pairs']} pairs)"
            )
        return result
    prompts, completions = [], []
    for record in records:
        row = record.data
        if "completion" not in row or "prompt" not in row:
            raise DataError(f"{record.where}: scoring needs prompt + completion (or prompt + chosen + rejected)")
        prompt = row["prompt"]
        prompts.append(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        completions.append(row["completion"])
    scores = reward(prompts, completions)
    output = Path(output) if output else Path(data).with_suffix(".scores.jsonl")
    if output.exists():
        raise FileExistsError(f"{output} exists; pass another --output")
    output.write_text(
        "".join(json.dumps({**r.data, "score": s}) + "\n" for r, s in zip(records, scores)), encoding="utf-8"
    )
    console.print(f"{len(scores)} scores written to {output}")
    return {"rows": len(scores), "output": str(output)}
