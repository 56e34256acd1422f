"""What the bench_*.py scripts share: one configuration per process, so peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

# The model every benchmark trains: the embedded SmolLM2-135M-Instruct, or ALIGN_BENCH_MODEL (a model folder).
# On a lent GPU machine that is .gpu/model, the same model with random weights (scripts/prepare_gpu_run.sh).
BENCH_MODEL = os.environ.get("ALIGN_BENCH_MODEL") or "smollm2-135m-instruct"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_configs(
    script: str, names: list[str], extra_args: list[str], processes: dict[str, int] | None = None
) -> dict[str, dict]:
    """Run `script --worker NAME extra_args` for each name in a fresh process (or under torchrun with
    processes[NAME] processes, each with 1 thread: the same cores as one process); collect the RESULT line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name in names:
        n = (processes or {}).get(name, 1)
        launch = (
            [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"]
        )
        proc = subprocess.run(
            [*launch, script, "--worker", name, *extra_args],
            capture_output=True,
            text=True,
            env={**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))} if n > 1 else env,
        )
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT ") :])
        print(name, results[name], flush=True)
    return results


def give_random_weights(folder: str) -> bool:
    """Random weights (seeded) for the config in ``folder``, saved there - unless it holds weights already.

    For speed and memory only the shapes matter: a GPU machine that cannot take the embedded model's 98 MB
    GGUF gets its config and tokenizer, and this makes the rest. Returns whether it wrote weights."""
    from pathlib import Path

    if any(Path(folder).glob("*.safetensors")):
        return False
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
    return True


def peak_gpu_mb() -> float | None:
    """The most GPU memory torch held at once in this process (torch.cuda.max_memory_allocated), or None
    without a GPU. Host RSS says nothing about a GPU run's memory; vLLM's own pool is included when it
    allocates through torch."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def report(result: dict) -> None:
    """A worker's last line: its result, its own peak RSS and, on a GPU, its peak GPU memory (under
    torchrun: process 0's)."""
    if os.environ.get("RANK", "0") != "0":
        return
    gpu = peak_gpu_mb() if "torch" in sys.modules else None
    extra = {"peak_gpu_mb": round(gpu)} if gpu is not None else {}
    print("RESULT " + json.dumps({**result, "peak_rss_mb": round(peak_rss_mb()), **extra}))
