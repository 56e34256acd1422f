"""What the bench_*.py scripts share: one configuration per process, so peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_configs(script: str, names: list[str], extra_args: list[str]) -> dict[str, dict]:
    """Run `script --worker NAME extra_args` for each name in a fresh process; collect its RESULT line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, script, "--worker", name, *extra_args], capture_output=True, text=True, env=env
        )
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT ") :])
        print(name, results[name], flush=True)
    return results


def report(result: dict) -> None:
    """A worker's last line: its result and its own peak RSS."""
    print("RESULT " + json.dumps({**result, "peak_rss_mb": round(peak_rss_mb())}))
