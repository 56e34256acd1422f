"""Metrics: a JSONL file always, wandb when asked (offline unless a key is configured), a loss PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from align.artifacts import CHECKPOINT_MARKER
from align.faults import fault_point


class MetricsFile(TrainerCallback):
    """Appends every Trainer log to metrics.jsonl, with the step it belongs to."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class FaultPoints(TrainerCallback):
    """align/faults.py's kill points inside a Trainer run; listed before CheckpointMarker so a
    kill at "save" leaves a checkpoint without its marker."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_step_end(self, args, state, control, **kwargs):
        fault_point(self.stage, "step", state.global_step)

    def on_save(self, args, state, control, **kwargs):
        fault_point(self.stage, "save", state.global_step)


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (model, optimizer, RNG).

    The Trainer calls on_save after the checkpoint is on disk; a save killed halfway has no marker,
    and resume skips it.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / CHECKPOINT_MARKER).write_text(f"step {state.global_step}\n")


def wandb_report_to(enabled: bool) -> list[str]:
    if not enabled:
        return []
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"  # no key: keep runs local, sync later with `wandb sync`
    return ["wandb"]


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not held_out:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
