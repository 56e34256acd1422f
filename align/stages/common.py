"""Small pieces every training stage uses: processes, the output folder, Trainer arguments, saving."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from align.artifacts import (
    ROLLOUTS_FILE,
    atomic_folder,
    check_resume_config,
    last_complete_checkpoint,
    prepare_run_folder,
    remove_staging_leftovers,
    stage_folder,
    trim_metrics,
    write_atomic,
    write_manifest,
)
from align.config import RecipeError, StageConfig, dump_config, stage_references
from align.console import console
from align.model_card import write_card
from align.models.loading import read_stage_manifest
from align.stages.registry import POLICY_KINDS
from align.tracking import plot_losses, read_metrics, report_to


def process_state():
    """accelerate's view of the processes; cpu=True is what makes torchrun's variables count on CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def total_steps(cfg: StageConfig, rows: int, world: int) -> int:
    per_epoch = math.ceil(rows / (cfg.train.batch_size * cfg.train.grad_accum * world))
    return cfg.train.max_steps or math.ceil(per_epoch * cfg.train.epochs)


def trainer_plan(cfg: StageConfig, train: list, held_out: list) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan table, for a stage trained by a transformers Trainer."""
    return f"{len(train)} + {len(held_out)} held out", f"{total_steps(cfg, len(train), 1)} steps"


def prepare_output(
    state, output_dir: Path, cfg: StageConfig, overwrite: bool, resume: bool, together: bool = True
) -> Path | None:
    """Claim the output folder once nothing else can fail: never clobber an earlier run, resume
    only a run of the same config. Returns the checkpoint to resume from, if any. ``together``: every
    process runs the stage and waits here for the claim (False: process 0 runs it alone)."""
    resume_from = last_complete_checkpoint(output_dir / "checkpoints") if resume else None
    if state.is_main_process:
        prepare_run_folder(output_dir, overwrite=overwrite, resume=resume, kind=cfg.kind)
        if resume:
            check_resume_config(output_dir, cfg.model_dump(mode="json", by_alias=True))
            remove_staging_leftovers(output_dir)
            last_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
            for logged in ("metrics.jsonl", ROLLOUTS_FILE):  # the steps after the checkpoint run again
                trim_metrics(output_dir / logged, last_step)
        write_atomic(output_dir / "config.yaml", dump_config(cfg))
    if together:
        state.wait_for_everyone()
    return resume_from


def elsewhere(state) -> bool:
    """True in every process but 0, for the stages one process runs alone (eval, sample): under torchrun
    the others return at once (`align run` waits for process 0 at the end of every stage)."""
    return not state.is_main_process


def training_arguments(
    cfg: StageConfig, output_dir: Path, precision: str, has_eval: bool, resume_from: Path | None, run_name: str
):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1,
        warmup_steps=cfg.train.warmup_ratio,
        lr_scheduler_type=cfg.train.lr_scheduler,
        weight_decay=cfg.train.weight_decay,
        optim=cfg.train.optim,
        max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=cfg.train.logging_steps,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if has_eval and cfg.train.eval_steps else "no",
        eval_steps=cfg.train.eval_steps,
        eval_on_start=has_eval and resume_from is None,  # the baseline the held-out metrics are judged against
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to(cfg.tracking),
        project=cfg.tracking.project,
        run_name=run_name,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # enabled on the model before the adapter wraps it
        ddp_find_unused_parameters=False,  # every trainable weight is used; the search breaks checkpointing
    )


def stage_callbacks(output_dir: Path, cfg: StageConfig, model) -> list:
    """metrics.jsonl, checkpoint completion markers, and AdaLoRA's rank budget when it is used."""
    from align.models.adapters import AdaLoraBudget
    from align.tracking import CheckpointMarker, FaultPoints, MetricsFile

    callbacks = [MetricsFile(output_dir / "metrics.jsonl"), FaultPoints(cfg.kind), CheckpointMarker()]
    if cfg.adapter.method == "adalora":
        callbacks.append(AdaLoraBudget(model))
    return callbacks


def loraplus_optimizer(model, cfg: StageConfig):
    """LoRA+ (B matrices at ratio x the learning rate) through peft's helper; None = Trainer default."""
    if cfg.lora.loraplus_lr_ratio is None or cfg.adapter.method != "lora":
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=cfg.train.lr,
        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
        weight_decay=cfg.train.weight_decay,
    )


def adapter_line(cfg: StageConfig, quantized: bool, precision: str, trainable: int, total: int) -> str:
    if cfg.adapter.method == "full":
        method = "full fine-tuning"
    else:
        extras = [name for name, on in (("rslora", cfg.lora.use_rslora), ("dora", cfg.lora.use_dora)) if on]
        method = f"{cfg.adapter.method} r={cfg.lora.r} alpha={cfg.lora.alpha}" + (
            f" ({', '.join(extras)})" if extras else ""
        )
        if cfg.lora.loraplus_lr_ratio:
            method += f", LoRA+ ratio {cfg.lora.loraplus_lr_ratio} (AdamW)"
    base = (
        f"{cfg.quantization.mode} 4-bit base"
        if quantized and cfg.quantization.mode != "int8"
        else ("int8 base" if quantized else "unquantized base")
    )
    share = 100 * trainable / max(total, 1)
    return f"{method} on {base}, {precision}; trainable {trainable:,} of {total:,} parameters ({share:.2f}%)"


def resume_line(resume_from: Path | None, resume: bool) -> str:
    return str(resume_from) if resume_from else ("no complete checkpoint; starting fresh" if resume else "-")


def steps_line(cfg: StageConfig, steps: int, world: int, unit: str = "examples") -> str:
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    return (
        f"{steps} optimizer steps x {per_step} {unit} "
        f"(batch {cfg.train.batch_size} x accum {cfg.train.grad_accum} x {world} process(es))"
    )


def loss_only_prediction(trainer, model, inputs):
    """Trainer.prediction_step for stages whose evaluation is their loss (and the stats it records)."""
    inputs = trainer._prepare_inputs(inputs)
    with torch.no_grad(), trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, inputs)
    return loss.detach(), None, None


def merge_stats(stats: dict[str, list[float]], logs: dict[str, float]) -> str:
    """Move the per-batch stats recorded since the last log into ``logs`` as means: eval_ ones into
    an evaluation's log, the others into a training log. Returns the prefix that was merged."""
    prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
    for key in [k for k in stats if k.startswith(prefix) and (prefix or not k.startswith("eval_"))]:
        values = stats.pop(key)
        logs[key] = sum(values) / len(values)
    return prefix


def save_stage(trainer, tokenizer, output_dir: Path, artifact: str, started: float, **manifest) -> dict:
    """Adapter (or whole model) atomically, then the loss curve, then the manifest - last, so a
    manifest means the stage is complete. Main process only."""
    with atomic_folder(output_dir / artifact) as staging:
        trainer.model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
    evals = [r for r in read_metrics(output_dir / "metrics.jsonl") if "eval_loss" in r]
    manifest = write_manifest(
        output_dir,
        status=manifest.pop("status", "complete"),
        artifact=artifact,
        eval_loss_start=evals[0]["eval_loss"] if evals else None,
        seconds=round(time.time() - started, 1),
        **manifest,
    )
    write_card(output_dir)  # from the manifest just written (align/model_card.py)
    console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir}")
    return manifest


def source_stage(cfg, recipe_name: str, from_dir: str | Path | None) -> Path | None:
    """The finished stage the policy starts from: --from-dir, else runs/<recipe>/<from>."""
    if from_dir is None and cfg.from_stage is None:
        return None
    folder = Path(from_dir) if from_dir else stage_folder(recipe_name, cfg.from_stage)
    manifest = read_stage_manifest(folder)
    if manifest.get("status") != "complete" or manifest.get("artifact") != "adapter":
        raise RecipeError(f"{folder}: the stage to start from must be finished and hold an adapter (run it first)")
    if manifest.get("kind") not in POLICY_KINDS:
        raise RecipeError(
            f"{folder} is a {manifest.get('kind')} stage; "
            f"a policy starts from a stage of kind {' or '.join(POLICY_KINDS)}"
        )
    if manifest.get("base_model") != cfg.model.name:
        raise RecipeError(f"{folder} was trained on {manifest.get('base_model')!r}, this stage uses {cfg.model.name!r}")
    return folder


class BatchTooLarge(MemoryError):
    pass


@contextmanager
def trial_step(batch: str, advice: str) -> Iterator[None]:
    """Around a forward + backward that must leave no trace and must fail clearly: the random state
    (dropout) is restored afterwards, and running out of memory becomes BatchTooLarge naming
    ``batch`` and what to lower (``advice``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if (
            not isinstance(error, torch.OutOfMemoryError)
            and "alloc" not in str(error)
            and "out of memory" not in str(error)
        ):
            raise
        raise BatchTooLarge(f"{batch} does not fit in memory: {str(error).splitlines()[0][:200]}. {advice}") from None


def pair_layout(cfg: StageConfig, model, pad_token_id: int, unavailable: str = ""):
    """(collator, plan line) of a pair stage: one row a pair sharing its prompt where data.shared_prompt is
    on and the model's attention takes the mask, else two padded rows a pair, saying why."""
    from align.data.batching import PairCollator, SharedPromptCollator
    from align.models.attention import shared_prompt_obstacle

    why = unavailable or shared_prompt_obstacle(model)
    if cfg.data.shared_prompt and not why:
        return SharedPromptCollator(pad_token_id), "one row a pair, the prompt run once for both answers"
    return PairCollator(pad_token_id), "two padded rows a pair" + (f" ({why})" if cfg.data.shared_prompt else "")


def row_length(row: dict, shared_prompt: bool = False) -> int:
    """Tokens of a training row: an SFT row's ids, or a pair's (or KTO row's) prompt plus its longest
    answer - or, laid out in one row (SharedPromptCollator), its prompt, both answers and the copied token."""
    if "input_ids" in row:
        return len(row["input_ids"])
    answers = [len(ids) for key, ids in row.items() if key.endswith("_ids") and key != "prompt_ids"]
    if shared_prompt:
        return len(row["prompt_ids"]) + sum(answers) + 1
    return len(row.get("prompt_ids", [])) + max(answers, default=0)


def check_longest_batch(trainer, rows: list[dict]) -> None:
    """RELIABILITY 20: one forward + backward on the longest batch before step 0, so running out of
    memory shows now, not hours in. Leaves no trace: gradients are dropped, the random state
    (dropout) is restored and any statistics the trainer collected are cleared."""
    if not rows:
        return
    from align.data.batching import SharedPromptCollator

    shared = isinstance(trainer.data_collator, SharedPromptCollator)
    size = min(trainer.args.per_device_train_batch_size, len(rows))
    longest = sorted(range(len(rows)), key=lambda i: -row_length(rows[i], shared))[:size]
    tokens = row_length(rows[longest[0]], shared)
    model = trainer.model
    was_training = model.training
    model.train()  # as in training: dropout on, activations kept for backward
    try:
        with trial_step(
            f"the longest batch ({size} rows of up to {tokens} tokens)",
            "Lower train.batch_size (raise train.grad_accum to keep the step), lower data.max_length, "
            "or set train.gradient_checkpointing=true",
        ):
            batch = trainer._prepare_inputs(trainer.data_collator([rows[i] for i in longest]))
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, batch)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        stats = getattr(trainer, "_stats", None)
        if stats is not None:
            stats.clear()
    console.print(f"[dim]memory check: forward + backward on the longest batch ({size} x {tokens} tokens) fits[/]")


def final_evaluation(trainer, has_eval: bool) -> dict:
    """The trained model's held-out metrics ({} without held-out rows).

    With ``train.eval_steps`` set, transformers also evaluates at the last step, whatever N is: that
    evaluation is the answer (the same weights on the same rows; evaluating again cost every such stage
    one more evaluation). Otherwise (no eval_steps, or a stop between evaluations) the trainer evaluates now.
    Every process decides alike (each keeps the same log history), so distributed runs stay in step.
    """
    if not has_eval:
        return {}
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == state.global_step and not trainer.args.load_best_model_at_end:
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()


def referenced_dirs(cfg: StageConfig, recipe_name: str) -> dict[str, Path]:
    """The runs/<recipe>/<stage> folder of every stage a config names (`from:`, a reward's or a judge's
    `from:`): where `{type: learned, from: reward}` finds its reward model."""
    return {name: stage_folder(recipe_name, name) for _, name in stage_references(cfg)}
