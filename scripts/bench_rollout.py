"""Rollout throughput: hf one prompt at a time, hf batched, vLLM - and the median time of a weight sync.

The policy is what RL trains: SmolLM2-135M-Instruct, NF4 base + LoRA r=16 on all linear layers
(B perturbed so the adapter matters). The same GSM8K questions and sampling (temperature 1,
max_new_tokens) for every engine; each engine runs in its own process (peak RSS is its own),
warms up on 4 prompts, then generates for all prompts. Tokens/s counts generated tokens.

    python scripts/bench_rollout.py --prompts 64 --tokens 64
    python scripts/bench_rollout.py --only vllm-bf16,vllm-bf16-lora   # a subset
    python scripts/bench_rollout.py --only vllm-cpu-default --prompts 8 --syncs 12   # the merged sync's time

``precision`` is the trainer's (autocast, 4-bit compute dtype); ``engine_precision`` the weights
vLLM serves (default: fp32 on CPU). "mismatch" is the mean |engine - trainer| logprob per
sampled token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchlib import BENCH_MODEL, report, run_configs

CONFIGS = {
    # name: (engine, options)
    "hf-one-at-a-time": ("hf", {"batch_size": 1, "precision": "bf16"}),
    "hf-batched": ("hf", {"batch_size": 64, "precision": "bf16"}),
    "hf-batched-fp32": ("hf", {"batch_size": 64, "precision": "fp32"}),
    # a bf16 trainer with the engine's CPU default (fp32 weights in vLLM, align.rollout.vllm.engine_dtype)
    "vllm-cpu-default": ("vllm", {"precision": "bf16"}),  # sync auto = merged on CPU
    "vllm-bf16": ("vllm", {"precision": "bf16", "engine_precision": "bf16"}),
    "vllm-fp32": ("vllm", {"precision": "fp32"}),
    "vllm-bf16-lora": ("vllm", {"precision": "bf16", "engine_precision": "bf16", "sync": "lora"}),
    "vllm-bf16-merged": ("vllm", {"precision": "bf16", "engine_precision": "bf16", "sync": "merged"}),
    "vllm-bf16-graphs": ("vllm", {"precision": "bf16", "engine_precision": "bf16", "enforce_eager": False}),
    "vllm-bf16-kv8": ("vllm", {"precision": "bf16", "engine_precision": "bf16", "kv_cache_gib": 8}),
    # the same base without an adapter (full sync mode): what serving the LoRA costs vLLM here
    "vllm-bf16-no-lora": ("vllm", {"precision": "bf16", "engine_precision": "bf16", "adapter": False}),
    "hf-batched-no-lora": ("hf", {"batch_size": 64, "precision": "bf16", "adapter": False}),
}


def policy(precision: str, adapter: bool = True):
    import torch

    from align.config import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model, load_tokenizer

    model_cfg = ModelConfig(name=BENCH_MODEL)
    if not adapter:  # a plain bf16/fp32 model, as a full fine-tune would be
        return load_base_model(model_cfg, QuantizationConfig(mode="none"), precision), load_tokenizer(model_cfg)
    base = load_base_model(model_cfg, QuantizationConfig(mode="nf4"), precision)  # 4-bit layers compute in this dtype
    model = add_adapter(
        base, AdapterConfig(), LoraConfig(r=16, dropout=0.0), quantized=True, gradient_checkpointing=False
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.002)
    return model, load_tokenizer(model_cfg)


def worker(name: str, prompts: int, tokens: int, syncs: int) -> dict:
    import torch

    from align.data.builtin import gsm8k_rows
    from align.rollout.engine import Sampling
    from align.rollout.scoring import logprob_mismatch, score_rollouts

    kind, options = CONFIGS[name]
    options = dict(options)
    precision = options.pop("precision")
    adapter = options.pop("adapter", True)
    model, tokenizer = policy(precision, adapter)
    conversations = [[{"role": "user", "content": row["prompt"]}] for row in gsm8k_rows()[:prompts]]
    started = time.perf_counter()
    if kind == "hf":
        from align.rollout.hf import HFEngine

        engine = HFEngine(model, tokenizer, precision=precision, **options)
    else:
        from align.rollout.vllm import VLLMEngine

        engine = VLLMEngine(model, tokenizer, precision=precision, **options)
    startup = time.perf_counter() - started
    sampling = Sampling(temperature=1.0, max_new_tokens=tokens, seed=0)
    engine.generate(conversations[:4], Sampling(temperature=1.0, max_new_tokens=8))  # warm-up
    started = time.perf_counter()
    rollouts = engine.generate(conversations, sampling)
    seconds = time.perf_counter() - started
    generated = sum(len(r.completion_ids) for r in rollouts)
    # How far the sampler is from the trainer on what it sampled (what RL's ratios see).
    trainer = score_rollouts(model, rollouts, tokenizer.pad_token_id, 1.0, precision)
    mismatch = logprob_mismatch([r.logprobs for r in rollouts], trainer)
    sync_seconds, parts = [], []
    for _ in range(max(1, syncs)):
        with torch.no_grad():  # a small change for the engine to take up: the adapter, or a full model's norms
            for n, p in model.named_parameters():
                if "lora_B" in n or (not adapter and n.endswith("norm.weight")):
                    p.add_(0.001)
        started = time.perf_counter()
        engine.sync_weights(model)
        sync_seconds.append(time.perf_counter() - started)
        parts.append(getattr(engine, "sync_seconds", {}))
    return {
        "tokens_per_s": round(generated / seconds, 1),
        "generated_tokens": generated,
        "generate_s": round(seconds, 2),
        "startup_s": round(startup, 1),
        "sync_s": round(statistics.median(sync_seconds), 3),  # median: every 8th sync also checks faithfulness
        "syncs": len(sync_seconds),
        **{
            k.replace("time/", "") + "_s": round(statistics.median(p[k] for p in parts), 3)
            for k in parts[0]  # the hf engine has none
        },
        "probe_logprob_difference": round(getattr(engine, "last_sync_difference", 0.0), 5),
        "rollout_mismatch_mean": round(mismatch["logprob_mismatch_mean"], 5),
        "rollout_mismatch_max": round(mismatch["logprob_mismatch_max"], 4),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=12, help="weight syncs after generating; their median is reported")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated config names")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        report(worker(args.worker, args.prompts, args.tokens, args.syncs))
        return
    names = args.only.split(",")
    options = ["--prompts", str(args.prompts), "--tokens", str(args.tokens), "--syncs", str(args.syncs)]
    results = run_configs(__file__, names, options)
    baseline = results.get("hf-batched", {}).get("tokens_per_s")
    print(
        f"\n{'engine':<20}{'tokens/s':>10}{'vs hf-batched':>15}{'startup s':>11}{'sync s':>9}{'mismatch':>10}"
        f"{'peak RSS MB':>13}   sync = push + probe + faithfulness"
    )
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "-"
        print(
            f"{name:<20}{r['tokens_per_s']:>10}{ratio:>15}{r['startup_s']:>11}{r['sync_s']:>9}{r['rollout_mismatch_mean']:>10}{r['peak_rss_mb']:>13}"
            + (
                f"   {r['sync_push_s']} + {r['sync_probe_s']} + {r['sync_faithfulness_s']}"
                if "sync_push_s" in r
                else ""
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
