"""The durable request cache: JSON Lines shards under `<output_dir>/request-cache/`, one per
writer, keyed by `request_key` (model, messages, sampling parameters). Reads skip damaged records
with a warning; an append that fails is cut back off its shard (`CacheWriteError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any], sample: int = 0) -> str:
    """sha256 of (model, messages, sampling params[, sample index]): the identity of one teacher
    request. Sample 0 (one sample per question) has the key it had before samples existed."""
    ident: dict[str, Any] = {"model": model, "messages": messages, "params": params}
    if sample:
        ident["sample"] = sample
    blob = json.dumps(ident, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def prompt_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


_CACHE_FIELDS = frozenset({"key", "response"})  # what a record must have to be served
_RECORD_START = b'{"key": "'  # every record line starts so (the writer puts "key" first)


class CacheWriteError(RuntimeError):
    """A record could not be appended to the request cache (disk full, folder gone): the run stops
    rather than leave a torn record in the shard."""


class RequestCache:
    """Completed responses, durable as they arrive: append-only JSON Lines shards in one folder.

    Each writer (one per actor process) appends to its own shard, so there is no locking. A failed
    append is cut back off the shard and stops the run (:class:`CacheWriteError`); a crash can
    still leave a half-written last line. Readers skip damaged records with a warning naming the
    shard and line (their requests are sent again) and recover a whole record written after a
    torn one on the same line. When a key has two different responses (two runs sampled the same
    request at once), the earliest is served, also with a warning. The folder must be on a POSIX
    file system that every node reaches (local disk for one machine, NFS or similar for a
    cluster).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.exists() else []

    def load(self, keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """key -> record for the wanted keys (all if None)."""
        out: dict[str, dict[str, Any]] = {}
        where: dict[str, str] = {}
        problems: list[str] = []
        for shard in self.shards():
            with open(shard, "rb") as f:
                for number, line in enumerate(f, 1):
                    for rec, problem in _records_of_line(line, keys):
                        place = f"{shard}:{number}"
                        if problem:
                            problems.append(f"{place}: {problem}")
                            continue
                        known = out.get(rec["key"])
                        if known is not None and known["response"] != rec["response"]:
                            problems.append(f"{place}: key {rec['key'][:12]} has another response at "
                                            f"{where[rec['key']]}; the earlier one is served")
                            if known.get("t", 0) <= rec.get("t", 0):
                                continue
                        out[rec["key"]], where[rec["key"]] = rec, place
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            log.warning("request cache: %d damaged or conflicting record(s), damaged ones are sent again: %s",
                        len(problems), shown)
        return out

    def writer(self, fsync: bool = False) -> "CacheWriter":
        return CacheWriter(self.root, fsync)


def _records_of_line(line: bytes, keys: set[str] | None) -> list[tuple[dict[str, Any] | None, str | None]]:
    """The records of one shard line as (record, None) or (None, what is wrong with it). A line
    normally holds one record; after a torn append it holds the torn part, then a whole record."""
    if not line.endswith(b"\n"):
        return [(None, "cut short (the last line of a crashed writer)")]
    parts = line.split(_RECORD_START)[1:] if line.startswith(_RECORD_START) else [None]
    if parts == [None]:
        return [(None, "not a cache record")]
    found: list[tuple[dict[str, Any] | None, str | None]] = []
    for k, part in enumerate(parts):
        text = _RECORD_START + part
        key = part[:64].decode("ascii", "replace")
        if keys is not None and key not in keys and k == len(parts) - 1 and len(parts) == 1:
            return []  # not wanted: not parsed
        try:
            rec = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            found.append((None, "torn (a failed append)" if k < len(parts) - 1 else "not JSON"))
            continue
        if not isinstance(rec, dict) or not _CACHE_FIELDS <= rec.keys():
            found.append((None, "missing key or response"))
        elif not isinstance(rec["response"], str):
            found.append((None, f"response is {type(rec['response']).__name__}, not text"))
        elif keys is None or rec["key"] in keys:
            found.append((rec, None))
    return found


class CacheFollower:
    """Where the records appended to a cache folder since this follower started are, read
    incrementally (each byte once). An actor that takes over the batch of an actor that died
    serves what the dead one had already completed instead of sending it again."""

    def __init__(self, root: Path, since: dict[str, int]):
        """``since``: each shard's size when the run started (the driver served what came before)."""
        self.root = root
        self.offsets = {Path(shard): size for shard, size in since.items()}
        self.places: dict[str, tuple[Path, int]] = {}

    def refresh(self) -> None:
        for shard in RequestCache(self.root).shards():
            start = self.offsets.get(shard, 0)
            with open(shard, "rb") as f:
                f.seek(start)
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
            at = start
            for line in whole.splitlines(keepends=True):
                if line.startswith(_RECORD_START):
                    self.places[line[len(_RECORD_START):len(_RECORD_START) + 64].decode("ascii", "replace")] = (shard, at)
                at += len(line)
            self.offsets[shard] = start + len(whole)

    def find(self, key: str) -> dict[str, Any] | None:
        """The record of ``key`` appended since the start, if it is whole."""
        place = self.places.get(key)
        if place is None:
            return None
        with open(place[0], "rb") as f:
            f.seek(place[1])
            line = f.readline()
        return next((rec for rec, problem in _records_of_line(line, {key}) if rec is not None), None)


class CacheWriter:
    def __init__(self, root: Path, fsync: bool = False):
        root.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.path = root / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync = fsync
        self.failed: str | None = None

    def append(self, record: dict[str, Any]) -> None:
        """Append one record whole, or cut the partial write back off and raise CacheWriteError."""
        if self.failed:
            raise CacheWriteError(self.failed)
        # "key" first, so readers can skip unwanted lines without parsing them.
        line = json.dumps({"key": record["key"], **{k: v for k, v in record.items() if k != "key"}},
                          ensure_ascii=False) + "\n"
        data = line.encode()
        size = os.fstat(self.fd).st_size  # this writer is the shard's only one
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
            if self.fsync:
                os.fsync(self.fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)  # truncating frees space, so it works on a full disk too
            self.failed = (f"request cache: could not append to {self.path} ({err.strerror or err}); the records "
                           "before it are whole. Make room (or fix the folder) and rerun: completed requests are "
                           "not sent again")
            raise CacheWriteError(self.failed) from None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
