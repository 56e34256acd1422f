"""Stage output folders: what is in them, how they are written, and when they may be reused.

    runs/<recipe>/<stage>/
        config.yaml      resolved stage config
        adapter/         peft adapter (or model/ for full fine-tuning), tokenizer beside it
        metrics.jsonl    one JSON object per logged step
        rollouts.jsonl   RL stages: sampled prompts, completions and rewards every rollout.log_samples_every steps
        tracking.json    the wandb / trackio run's name and id, so --resume continues it
        manifest.json    written last: status, inputs' hashes, versions, timing
        checkpoints/     resumable Trainer checkpoints; complete only when COMPLETE exists
        loss.png         loss curve

Final artifacts are written to a temporary sibling and renamed into place, so a crash never
leaves a half-written adapter behind a valid-looking name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHECKPOINT_MARKER = "COMPLETE"


class RunFolderError(RuntimeError):
    pass


# The file align writes into every run folder it creates, before anything else. Only a folder that
# holds it (or a manifest.json that align wrote, for runs made before the marker existed) is ever
# deleted or replaced: a config.yaml or a checkpoints/ folder could be anyone's.
OWNER_MARKER = ".align-run"
# Keys a resumed run may change: how long it goes on and how it logs, not what it trains.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.eval_steps",
    "train.logging_steps",
    "train.save_total_limit",
    "tracking.",
)
# Recipe and stage names become folder names: plain names only, no separators, no '..'.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


# A sample stage's outputs, which dpo and rm stages read through `data: {from: <sample stage>}`.
PAIRS_FILE = "pairs.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
EVAL_PAIRS_FILE = "eval_pairs.jsonl"


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as one path part (letters, digits, '-', '_', '.'), else RunFolderError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise RunFolderError(
            f"{what} {name!r} is not a plain name: use letters, digits, '-', '_' and '.', "
            "no path separators and no '..' (it becomes a folder under runs/)"
        )
    return name


def runs_root() -> Path:
    """Where stage folders live: runs/ in the current folder, or $ALIGN_RUNS (tests, scratch space)."""
    return Path(os.environ.get("ALIGN_RUNS", "runs"))


def stage_folder(recipe_name: str, stage: str = "") -> Path:
    """runs/<recipe>/<stage>: where a stage of a recipe writes and where later stages find it.
    Both names are checked, so the folder is always inside the runs root."""
    check_name(recipe_name, "recipe name")
    if stage:
        check_name(stage, "stage name")
    root = runs_root()
    folder = root / recipe_name / stage
    if not folder.resolve().is_relative_to(root.resolve()):  # e.g. runs/<recipe> is a symlink to elsewhere
        raise RunFolderError(f"{folder} resolves to {folder.resolve()}, outside the runs folder {root.resolve()}")
    return folder


def written_by_align(folder: Path) -> bool:
    """True only for a folder align provably made: its owner marker, or a manifest align wrote."""
    if (folder / OWNER_MARKER).is_file():
        return True
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "align" in (manifest.get("versions") or {}) and "written_at" in manifest


def claim_folder(folder: Path, kind: str) -> None:
    """Create ``folder`` (or take an empty one) and mark it as align's."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": "align", "kind": kind, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(folder / OWNER_MARKER, json.dumps(marker) + "\n")


def remove_align_folder(folder: Path) -> None:
    """Delete a folder align wrote, atomically as seen from its path: it is renamed aside first, so a
    kill mid-delete leaves a hidden ``.<name>.replaced-*`` sibling (swept later), never a half
    folder under the run's own name that a --resume could trust."""
    if not written_by_align(folder):
        raise RunFolderError(
            f"{folder} was not written by align (no {OWNER_MARKER} marker and no align manifest.json); "
            "refusing to delete it - move it away yourself or choose another --output-dir"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
    os.replace(folder, aside / folder.name)
    shutil.rmtree(aside)


def remove_replaced_leftovers(folder: Path) -> None:
    """Hidden siblings of ``folder`` that a killed ``remove_align_folder`` left behind."""
    for path in folder.parent.glob(f".{folder.name}.replaced-*"):
        shutil.rmtree(path, ignore_errors=True)


def prepare_run_folder(folder: Path, overwrite: bool, resume: bool, kind: str = "stage") -> None:
    """Refuse to write into a folder that holds a user's earlier run unless told what to do.

    --overwrite replaces only a folder align wrote (``written_by_align``); anything else is the
    user's and is never deleted. A new or empty folder is claimed with the owner marker.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; choose one")
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a run folder")
    if folder.parent.is_dir():
        remove_replaced_leftovers(folder)
    if folder.exists() and any(folder.iterdir()):
        if not written_by_align(folder):
            raise RunFolderError(
                f"{folder} is not empty and was not written by align (no {OWNER_MARKER} marker, no align "
                "manifest.json); "
                "refusing to touch it - choose another --output-dir"
            )
        if resume:
            return
        if not overwrite:
            raise RunFolderError(
                f"{folder} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or --output-dir for a new folder"
            )
        remove_align_folder(folder)
    elif resume:
        raise RunFolderError(f"--resume: {folder} has no run to resume")
    claim_folder(folder, kind)


def check_resume_config(folder: Path, new_config: dict) -> None:
    """A resumed run must train the same thing: only RESUMABLE_CHANGES may differ."""
    import yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return
    changed = config_changes(
        yaml.safe_load(path.read_text(encoding="utf-8")) or {}, new_config, ignore=RESUMABLE_CHANGES
    )
    if changed:
        raise RunFolderError(
            f"--resume: {folder} was trained with a different config ({', '.join(changed[:6])}); use a new --output-dir"
        )


def config_changes(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key old -> new' for every dotted key whose value differs, keys starting with ``ignore`` left out."""
    old, new = flatten(old), flatten(new)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(ignore))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop what was logged after the checkpoint: those steps are run again."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    write_atomic(path, "".join(line + "\n" for line in kept))


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose save finished (its marker exists); torn ones are skipped."""
    if not checkpoints.is_dir():
        return None
    complete = [
        path
        for path in checkpoints.glob("checkpoint-*")
        if (path / CHECKPOINT_MARKER).is_file() and path.name.split("-")[-1].isdigit()
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():  # renamed aside first: the name never points at a half-deleted folder
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
            os.replace(target, aside / target.name)
            os.replace(staging, target)
            shutil.rmtree(aside)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_staging_leftovers(folder: Path) -> None:
    """Temporary folders and files of writes a kill interrupted (never renamed into place)."""
    for path in list(folder.glob(".*.tmp*")) + list((folder / "checkpoints").glob(".*.tmp*")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (torn ones go too)."""
    numbered = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in numbered if (p / CHECKPOINT_MARKER).is_file()]
    for path in numbered:
        if path not in complete[-keep:]:
            shutil.rmtree(path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_hash(path: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 of a file, or of a folder's files (names and contents) less those whose name is in ``skip``."""
    digest = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip) if path.is_dir() else [path]
    for item in paths:
        digest.update(item.name.encode())
        with item.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("align", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def write_manifest(folder: Path, **fields) -> dict:
    manifest = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),  # torchrun / accelerate launch set it
        **fields,
    }
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
