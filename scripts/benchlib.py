"""What the bench_*.py scripts share: one configuration per process, so peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


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
