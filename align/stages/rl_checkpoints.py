"""An RL stage's checkpoints (atomic, resumable bitwise) and its finished folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from align.artifacts import CHECKPOINT_MARKER, atomic_folder, prune_checkpoints, write_manifest
from align.console import console
from align.faults import fault_point
from align.model_card import write_card
from align.stages.ranks import is_main
from align.tracking import plot_losses


def save_rl_stage(
    policy,
    tokenizer,
    output_dir: Path,
    started: float,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    **manifest,
) -> dict:
    """The adapter (without a frozen reference copy) and any extra tensors, atomically; then the manifest."""
    from safetensors.torch import save_file

    if "reference" in getattr(policy, "peft_config", {}):
        policy.delete_adapter("reference")
    with atomic_folder(output_dir / "adapter") as staging:
        policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / name))
    _plot_rewards(output_dir)
    manifest = write_manifest(
        output_dir,
        status=manifest.pop("status", "complete"),
        artifact="adapter",
        seconds=round(time.time() - started, 1),
        **manifest,
    )
    write_card(output_dir)  # from the manifest just written (align/model_card.py)
    console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir}")
    return manifest


def save_rl_checkpoint(
    output_dir: Path,
    step: int,
    cfg,
    policy,
    optimizer,
    scheduler,
    state: dict,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """checkpoints/checkpoint-<step>/: the trained adapter (not the frozen reference), extra
    tensors (the value head), optimizer + scheduler + RNG (torch.save, read back with
    weights_only=True) and the loop's own state (step, KL coefficient, ...) as JSON. Written to a
    temporary folder, marked COMPLETE, then renamed: a kill mid-save leaves the previous one."""
    from safetensors.torch import save_file

    folder = output_dir / "checkpoints" / f"checkpoint-{step}"
    if not is_main():  # process 0 writes it: every process holds the same weights and optimizer state
        return folder
    with atomic_folder(folder) as staging:
        policy.save_pretrained(staging / "adapter", selected_adapters=["default"])
        for name, named in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(staging / name))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "trainer_state.pt",
        )
        (staging / "loop_state.json").write_text(json.dumps({"step": step, **state}, indent=1), encoding="utf-8")
        fault_point(cfg.kind, "save", step)
        (staging / CHECKPOINT_MARKER).write_text(f"step {step}\n")
    prune_checkpoints(output_dir / "checkpoints", cfg.train.save_total_limit)
    return folder


def load_rl_checkpoint(folder: Path, policy, optimizer, scheduler) -> dict:
    """Restore what save_rl_checkpoint wrote into the freshly built policy and optimizer; returns
    the loop state (the stage reads its own extra tensors from ``folder``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        policy, load_file(str(folder / "adapter" / "adapter_model.safetensors")), adapter_name="default"
    )
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return json.loads((folder / "loop_state.json").read_text(encoding="utf-8"))


def checkpoint_if_due(steps: int, output_dir: Path, step: int, cfg, *args, **kwargs) -> None:
    """save_rl_checkpoint every train.save_steps RL steps, except the last (the final save follows it)."""
    if step % cfg.train.save_steps == 0 and step < steps:
        save_rl_checkpoint(output_dir, step, cfg, *args, **kwargs)


def _plot_rewards(output_dir: Path) -> None:
    """reward.png: mean reward per step (plot_losses draws loss.png from the same file)."""
    from align.tracking import read_metrics

    records = [r for r in read_metrics(output_dir / "metrics.jsonl") if "reward_mean" in r]
    if records:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot([r["step"] for r in records], [r["reward_mean"] for r in records], label="mean reward")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "reward.png")
        plt.close(fig)
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
