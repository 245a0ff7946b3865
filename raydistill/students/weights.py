"""Where a student's weights come from, and their identity.

:func:`resolve_student` turns a name or a local folder into an HF folder that
``AutoModelForCausalLM.from_pretrained`` loads. Hub students are fetched and built students built
once per cache directory (``RAYDISTILL_CACHE_DIR``), never into a node's own Hugging Face cache:
on a cluster that directory is shared storage, so the folder the sweep resolves on its head is the
one the GPU nodes open (:func:`require_model_folder` says so on a node that cannot see it).
Concurrent builders build into a temporary folder and publish it by atomic rename.
:func:`weights_digest` identifies a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from raydistill import files
from raydistill.students.errors import StudentError
from raydistill.students.registry import Student, get_student, save_student_info

_COMPLETE_MARKER = ".raydistill-complete"
_DIGEST_CACHE = ".raydistill-digest.json"


def default_cache_dir() -> Path:
    """``$RAYDISTILL_CACHE_DIR`` or ``~/.cache/raydistill/models``."""
    env = os.environ.get("RAYDISTILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raydistill" / "models"


# --------------------------------------------------------------------------- resolution


def resolve_student(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """An HF folder (config, weights, tokenizer) for a registered student or a local folder.

    Built students (``smollm2-135m``, ``tiny-llama``) are built once into ``cache_dir``
    (default :func:`default_cache_dir`); hub students are fetched into its ``hub`` folder, laid
    out as a Hugging Face cache (``hub/models--ORG--NAME/snapshots/COMMIT``).
    """
    student = get_student(name_or_path)
    if student.path is not None:
        return _check_hf_folder(student.path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if student.build is not None:
        return _cached_build(student, root)
    return _download(student, root / HUB_FOLDER)


def require_model_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a folder this process can open, or a `StudentError` saying that this node does not
    see it: a model folder resolved on another machine (the sweep's head) that is not on storage
    shared with this one."""
    import socket

    folder = Path(path)
    if not folder.is_dir():
        raise StudentError(
            f"{what}: the model folder {folder} does not exist on this node ({socket.gethostname()}); it was "
            "resolved on the machine that started the sweep. On a cluster, RAYDISTILL_CACHE_DIR (where students "
            "are fetched and built) and the output folder must be storage every node mounts at the same path "
            "(docs/cluster.md, 'Storage')")
    return folder


def _check_hf_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        hint = ("it holds a LoRA adapter (adapter_config.json): evaluate it with raydistill eval --model, or "
                "merge it into its base first" if (folder / "adapter_config.json").is_file() else
                "pass a folder written by save_pretrained (config.json, weights, tokenizer files)")
        raise StudentError(f"{folder} is not a Hugging Face model folder (no config.json); {hint}")
    return folder


HUB_FOLDER = "hub"  # under the cache directory: hub students, in the Hugging Face cache layout


def _download(student: Student, cache: Path) -> Path:
    """The student's hub repository in ``cache``; the token, if any, is huggingface_hub's own (HF_TOKEN)."""
    from huggingface_hub import list_repo_files, snapshot_download

    ignore = ["original/*", "*.pth", "*.msgpack", "*.h5", "*.ot", "onnx/*", "*.onnx", "flax_*", "tf_*"]
    try:
        try:
            return Path(snapshot_download(student.source, cache_dir=cache, local_files_only=True,
                                          ignore_patterns=ignore + ["*.bin"]))
        except Exception:
            pass  # not (fully) cached: go to the hub
        repo_files = list_repo_files(student.source)
        if any(f.endswith(".safetensors") for f in repo_files):
            ignore.append("*.bin")
        return Path(snapshot_download(student.source, cache_dir=cache, ignore_patterns=ignore))
    except Exception as err:  # offline, gated, missing: all end the same way for the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise StudentError(
            f"cannot fetch {student.name} ({student.source}) from the Hugging Face hub: {reason} -- "
            f"download it where the hub is reachable (hf download {student.source} --local-dir DIR) "
            f"and pass that local folder DIR instead of {student.name!r}"
        ) from err


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _cached_build(student: Student, root: Path) -> Path:
    """Build ``student`` into ``root/<name>-r<revision>`` once: temp folder, marker, rename."""
    assert student.build is not None
    final = root / f"{student.name}-r{student.revision}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with files.exclusive_lock(root / f".{final.name}.lock"):
        if _is_complete(final):
            return final
        if final.exists():  # incomplete, left by something other than this function
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
        try:
            started = time.time()
            student.build(tmp)
            save_student_info(tmp, student)
            marker = {"name": student.name, "source": student.source, "revision": student.revision,
                      "build_seconds": round(time.time() - started, 1)}
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            try:
                os.rename(tmp, final)  # atomic; fails if another builder got there first
            except OSError:
                if not _is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- identity


def weights_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over every file of a model folder (weights, config, tokenizer, chat template, our
    student info), hidden files aside: the model's part of a trial's identity.

    Each file's sha256 is kept in ``.raydistill-digest.json`` in the folder, keyed by its size and
    mtime, so a folder is read once (about a second per GB); a read-only folder is hashed each time.
    """
    import hashlib

    root = Path(folder)
    weight_files = sorted(p for p in root.rglob("*") if p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not weight_files:
        raise StudentError(f"{root}: no files to identify the model by; pass a Hugging Face model folder")
    cache_path = root / _DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, fresh = {}, {}
    for path in weight_files:
        name, stat = path.relative_to(root).as_posix(), path.stat()
        known = cache.get(name)
        if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            digests[name] = known[2]
        else:
            digests[name] = _file_sha256(path)
        fresh[name] = [stat.st_size, stat.st_mtime_ns, digests[name]]
    if fresh != cache:
        with contextlib.suppress(OSError):
            files.write_json(cache_path, fresh, indent=1)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def merge_lora(adapter: str | os.PathLike[str], out: str | os.PathLike[str],
               tokenizer_from: str | os.PathLike[str] | None = None) -> None:
    """Write into `out` a plain HF folder: the LoRA `adapter` merged into its base model, with the
    tokenizer of `tokenizer_from` (default: the adapter's folder)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_from or adapter)).save_pretrained(out)
