"""One writer per directory: a lock file beside a run or cache directory being written.

Two commands writing the same run directory would clobber each other's checkpoints and metrics
silently; the second one fails at once instead, naming the holder. A lock left by a killed
process (its pid is gone on this host) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only


class LockedError(RuntimeError):
    """Another live process holds the directory."""


def lock_path(directory: str | Path) -> Path:
    """``runs/teacher`` -> ``runs/.teacher.lock`` (beside it: a cache directory is swapped whole)."""
    directory = Path(directory).resolve()
    return directory.parent / f".{directory.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process killed between create and write


@contextmanager
def directory_lock(directory: str | Path, purpose: str) -> Iterator[None]:
    """Hold the lock of ``directory`` for the block. Only the launching process (global rank 0)
    takes it: DDP ranks that Lightning starts later belong to the same command."""
    if rank_zero_only.rank != 0:
        yield
        return
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"{directory} is a file, not a folder; remove it or choose another folder")
    Path(directory).mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{directory} is not writable; choose a folder you can write to")
    path = lock_path(directory)
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.time(), "purpose": purpose}
    empty_reads = 0
    while not _try_create(path, record):
        held = _holder(path)
        if held is None:
            continue  # released meanwhile
        if not held and empty_reads < 10:
            empty_reads += 1  # its writer may be between creating and filling it
            time.sleep(0.1)
            continue
        pid, their_host = held.get("pid"), held.get("host")
        if isinstance(pid, int) and their_host == host and _alive(pid):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
            raise LockedError(
                f"{directory} is being written by another mtkd command ({held.get('purpose')}, "
                f"pid {pid}, started {started}). Wait for it to finish, or use another directory."
            )
        if held and their_host != host:
            raise LockedError(
                f"{directory} is locked by pid {pid} on host {their_host} ({path}). If that "
                f"process is gone, delete {path}."
            )
        if _holder(path) == held:
            path.unlink(missing_ok=True)  # stale: its writer was killed
    try:
        yield
    finally:
        if _holder(path) == record:
            path.unlink(missing_ok=True)
