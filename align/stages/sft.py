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

import time
from pathlib import Path

from transformers import Trainer

from align.config import SFTConfig
from align.console import console, print_plan
from align.data.batching import PackedCollator, PaddingCollator, as_rows, pack
from align.data.sft_data import load_sft_data
from align.models.adapters import add_adapter, trainable_summary
from align.models.loading import load_base_model, load_tokenizer, resolve_precision
from align.models.output_layer import next_token_logps
from align.models.resolve import resolve_model
from align.stages.checkup import checkup_status, raise_if_collapsed, run_checkup
from align.stages.common import (
    adapter_line,
    check_longest_batch,
    final_evaluation,
    loraplus_optimizer,
    prepare_output,
    process_state,
    resume_line,
    save_stage,
    stage_callbacks,
    steps_line,
    total_steps,
    trainer_plan,
    training_arguments,
)
from align.tokens import IGNORE_INDEX


class LabelledTokenTrainer(Trainer):
    """transformers' Trainer with the model's own causal-LM loss (the sum of -log p over labelled tokens,
    divided by the labelled tokens of the whole accumulated batch), computed from the logits of the
    labelled positions only, a chunk at a time (``next_token_logps``): never the [B, T, V] logits of
    every position, nor their fp32 copy for the cross-entropy. Same loss, same gradients (tests)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        logps = next_token_logps(model, targets, **forward)[0]
        loss = -logps.sum() / (
            num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages gradients over processes
            # (what Trainer.compute_loss does for the model's own loss)
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss


def plan(cfg: SFTConfig, tokenizer) -> tuple[str, str]:
    """(rows, work) for `align run`'s plan; reading every row is the validation."""
    data = load_sft_data(cfg.data, tokenizer, cfg.seed)
    return trainer_plan(cfg, data.train, data.eval)


def run_sft(
    cfg: SFTConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
) -> Path:
    from transformers import set_seed

    started = time.time()
    output_dir = Path(output_dir)
    state = process_state()

    # 1. Data: everything that can be wrong with it is found before a model loads or a folder is touched.
    with state.main_process_first():  # the first use of an alias converts a GGUF; one process does it
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    data = load_sft_data(cfg.data, tokenizer, cfg.seed)
    to_rows = (lambda ex: pack(ex, cfg.data.max_length)) if cfg.data.packing else as_rows
    train_rows, eval_rows = to_rows(data.train), to_rows(data.eval)
    collator = (PackedCollator if cfg.data.packing else PaddingCollator)(tokenizer.pad_token_id)
    steps = total_steps(cfg, len(train_rows), state.num_processes)

    # 2. Model and adapter.
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.model.precision)
    full = cfg.adapter.method == "full"
    quantized = cfg.quantization.mode != "none" and not full
    model = load_base_model(cfg.model, cfg.quantization, precision, model_path, full_finetune=full)
    model = add_adapter(model, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing, steps)
    model.config.use_cache = False  # no KV cache in training: less memory, and packing needs it off
    trainable, total = trainable_summary(model)

    # 3. Output folder, only now that nothing above failed.
    resume_from = prepare_output(state, output_dir, cfg, overwrite, resume)

    # 4. Plan.
    if state.is_main_process:
        print_plan(
            f"align sft - {recipe_name}",
            {
                "model": f"{cfg.model.name} ({model_path})",
                "adapter": adapter_line(cfg, quantized, precision, trainable, total),
                **{f"data {r.name}": r.summary() for r in data.reports},
                "examples": f"{len(data.train)} train, {len(data.eval)} held out"
                + (
                    f"; packed into {len(train_rows)} rows of <= {cfg.data.max_length} tokens"
                    if cfg.data.packing
                    else ""
                ),
                "steps": steps_line(cfg, steps, state.num_processes),
                "resume": resume_line(resume_from, resume),
                "output": str(output_dir),
            },
        )

    # 5. Train.
    has_eval = bool(eval_rows)
    trainer = LabelledTokenTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision, has_eval, resume_from, f"{recipe_name}/sft"),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=stage_callbacks(output_dir, cfg, model),
        optimizers=(loraplus_optimizer(model, cfg), None),
    )
    check_longest_batch(trainer, train_rows)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final_eval = final_evaluation(trainer, has_eval)

    # 6. Checkup: the trained policy against the base on held-out prompts of the task, then save:
    #    adapter (or whole model), curve, manifest last.
    if trainer.is_world_process_zero():
        checkup = run_checkup(cfg, trainer.model, tokenizer, None, precision)
        manifest = save_stage(
            trainer,
            tokenizer,
            output_dir,
            "model" if full else "adapter",
            started,
            stage="sft",
            kind="sft",
            recipe=recipe_name,
            base_model=cfg.model.name,
            base_model_path=str(model_path),
            precision=precision,
            quantization=cfg.quantization.mode if quantized else "none",
            data={r.name: r.as_dict() for r in data.reports},
            steps=result.global_step,
            train_loss=result.training_loss,
            eval_loss=final_eval.get("eval_loss"),
            resumed_from=str(resume_from) if resume_from else None,
            checkup=checkup,
            status=checkup_status(cfg, checkup),
            **(provenance or {}),
        )
        if final_eval:
            console.print(f"held-out loss {manifest['eval_loss_start']:.4f} -> {final_eval['eval_loss']:.4f}")
        raise_if_collapsed(cfg, checkup, output_dir)
        console.print(
            f'next: align generate --model {output_dir} --prompt "..."   or   align merge --model {output_dir}'
        )
    return output_dir
