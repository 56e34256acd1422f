"""Scratch folders for an engine's copy of the model (usually in RAM, /dev/shm), and their clean-up.

An exported base is as large as the model. Its folder must not outlive its engine: the engine
removes it on close, garbage collection and interpreter exit, but a SIGKILL or the OOM killer runs
none of those, so every engine start first removes the folders of dead engines (``remove_orphans``):
a folder is named ``align-vllm-<pid>-*`` and holds an owner record naming the process that made it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

SCRATCH_PREFIX = "align-vllm-"
OWNER_FILE = "owner"  # "<pid> <pid namespace> <start time>" of the process that made the folder


def scratch_roots() -> list[Path]:
    return [Path("/dev/shm"), Path(tempfile.gettempdir())]


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); None if no such process.

    The start time tells a reused pid from the process that made a folder. Off Linux (no /proc)
    it is "" for every live process, so there only liveness counts.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # A zombie (killed, not yet reaped by its parent) answers kill(pid, 0) but never runs again.
        return None if fields[0] == "Z" else fields[19]
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ""  # it exited just now
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's pid namespace: containers sharing /dev/shm but not pids must not judge each other's folders."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def remove_orphans(roots: list[Path] | None = None) -> list[Path]:
    """Delete the scratch folders of engines whose process is gone; returns what was deleted.

    A folder is removed only when its owner record says it was made in this pid namespace and
    that process no longer exists (or its pid now belongs to a process that started later). The
    folders of live engines, of other pid namespaces, and those without an owner record (made by
    older align versions, or by an engine killed between creating the folder and writing the
    record) are left alone: nothing ties them to a dead process, and removing a live engine's
    base would break its next weight load.
    """
    namespace = pid_namespace()
    removed = []
    for root in roots or scratch_roots():
        try:
            candidates = [p for p in root.iterdir() if re.fullmatch(re.escape(SCRATCH_PREFIX) + r"\d+-.+", p.name)]
        except OSError:
            continue
        for folder in candidates:
            try:
                pid = int(folder.name.removeprefix(SCRATCH_PREFIX).split("-")[0])
                owner = (folder / OWNER_FILE).read_text().split(" ")
            except (OSError, ValueError):
                continue
            if len(owner) != 3 or owner[0] != str(pid) or owner[1] != namespace:
                continue
            started = start_time(pid)
            if started is None or (started and owner[2] and started != owner[2]):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def scratch_dir(nbytes: int, root: Path | None = None) -> Path:
    """A temporary folder in ``root``, else a RAM-backed one when /dev/shm has room for ``nbytes``, else a disk one.

    Named ``align-vllm-<pid>-*`` with an owner record inside, so a later engine can tell whether
    the process that made it is still alive (``remove_orphans``).
    """
    shm = Path("/dev/shm")
    prefix = f"{SCRATCH_PREFIX}{os.getpid()}-"
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    elif shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    else:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / OWNER_FILE).write_text(f"{os.getpid()} {pid_namespace()} {start_time(os.getpid())}")
    return folder
