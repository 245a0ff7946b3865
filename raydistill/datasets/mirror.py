"""Where data files come from: a mirror folder, a local cache, or a verified download.

Every file is named by a relative path that equals its upstream path under one of the roots
pinned in ``raydistill/data/upstream.json`` (``distilling-cot/...``, ``mammoth2-math-eval/...``).
``resolve`` finds it in a mirror folder (``RAYDISTILL_DATA_DIR``), then in a local cache
(``RAYDISTILL_CACHE_DIR``), then downloads it from the pinned commit and checks its sha256.
``read_rows`` reads a file's rows, ``digests`` the sha256 of local copies, and ``build_manifest``
writes the pins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from functools import lru_cache
from pathlib import Path

from raydistill import files
from raydistill.resources import package_data
from raydistill.tasks import TASKS
from raydistill.tasks.base import Field

log = logging.getLogger("raydistill.datasets")  # one logger for the package

ENV_DATA_DIR = "RAYDISTILL_DATA_DIR"
ENV_CACHE_DIR = "RAYDISTILL_CACHE_DIR"
ENV_DATA_URL = "RAYDISTILL_DATA_URL"
ENV_TIMEOUT = "RAYDISTILL_DOWNLOAD_TIMEOUT"
DEFAULT_DATA_URL = "https://raw.githubusercontent.com"
DEFAULT_CACHE_DIR = Path("~/.cache/raydistill/data")
MANIFEST = package_data("upstream.json")
DATASET_INFO = "distilling-cot/train/dataset_info.json"

# Relative root -> upstream repository, commit, folder and the repository's licence (SPDX id)
# (written into raydistill/data/upstream.json).
_COT_REPO = ("EIT-NLP/Distilling-CoT-Reasoning", "cc33822e99534615a87841bd6c2e865e0d24d123")
_MAMMOTH_REPO = ("TIGER-AI-Lab/MAmmoTH2", "9c67cb137b87e3c2f68ab412c6731b1f47a51b55")
ROOTS = {
    "distilling-cot/train/": (*_COT_REPO, "data/", "Apache-2.0"),
    "distilling-cot/test/": (*_COT_REPO, "Evaluation/reasoning_eval/", "Apache-2.0"),
    "mammoth2-math-eval/": (*_MAMMOTH_REPO, "math_eval/dataset/", "MIT"),
}


class DataUnavailable(RuntimeError):
    """A file is neither in the mirror nor in the cache, and cannot be downloaded."""


class ChecksumMismatch(DataUnavailable):
    """A downloaded file does not match its pinned sha256 (the download is deleted)."""


class MalformedData(ValueError):
    """An upstream file or row does not have the expected shape; names file, row and column."""


# ---------------------------------------------------------------------- source resolution


@lru_cache(maxsize=None)
def _manifest(path: Path = MANIFEST) -> dict:
    """raydistill/data/upstream.json: the pinned roots and files (needed to download, not to read a mirror)."""
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing: downloads need the package's raydistill/data/upstream.json "
                              f"(reinstall raydistill), or set {ENV_DATA_DIR} to a mirror")
    return json.loads(path.read_text())


def mirror_dir() -> Path | None:
    value = os.environ.get(ENV_DATA_DIR)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR).expanduser()


def upstream_url(relpath: str) -> str:
    """The pinned download URL of a relative path (base overridable by RAYDISTILL_DATA_URL)."""
    base = (os.environ.get(ENV_DATA_URL) or DEFAULT_DATA_URL).rstrip("/")
    for prefix, root in _manifest()["roots"].items():
        if relpath.startswith(prefix):
            return f"{base}/{root['repo']}/{root['commit']}/{root['path']}{relpath[len(prefix):]}"
    raise DataUnavailable(f"{relpath}: outside the pinned roots {', '.join(_manifest()['roots'])}")


def upstream_root(relpath: str) -> dict | None:
    """The pinned root a relative path lies under (repo, commit, path, license), else None."""
    for prefix, root in _manifest()["roots"].items():
        if relpath.startswith(prefix):
            return root
    return None


def local_path(relpath: str) -> tuple[Path, str] | None:
    """(path, "mirror" | "cache") when the file is already on this machine, else None."""
    mirror = mirror_dir()
    for where, root in (("mirror", mirror), ("cache", cache_dir())):
        if root is not None and (root / relpath).is_file():
            return root / relpath, where
    return None


def resolve(relpath: str) -> Path:
    """Local path of an upstream file: mirror, else cache, else a verified download."""
    if relpath.startswith("/") or ".." in Path(relpath).parts:
        raise ValueError(f"not a relative data path: {relpath!r}")
    found = local_path(relpath)
    if found:
        return found[0]
    return _download(relpath, cache_dir() / relpath)


def _unavailable(relpath: str, reason: str) -> DataUnavailable:
    mirror = mirror_dir()
    searched = f"mirror {mirror}" if mirror else f"no mirror ({ENV_DATA_DIR} unset)"
    reason = " ".join(str(reason).split())
    return DataUnavailable(
        f"{relpath} is not available offline: not in {searched} nor in cache {cache_dir()}, "
        f"and the download failed ({reason}); set {ENV_DATA_DIR} to a mirror that has it, "
        f"or go online")


def _download(relpath: str, dest: Path) -> Path:
    """Fetch ``relpath`` into ``dest`` atomically; verify the pinned sha256 when there is one."""
    entry = _manifest()["files"].get(relpath)
    if entry is None:
        raise _unavailable(relpath, "not a pinned upstream file in raydistill/data/upstream.json")
    url = upstream_url(relpath)
    digest = hashlib.sha256()
    with files.atomic_path(dest) as tmp:  # dest appears only when whole and verified
        try:
            timeout = float(os.environ.get(ENV_TIMEOUT, "10"))
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
            raise _unavailable(relpath, f"{url}: {exc}") from exc
        got, want = digest.hexdigest(), entry.get("sha256")
        if want and got != want:
            raise ChecksumMismatch(f"{relpath}: sha256 {got} of {url} does not match the pinned "
                                   f"{want}; the download was deleted")
    if not want:
        log.warning("%s has no pinned sha256; downloaded sha256 is %s", relpath, got)
    log.info("downloaded %s -> %s", url, dest)
    return dest


# --------------------------------------------------------------------------- reading rows


def read_rows(relpath: str) -> list[dict]:
    """Rows of a JSON-array or JSON-Lines file (AQuA.json is JSON Lines despite its name)."""
    path = resolve(relpath)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedData(f"{relpath}: {path} is not UTF-8 text (byte {exc.start}); the file is "
                            f"damaged: delete it and restore the upstream file") from None
    if not text.strip():
        raise MalformedData(f"{relpath}: {path} is empty; delete it and restore the upstream file")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise MalformedData(f"{relpath}: invalid JSON ({exc})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MalformedData(f"{relpath}: row {i} is a {type(row).__name__}, not an object")
    return rows


def get_field(row: dict, field: Field | None, relpath: str, i: int) -> str:
    """A field of a row as text; a missing column raises MalformedData naming file/row/column."""
    if field is None:
        return ""
    try:
        value = field(row) if callable(field) else row[field]
    except KeyError as exc:
        raise MalformedData(f"{relpath}: row {i} has no column {exc.args[0]!r}") from None
    if value is None or isinstance(value, (dict, list)):
        name = field if isinstance(field, str) else getattr(field, "__name__", "field")
        raise MalformedData(f"{relpath}: row {i} column {name!r} is {value!r}, not text")
    return str(value)


# ---------------------------------------------------------------------- content digests


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(relpath: str) -> str:
    """sha256 of the local copy of a data file (memoised by path, size and mtime)."""
    path = resolve(relpath)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


def digests(relpaths: list[str]) -> dict[str, str]:
    """relative path -> sha256 of its local copy, for a cell's or a trial's identity."""
    return {p: file_digest(p) for p in relpaths}


# ----------------------------------------------------------------------------- pinning


def build_manifest(mirror: Path) -> dict:
    """upstream.json content: the roots, and every upstream file with its sha256 and size.

    Files: every file dataset_info.json lists, the mirrored train/test files of the release,
    and the registry's test files. A file absent from ``mirror`` gets sha256 null.
    """
    info = json.loads((mirror / DATASET_INFO).read_text())
    paths = {"distilling-cot/train/" + e["file_name"] for e in info.values()}
    paths |= {t.test.path for t in TASKS.values()}
    for folder in ("distilling-cot/train", "distilling-cot/test"):
        paths |= {f"{folder}/{p.name}" for p in (mirror / folder).glob("*") if p.is_file()}
    files = {}
    for rel in sorted(paths):
        p = mirror / rel
        files[rel] = ({"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                       "bytes": p.stat().st_size} if p.is_file() else
                      {"sha256": None, "bytes": None})
    roots = {k: {"repo": r, "commit": c, "path": p, "license": lic} for k, (r, c, p, lic) in ROOTS.items()}
    return {"roots": roots, "files": files}
