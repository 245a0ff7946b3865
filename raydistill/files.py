"""Files written whole or not at all, and a lock for work two runs must not do at once.

Every output raydistill writes goes through :func:`atomic_path`: the content is written under a
temporary name unique to this host, process and call, beside the target, then renamed over it.
Readers see the old file or the new one, never a torn one. Two runs writing the same file (two
sweeps sharing an annotation cell) both succeed and the last rename wins; such files are named
by the hash of what they hold, so both write the same content.

:func:`exclusive_lock` serializes work that is costly to do twice (a cell's teacher requests):
an ``flock`` on a file beside the work, released when the holder ends, also when it is killed.
Linux NFS clients (EFS, Filestore) carry ``flock`` to the server as a POSIX lock, so the lock
holds between the nodes of a cluster sharing the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def temp_path_beside(path: Path) -> Path:
    """A hidden name in ``path``'s folder that no other writer uses."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename, on error it
    is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_parquet(table: Any, path: str | os.PathLike) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing; ``flock`` through :mod:`filelock`).
    When another process holds it, log ``waiting`` once and block until it is released."""
    from filelock import FileLock, Timeout

    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            log.info(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def exclusive_locks(paths: list[Path], waiting: str | None = None) -> Iterator[None]:
    """Locks on several paths, taken in sorted order (two runs taking overlapping sets cannot
    deadlock)."""
    with contextlib.ExitStack() as stack:
        for path in sorted(set(paths)):
            stack.enter_context(exclusive_lock(path, waiting.format(path=path.parent) if waiting else None))
        yield
