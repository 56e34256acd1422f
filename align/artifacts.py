"""Stage output folders: what is in them, how they are written, and when they may be reused.

    runs/<recipe>/<stage>/
        config.yaml      resolved stage config
        adapter/         peft adapter (or model/ for full fine-tuning), tokenizer beside it
        metrics.jsonl    one JSON object per logged step
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
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHECKPOINT_MARKER = "COMPLETE"


class RunFolderError(RuntimeError):
    pass


def prepare_run_folder(folder: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a folder that holds a user's earlier run unless told what to do."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; choose one")
    if folder.exists() and any(folder.iterdir()):
        if resume:
            return
        if not overwrite:
            raise RunFolderError(
                f"{folder} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or --output-dir for a new folder"
            )
        shutil.rmtree(folder)
    elif resume:
        raise RunFolderError(f"--resume: {folder} has no run to resume")
    folder.mkdir(parents=True, exist_ok=True)


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose save finished (its marker exists); torn ones are skipped."""
    if not checkpoints.is_dir():
        return None
    complete = [
        path for path in checkpoints.glob("checkpoint-*")
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
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
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
    manifest = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(), **fields}
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
