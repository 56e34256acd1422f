"""DPO throughput and memory: align (precomputed and live reference) vs plain TRL DPOTrainer.

Same model (SmolLM2-135M-Instruct, QLoRA NF4, LoRA r=16 on all linear layers), the same
factual-summary pairs, batch size and steps, each configuration in its own process.

    python scripts/bench_dpo.py --steps 8

align rows run align's defaults (each pair one row, its prompt run once) unless named: `-two-rows`
puts back two padded rows a pair (data.shared_prompt false, TRL's layout), `-full-logits` the
model's [2B, T, V] logits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchlib import BENCH_MODEL, report, run_configs

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def pairs(n: int) -> list[dict]:
    from align.data.builtin import summary_pair_rows

    return summary_pair_rows()[:n]


def worker_align(reference: str, steps: int, batch: int, full_logits: bool = False, shared_prompt: bool = True) -> dict:
    if full_logits:  # log-probs through the model's [2B, T, V] logits, as before issue 16
        os.environ["ALIGN_FULL_LOGITS"] = "1"
    from align.recipe import recipe_from_dict
    from align.stages.dpo import run_dpo

    folder = Path(tempfile.mkdtemp())
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(steps * batch)))
    recipe = recipe_from_dict(
        {
            "name": "bench",
            "model": {"name": BENCH_MODEL},
            "lora": LORA,
            "quantization": {"mode": "nf4"},
            "data": {"train": str(folder / "pairs.jsonl"), "max_length": 256, "shared_prompt": shared_prompt},
            "train": {"max_steps": steps, "batch_size": batch, "save_steps": 10_000, "lr": 5e-4},
            "stages": {"dpo": {"dpo": {"reference": reference}}},
        }
    )
    run_dpo(recipe.resolve("dpo"), folder / "run", recipe_name="bench")
    metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    final = next(m for m in metrics if "train_runtime" in m)
    return {
        "train_seconds": final["train_runtime"],
        "reference_seconds": manifest["reference_seconds"],
        "pairs": steps * batch,
    }


def worker_trl(steps: int, batch: int) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from align.models.resolve import resolve_model

    path = resolve_model(BENCH_MODEL)
    data = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in pairs(steps * batch)
    ]
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=5e-4,
        max_length=256,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # TRL trains where align does
    )
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
    )
    result = trainer.train()
    return {
        "train_seconds": result.metrics["train_runtime"],
        "reference_seconds": 0.0,
        "pairs": steps * batch,
        "trl_bf16": args.bf16,
        "trl_gradient_checkpointing": args.gradient_checkpointing,
    }


CONFIGS = [
    "trl-dpo-defaults",
    "align-dpo-precomputed",
    "align-dpo-precomputed-two-rows",
    "align-dpo-live",
    "align-dpo-precomputed-full-logits",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=CONFIGS)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        if args.worker == "trl-dpo-defaults":
            report(worker_trl(args.steps, args.batch))
        else:
            name = args.worker.removesuffix("-full-logits").removesuffix("-two-rows")
            report(
                worker_align(
                    name.rsplit("-", 1)[-1],
                    args.steps,
                    args.batch,
                    full_logits=args.worker.endswith("-full-logits"),
                    shared_prompt=not args.worker.endswith("-two-rows"),
                )
            )
        return
    results = run_configs(__file__, args.only, ["--steps", str(args.steps), "--batch", str(args.batch)])
    baseline = results.get("trl-dpo-defaults")
    print(f"\nsteps {args.steps} x batch {args.batch} pairs\n")
    print(
        "| configuration | pairs/s (training) | vs TRL | reference precompute s | pairs/s incl. precompute | peak RSS "
        "MB |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = r["pairs"] / r["train_seconds"]
        overall = r["pairs"] / (r["train_seconds"] + r["reference_seconds"])
        ratio = f"{rate / (baseline['pairs'] / baseline['train_seconds']):.2f}x" if baseline else "-"
        print(
            f"| {name} | {rate:.2f} | {ratio} | {r['reference_seconds']:.1f} | {overall:.2f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
