"""Reward-model training: align vs plain TRL RewardTrainer - pairs/s, peak RSS, held-out accuracy.

Same model (SmolLM2-135M-Instruct, QLoRA NF4, LoRA r=16 on all linear layers + scalar head), the
same factual-summary pairs (the last 50 held out), batch size and steps; one process each.

    python scripts/bench_rm.py --steps 12

align-rm runs align's defaults (each pair one row, the prompt run once for both answers);
align-rm-two-rows puts back two padded rows a pair (data.shared_prompt false), TRL's layout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchlib import BENCH_MODEL, report, run_configs

HELD_OUT = 50


def split():
    from align.data.builtin import summary_pair_rows

    rows = summary_pair_rows()
    return rows[:-HELD_OUT], rows[-HELD_OUT:]


def worker_align(steps: int, batch: int, shared_prompt: bool = True) -> dict:
    from align.recipe import recipe_from_dict
    from align.stages.reward import run_reward

    train, held_out = split()
    folder = Path(tempfile.mkdtemp())
    for name, rows in (("train", train), ("eval", held_out)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict(
        {
            "name": "bench",
            "model": {"name": BENCH_MODEL},
            "quantization": {"mode": "nf4"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), "max_length": 256},
            "train": {"max_steps": steps, "batch_size": batch, "save_steps": 10_000, "lr": 5e-4},
            "stages": {"reward": {"data": {"shared_prompt": shared_prompt}}},
        }
    )
    run_reward(recipe.resolve("reward"), folder / "run", recipe_name="bench")
    metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    end = next(i for i, m in enumerate(metrics) if "train_runtime" in m)
    # align evaluates the held-out pairs before the first step (its baseline), inside Trainer.train; TRL's
    # defaults do not: that evaluation is left out of the training time, as TRL's final one is
    evaluating = sum(m.get("eval_runtime", 0.0) for m in metrics[:end])
    return {
        "train_seconds": metrics[end]["train_runtime"] - evaluating,
        "start_evaluation_seconds": evaluating,
        "pairs": steps * batch,
        "held_out_accuracy": manifest["held_out"]["accuracy"],
    }


def worker_trl(steps: int, batch: int) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
    from trl import RewardConfig, RewardTrainer

    from align.models.resolve import resolve_model

    path = resolve_model(BENCH_MODEL)
    as_chat = lambda r: {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }
    train, held_out = split()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, quantization_config=quant)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=5e-4,
        max_length=256,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # TRL trains where align does
    )
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list([as_chat(r) for r in train]),
        eval_dataset=datasets.Dataset.from_list([as_chat(r) for r in held_out]),
        processing_class=tokenizer,
        peft_config=lora,
    )
    result = trainer.train()
    return {
        "train_seconds": result.metrics["train_runtime"],
        "pairs": steps * batch,
        "held_out_accuracy": trainer.evaluate()["eval_accuracy"],
        "trl_gradient_checkpointing": args.gradient_checkpointing,
    }


CONFIGS = ["trl-rm-defaults", "align-rm", "align-rm-two-rows"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        if args.worker == "trl-rm-defaults":
            report(worker_trl(args.steps, args.batch))
        else:
            report(worker_align(args.steps, args.batch, shared_prompt=args.worker == "align-rm"))
        return
    results = run_configs(__file__, CONFIGS, ["--steps", str(args.steps), "--batch", str(args.batch)])
    baseline = results.get("trl-rm-defaults")
    print(f"\nsteps {args.steps} x batch {args.batch} pairs, {HELD_OUT} held-out pairs\n")
    print("| configuration | pairs/s | vs TRL | held-out accuracy | peak RSS MB | vs TRL |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = r["pairs"] / r["train_seconds"]
        ratio = f"{rate / (baseline['pairs'] / baseline['train_seconds']):.2f}x" if baseline else "-"
        memory = f"{r['peak_rss_mb'] / baseline['peak_rss_mb']:.2f}x" if baseline else "-"
        print(f"| {name} | {rate:.2f} | {ratio} | {r['held_out_accuracy']:.3f} | {r['peak_rss_mb']:.0f} | {memory} |")


if __name__ == "__main__":
    main()
