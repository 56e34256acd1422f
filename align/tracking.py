"""Metrics: a JSONL file always; wandb (offline unless a key is configured) and trackio (a local
SQLite store, `trackio show` to view) when the recipe's tracking section asks; a loss PNG.

Trainer stages (sft, rm, dpo, orpo, kto) log through transformers' own wandb/trackio callbacks;
the stages align runs its own loop in (grpo, ppo, eval) log through ``Tracker``, with the names
metrics.jsonl uses. Only the main process (rank 0) logs."""

from __future__ import annotations

import json
import os
import time
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


def _wandb_offline_unless_key() -> None:
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"  # no key: keep runs local, sync later with `wandb sync`


def report_to(tracking) -> list[str]:
    """The Trainer's report_to for a recipe's tracking section (transformers' own callbacks log)."""
    targets = []
    if tracking.wandb:
        _wandb_offline_unless_key()
        targets.append("wandb")
    if tracking.trackio:
        targets.append("trackio")
    return targets


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Tracker:
    """What a stage's own loop logs, also sent to wandb and trackio when the recipe asks.

    ``log(record)`` takes a metrics.jsonl record (its "step" is the step); ``table`` logs rows such as
    sampled prompts, completions and rewards. The run's name and wandb id are kept in the stage folder
    (tracking.json) so ``--resume`` continues the same tracked run. Does nothing off rank 0 or when
    neither tracker is on; a tracker that fails to start is an error before any step, not a silent gap.
    """

    def __init__(self, tracking, output_dir: Path, name: str, config: dict):
        self.wandb = self.trackio = None
        if not _main_process() or not (tracking.wandb or tracking.trackio):
            return
        ids_path = output_dir / "tracking.json"
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        if not ids:
            import uuid

            ids = {"name": f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", "wandb_id": uuid.uuid4().hex[:12]}
            ids_path.write_text(json.dumps(ids) + "\n")
        if tracking.wandb:
            _wandb_offline_unless_key()
            import wandb

            self.wandb = wandb.init(
                project=tracking.project,
                name=ids["name"],
                id=ids["wandb_id"],
                resume="allow",
                dir=str(output_dir),
                config=config,
                reinit="create_new",
            )
        if tracking.trackio:
            import trackio

            # local unless the user pointed trackio elsewhere (TRACKIO_DIR, or a Space of their own)
            self.trackio = trackio.init(
                project=tracking.project,
                name=ids["name"],
                config=config,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def log(self, record: dict) -> None:
        step = record.get("step")
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.trackio is not None:
            self.trackio.log(values, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)
        if self.trackio is not None:
            import trackio

            self.trackio.log({key: trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.trackio is not None:
            self.trackio.finish()
            self.trackio = None


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
