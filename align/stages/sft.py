"""Supervised fine-tuning with prompt-masked labels (`align sft`).

We train with transformers' Trainer on data we tokenized ourselves, not with TRL's SFTTrainer:
SFTTrainer re-derives labels from its own templating, and the masks are the part of SFT we must
own and show (align/data/templating.py). The Trainer still does what it does well: the loop,
gradient accumulation normalised by the tokens of the whole accumulated batch, accelerate for
devices and processes, mixed precision, checkpoints and resume.

    1. data -> ids + labels         (row report; bad rows stop us here, before any model loads)
    2. model + adapter              (4-bit base, peft adapter)
    3. output folder                (never overwrite a run unless told; resume only the same config)
    4. plan                         (printed)
    5. train                        (resuming from the last complete checkpoint if asked)
    6. save                         (adapter, config, metrics, loss curve; manifest last)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from align.artifacts import (
    atomic_folder,
    check_resume_config,
    last_complete_checkpoint,
    prepare_run_folder,
    trim_metrics,
    write_atomic,
    write_manifest,
)
from align.console import console, print_plan
from align.data.batching import PackedCollator, PaddingCollator, as_rows, pack
from align.data.sft_data import load_sft_data
from align.models.adapters import AdaLoraBudget, add_adapter, trainable_summary
from align.models.loading import load_base_model, load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.recipe import SFTConfig, dump_config
from align.tracking import CheckpointMarker, MetricsFile, plot_losses, read_metrics, wandb_report_to


def run_sft(cfg: SFTConfig, output_dir: str | Path, recipe_name: str = "recipe", overwrite: bool = False, resume: bool = False) -> Path:
    from transformers import Trainer, TrainingArguments, set_seed

    started = time.time()
    output_dir = Path(output_dir)

    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True is what makes torchrun's env count on CPU

    # 1. Data: everything that can be wrong with it is found before a model loads or a folder is touched.
    with state.main_process_first():  # the first use of an alias converts a GGUF; one process does it
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    data = load_sft_data(cfg.data, tokenizer, cfg.seed)
    to_rows = (lambda ex: pack(ex, cfg.data.max_length)) if cfg.data.packing else as_rows
    train_rows, eval_rows = to_rows(data.train), to_rows(data.eval)
    collator = (PackedCollator if cfg.data.packing else PaddingCollator)(tokenizer.pad_token_id)

    world = state.num_processes
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.train.batch_size * cfg.train.grad_accum * world))
    total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)

    # 2. Model and adapter.
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    full = cfg.adapter.method == "full"
    quantized = cfg.quantization.mode != "none" and not full
    model = load_base_model(cfg.model, cfg.quantization, precision, model_path, full_finetune=full)
    model = add_adapter(model, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing, total_steps)
    model.config.use_cache = False  # no KV cache in training: less memory, and packing needs it off
    trainable, total = trainable_summary(model)

    # 3. Output folder, only now that nothing above failed: never clobber an earlier run, and
    #    resume only a run of the same config. The main process prepares it; the others wait.
    checkpoints = output_dir / "checkpoints"
    resume_from = last_complete_checkpoint(checkpoints) if resume else None
    if state.is_main_process:
        prepare_run_folder(output_dir, overwrite=overwrite, resume=resume)
        if resume:
            check_resume_config(output_dir, cfg.model_dump(mode="json"))
            trim_metrics(output_dir / "metrics.jsonl", int(resume_from.name.split("-")[-1]) if resume_from else 0)
        write_atomic(output_dir / "config.yaml", dump_config(cfg))
    state.wait_for_everyone()

    # 4. Plan.
    if state.is_main_process:
        print_plan(
            f"align sft - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": _adapter_line(cfg, quantized, precision, trainable, total),
                **{f"data {r.name}": r.summary() for r in data.reports},
                "examples": f"{len(data.train)} train, {len(data.eval)} held out"
                + (f"; packed into {len(train_rows)} rows of <= {cfg.data.max_length} tokens" if cfg.data.packing else ""),
                "steps": f"{total_steps} optimizer steps x {cfg.train.batch_size * cfg.train.grad_accum * world} examples"
                f" (batch {cfg.train.batch_size} x accum {cfg.train.grad_accum} x {world} process(es))",
                "resume": str(resume_from) if resume_from else ("no complete checkpoint; starting fresh" if resume else "-"),
                "output": str(output_dir),
            },
        )

    # 5. Train.
    has_eval = bool(eval_rows)
    args = TrainingArguments(
        output_dir=str(checkpoints),
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
        eval_on_start=has_eval and resume_from is None,  # the baseline the held-out loss is judged against
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=wandb_report_to(cfg.tracking.wandb),
        project=cfg.tracking.project,
        run_name=f"{recipe_name}/sft",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # enabled on the model above, before the adapter wraps it
        ddp_find_unused_parameters=False,  # every trainable weight is used; the search breaks checkpointing
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[MetricsFile(output_dir / "metrics.jsonl"), CheckpointMarker()]
        + ([AdaLoraBudget(model)] if cfg.adapter.method == "adalora" else []),
        optimizers=(_loraplus_optimizer(model, cfg), None),
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final_eval = trainer.evaluate() if has_eval else {}

    # 6. Save: adapter (or whole model) atomically, then curve, then the manifest last.
    if trainer.is_world_process_zero():
        artifact = "model" if full else "adapter"
        with atomic_folder(output_dir / artifact) as staging:
            trainer.model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
        eval_losses = [r["eval_loss"] for r in read_metrics(output_dir / "metrics.jsonl") if "eval_loss" in r]
        write_manifest(
            output_dir,
            status="complete",
            stage="sft",
            kind="sft",
            recipe=recipe_name,
            base_model=cfg.model.name,
            base_model_path=str(model_path),
            artifact=artifact,
            precision=precision,
            quantization=cfg.quantization.mode if quantized else "none",
            data={r.name: r.as_dict() for r in data.reports},
            steps=result.global_step,
            train_loss=result.training_loss,
            eval_loss_start=eval_losses[0] if eval_losses else None,
            eval_loss=final_eval.get("eval_loss"),
            resumed_from=str(resume_from) if resume_from else None,
            seconds=round(time.time() - started, 1),
        )
        console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir}")
        if final_eval:
            console.print(f"held-out loss {eval_losses[0]:.4f} -> {final_eval['eval_loss']:.4f}")
        console.print(f"next: align generate --model {output_dir} --prompt \"...\"   or   align merge --model {output_dir}")
    return output_dir


def _loraplus_optimizer(model, cfg: SFTConfig):
    """LoRA+ (B matrices at ratio x the learning rate) through peft's helper; None = Trainer default."""
    if cfg.lora.loraplus_lr_ratio is None or cfg.adapter.method != "lora":
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=cfg.train.lr, loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio, weight_decay=cfg.train.weight_decay
    )


def _adapter_line(cfg: SFTConfig, quantized: bool, precision: str, trainable: int, total: int) -> str:
    if cfg.adapter.method == "full":
        method = "full fine-tuning"
    else:
        extras = [name for name, on in (("rslora", cfg.lora.use_rslora), ("dora", cfg.lora.use_dora)) if on]
        method = f"{cfg.adapter.method} r={cfg.lora.r} alpha={cfg.lora.alpha}" + (f" ({', '.join(extras)})" if extras else "")
        if cfg.lora.loraplus_lr_ratio:
            method += f", LoRA+ ratio {cfg.lora.loraplus_lr_ratio}"
    base = f"{cfg.quantization.mode} 4-bit base" if quantized and cfg.quantization.mode != "int8" else ("int8 base" if quantized else "unquantized base")
    return f"{method} on {base}, {precision}; trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
