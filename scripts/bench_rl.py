"""Online RL step time by phase and peak memory: PPO with hf vs vLLM rollouts; PPO vs GRPO vs RLOO.

SmolLM2-135M-Instruct, NF4 base + LoRA r=16, GSM8K questions, reward = gsm8k_exact + 0.5 x
answer_format, 16 completions per step for every algorithm (PPO: 16 prompts x 1; GRPO/RLOO:
4 prompts x 4), temperature 1, <= 64 new tokens, the same seed. Each configuration runs in its
own process; the first step (warm-up, engine start) is left out of the averages.

    python scripts/bench_rl.py --steps 4
    python scripts/bench_rl.py --steps 4 --only grpo-hf,grpo-hf-2proc,ppo-hf,ppo-hf-2proc   # 1 vs 2 processes
    python scripts/bench_rl.py --steps 4 --only grpo-vllm,grpo-server   # in-process vLLM vs a vLLM server

grpo-server starts a server on the exported (dequantized NF4, fp32) base first; its start-up is not in the
step times and its memory is not in the peak RSS (another process: it is printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
from pathlib import Path

from benchlib import BENCH_MODEL, report, run_configs

CONFIGS = {
    # name: (kind, engine, algorithm)
    "ppo-hf": ("ppo", "hf", None),
    "ppo-vllm": ("ppo", "vllm", None),
    "grpo-vllm": ("grpo", "vllm", "grpo"),
    # the same with the separate no-grad pass for the old logprobs that one-update steps skip (issue 16)
    "grpo-vllm-old-pass": ("grpo", "vllm", "grpo"),
    "rloo-vllm": ("grpo", "vllm", "rloo"),
    # align's defaults checkpoint every layer; this is the setting of the figures before 2026-12-05
    "grpo-vllm-no-checkpointing": ("grpo", "vllm", "grpo"),
    # micro-batches in the rollouts' own order, padded to the whole batch's width, as before issue 16
    "grpo-vllm-unsorted": ("grpo", "vllm", "grpo"),
    # 1 vs 2 processes (torchrun, 1 thread each) on the same cores and global batch (issue 15); hf rollouts,
    # since every process would hold its own vLLM engine
    "grpo-hf": ("grpo", "hf", "grpo"),
    "grpo-hf-2proc": ("grpo", "hf", "grpo"),
    "ppo-hf-2proc": ("ppo", "hf", None),
    # rollouts from a vLLM server on this machine (its own process, sharing the cores; issue 15) vs grpo-vllm
    "grpo-server": ("grpo", "server", "grpo"),
}
PROCESSES = {"grpo-hf-2proc": 2, "ppo-hf-2proc": 2}


def worker(name: str, steps: int, tokens: int) -> dict:
    from align.data.builtin import gsm8k_rows
    from align.recipe import recipe_from_dict

    kind, engine, algorithm = CONFIGS[name]
    folder = Path(tempfile.mkdtemp())
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows()[:256]))
    per_prompt = 1 if kind == "ppo" else 4
    stage = {
        "kind": kind,
        "reward": [
            {"type": "rule", "name": "gsm8k_exact", "weight": 1.0},
            {"type": "rule", "name": "answer_format", "weight": 0.5},
        ],
        "rollout": {
            "engine": engine,
            "prompts_per_step": 16 // per_prompt,
            "samples_per_prompt": per_prompt,
            "max_new_tokens": tokens,
        },
        kind: {"algorithm": algorithm, "dead_steps": 0}
        if kind == "grpo"
        else {"epochs": 2, "minibatch_size": 8, "dead_steps": 0},
    }
    raw = {
        "name": "bench",
        "model": {"name": BENCH_MODEL},
        "quantization": {"mode": "nf4"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(folder / "prompts.jsonl"), "max_length": 512},
        "train": {
            "max_steps": steps,
            "batch_size": 8,
            "lr": 1e-5,
            "gradient_checkpointing": not name.endswith("-no-checkpointing"),
        },
        "stages": {"rl": stage},
    }
    server = None
    if engine == "server":
        stage["rollout"].update(engine="hf")  # a placeholder to resolve the stage the base is written for
        server, url = serve_base(recipe_from_dict(raw).resolve("rl"), folder)
        stage["rollout"].update(engine="server", server_url=url, engine_precision="fp32")  # the CPU engine's
    cfg = recipe_from_dict(raw).resolve("rl")
    if kind == "ppo":
        from align.stages.ppo import run_ppo as run
    else:
        import align.stages.grpo as grpo_stage

        if name.endswith("-old-pass"):
            grpo_stage.update_gives_old_logprobs = lambda *args: False
        if name.endswith("-unsorted"):
            import align.stages.rl_update as rl_update

            chunks = rl_update.micro_batches
            rl_update.micro_batches = lambda indices, size, batch=None: chunks(indices, size)
            whole = lambda batch, rows, device: {k: v[rows].to(device) for k, v in batch.items()}  # noqa: E731
            rl_update.select_rows = grpo_stage.select_rows = whole
        run = grpo_stage.run_grpo
    try:
        out = run(cfg, folder / "out", recipe_name="bench")
    finally:
        if server is not None:
            server_rss = process_tree_rss_mb(server.pid)
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    if not (out / "metrics.jsonl").is_file():  # another torchrun process: process 0 writes and reports
        return {}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 is warm-up
    phases = ["generation", "scoring", "logprobs", "training", "sync"]
    result = {f"{p}_s": round(sum(r.get(f"time/{p}", 0.0) for r in records) / len(records), 2) for p in phases}
    timed = sum(result.values())
    result["step_s"] = round(sum(r["time/step"] for r in records) / len(records), 2)  # wall clock
    result["untimed_s"] = round(result["step_s"] - timed, 2)  # KL, advantages, whitening, logging, checkpoints
    for part in ("push", "probe", "faithfulness"):  # the sync's parts (vLLM), inside sync_s
        result[f"sync_{part}_s"] = round(sum(r.get(f"time/sync_{part}", 0.0) for r in records) / len(records), 2)
    result["completion_tokens"] = round(sum(r["completion_length"] for r in records) / len(records) * 16)
    if server is not None:
        result["server_rss_mb"] = server_rss  # at the end of the run, the server's processes together
    return result


def serve_base(cfg, folder: Path):
    """(server process, url): a vLLM server on the stage's exported base, as recipes/server/README.md says."""
    from align.rollout.server import export_served_base, start_local_server

    export_served_base(cfg, folder / "served", "fp32")
    options = ("--max-model-len", "1024", "--kv-cache-memory-bytes", str(2**30), "--no-enable-chunked-prefill")
    return start_local_server(folder / "served", folder / "server.log", "fp32", 16, (*options, "--enforce-eager"))


def process_tree_rss_mb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (the server's API process and engine core), MB."""
    import subprocess

    pids = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total // 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        report(worker(args.worker, args.steps, args.tokens))
        return
    results = run_configs(
        __file__, args.only.split(","), ["--steps", str(args.steps), "--tokens", str(args.tokens)], PROCESSES
    )
    print(
        f"\n{'config':<12}{'step s':>8}{'generate':>10}{'score':>7}{'logprobs':>10}{'train':>7}{'sync':>6}"
        f"{'untimed':>9}{'tokens':>8}{'peak RSS MB':>13}   sync = push + probe + faithfulness"
    )
    for name, r in results.items():
        print(
            f"{name:<12}{r['step_s']:>8}{r['generation_s']:>10}{r['scoring_s']:>7}{r['logprobs_s']:>10}{r['training_s']:>7}"
            f"{r['sync_s']:>6}{r['untimed_s']:>9}{r['completion_tokens']:>8}{r['peak_rss_mb']:>13}   "
            f"{r['sync_push_s']} + {r['sync_probe_s']} + {r['sync_faithfulness_s']}"
            + (f"   server RSS {r['server_rss_mb']} MB" if "server_rss_mb" in r else "")
        )


if __name__ == "__main__":
    main()
