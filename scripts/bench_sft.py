"""SFT throughput and memory: align vs plain TRL SFTTrainer, packing vs padding, FLOP/s vs peak.

Every configuration runs in its own process (so peak RSS is its own), on the same model
(SmolLM2-135M-Instruct), the same GSM8K rows, batch size and number of steps, in one invocation;
compare the ratios, not the absolute numbers, across machines.

    python scripts/bench_sft.py                # all configurations, table on stdout
    python scripts/bench_sft.py --steps 6      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BENCH_MODEL, report, run_configs

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul on the device the runs train on (the GPU when there is one):
    that device's practical peak for the dtype."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, repeats = (8192, 50) if device == "cuda" else (size, repeats)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def rows(n: int, mixed: bool) -> list[dict]:
    data = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    if mixed:  # mixed lengths: every third answer is cut short, so padding wastes more
        for i, row in enumerate(data):
            if i % 3 == 0:
                row["completion"] = row["completion"].split("\n")[-1]
    return data


def worker_align(spec: dict) -> dict:
    if spec.get("full_logits"):  # the loss through the model's [B, T, V] logits, as before issue 16
        os.environ["ALIGN_FULL_LOGITS"] = "1"
    from align.recipe import recipe_from_dict
    from align.stages.sft import run_sft

    folder = Path(tempfile.mkdtemp())
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(spec["rows"], spec["mixed"])))
    recipe = recipe_from_dict(
        {
            "name": "bench",
            "model": {"name": BENCH_MODEL, "precision": spec["precision"]},
            "quantization": {"mode": spec["quant"]},
            "lora": {"dropout": spec.get("lora_dropout", 0.0)},  # align's defaults unless the row says
            "data": {"train": str(data), "max_length": 512, "packing": spec["packing"]},
            "train": {
                "max_steps": spec["steps"],
                "batch_size": spec["batch"],
                "save_steps": 10_000,
                "lr": 2e-4,
                "gradient_checkpointing": spec.get("checkpointing", True),
            },
            "stages": {"sft": {}},
        }
    )
    cfg = recipe.resolve("sft")
    run_sft(cfg, folder / "run", recipe_name="bench")
    metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    final = next(m for m in metrics if "train_runtime" in m)
    return {"seconds": final["train_runtime"], "tokens": _tokens_seen(cfg, spec)}


def _tokens_seen(cfg, spec) -> int:
    """Real (non-padding) tokens in the examples the run trained on: steps x batch examples."""
    from align.data.sft_data import load_sft_data
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    examples = load_sft_data(cfg.data.model_copy(update={"packing": False}), tokenizer, cfg.seed).train
    lengths = [len(e.input_ids) for e in examples]
    if spec["packing"]:  # each step sees `batch` packed rows
        from align.data.batching import pack

        lengths = [len(r["input_ids"]) for r in pack(examples, cfg.data.max_length)]
    seen = spec["steps"] * spec["batch"]
    return sum((lengths * (seen // len(lengths) + 1))[:seen])


def worker_trl(spec: dict) -> dict:
    """Plain TRL SFTTrainer, defaults except what must match (model, data, LoRA size, batch, steps)."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from align.models.resolve import resolve_model

    path = resolve_model(BENCH_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in rows(spec["rows"], spec["mixed"])
    ]
    quant = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if spec["quant"] == "nf4"
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant)
    folder = tempfile.mkdtemp()
    args = SFTConfig(
        output_dir=folder,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=2e-4,
        max_length=512,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # TRL trains where align does
        use_liger_kernel=spec.get("liger", False),  # Liger's fused kernels: Triton, GPU only
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=spec.get("lora_dropout", 0.05),  # the usual LoRA setting, as in TRL's examples
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    result = trainer.train()
    lengths = [len(x["input_ids"]) for x in trainer.train_dataset]
    seen = spec["steps"] * spec["batch"]
    tokens = sum((lengths * (seen // len(lengths) + 1))[:seen])
    return {
        "seconds": result.metrics["train_runtime"],
        "tokens": tokens,
        "trl_bf16": args.bf16,
        "trl_gradient_checkpointing": args.gradient_checkpointing,
    }


# align rows use align's defaults (LoRA dropout 0, checkpointing every layer) unless named otherwise;
# trl-qlora-no-dropout is the fair peer for them (TRL with the same adapter setting).
CONFIGS = {
    "trl-qlora-defaults": ("trl", {"quant": "nf4"}),
    "trl-qlora-no-dropout": ("trl", {"quant": "nf4", "lora_dropout": 0.0}),
    # the strongest TRL peer on a GPU: Liger's fused linear cross-entropy and kernels (GPU only)
    "trl-qlora-no-dropout-liger": ("trl", {"quant": "nf4", "lora_dropout": 0.0, "liger": True}),
    "align-qlora": ("align", {"quant": "nf4", "precision": "auto"}),
    "align-qlora-full-logits": ("align", {"quant": "nf4", "precision": "auto", "full_logits": True}),
    "align-qlora-no-checkpointing": ("align", {"quant": "nf4", "precision": "auto", "checkpointing": False}),
    "align-qlora-checkpointing-0.75": ("align", {"quant": "nf4", "precision": "auto", "checkpointing": 0.75}),
    "align-qlora-checkpointing-0.5": ("align", {"quant": "nf4", "precision": "auto", "checkpointing": 0.5}),
    "align-qlora-dropout": ("align", {"quant": "nf4", "precision": "auto", "lora_dropout": 0.05}),
    "align-qlora-dropout-no-checkpointing": (
        "align",
        {"quant": "nf4", "precision": "auto", "lora_dropout": 0.05, "checkpointing": False},
    ),
    "align-lora": ("align", {"quant": "none", "precision": "auto"}),
    "align-lora-full-logits": ("align", {"quant": "none", "precision": "auto", "full_logits": True}),
    "align-lora-fp32": ("align", {"quant": "none", "precision": "fp32"}),
    "align-lora-padding-mixed": ("align", {"quant": "none", "precision": "auto", "mixed": True}),
    "align-lora-packing-mixed": ("align", {"quant": "none", "precision": "auto", "mixed": True, "packing": True}),
}


def run_worker(name: str, steps: int, batch: int) -> dict:
    kind, spec = CONFIGS[name]
    spec = {"rows": 200, "mixed": False, "packing": False, "precision": "auto", **spec, "steps": steps, "batch": batch}
    return (worker_trl if kind == "trl" else worker_align)(spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        report(run_worker(args.worker, args.steps, args.batch))
        return
    if not GSM8K.is_file():
        sys.exit("run `align data prepare gsm8k` first")
    if args.only is None:  # every configuration this machine can run (Liger is GPU only)
        import torch

        args.only = [n for n in CONFIGS if "liger" not in n or torch.cuda.is_available()]
    results = run_configs(__file__, args.only, ["--steps", str(args.steps), "--batch", str(args.batch)])

    import math

    import torch
    from safetensors import safe_open

    from align.models.resolve import resolve_model

    with safe_open(str(resolve_model(BENCH_MODEL) / "model.safetensors"), "pt") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    peaks = {d: matmul_peak(d) for d in ("bf16", "fp32")}
    baseline = results.get("trl-qlora-defaults")
    print(
        f"\nmachine: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'{os.cpu_count()} cores'}, "
        f"torch {torch.__version__}; matmul peak bf16 {peaks['bf16'] / 1e9:.0f} "
        f"GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s"
    )
    print(f"steps {args.steps} x batch {args.batch}\n")
    print(
        "| configuration | tokens/s | vs TRL | peak RSS MB | peak GPU MB | model FLOP/s (6N per token) | of bf16 peak "
        "| of fp32 peak |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        flops = 6 * params * rate
        ratio = f"{rate / (baseline['tokens'] / baseline['seconds']):.2f}x" if baseline else "-"
        print(
            f"| {name} | {rate:.0f} | {ratio} | {r['peak_rss_mb']:.0f} | {r.get('peak_gpu_mb', '-')} | "
            f"{flops / 1e9:.1f} G | {flops / peaks['bf16']:.1%} | {flops / peaks['fp32']:.1%} |"
        )


if __name__ == "__main__":
    main()
