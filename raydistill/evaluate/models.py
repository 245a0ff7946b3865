"""The model an evaluation runs: LoRA adapter folders, their base model, and merged copies."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from raydistill.spec import content_hash


def is_adapter(model_path: str | Path) -> bool:
    return (Path(model_path) / "adapter_config.json").is_file()


def adapter_base(adapter_path: str | Path) -> str:
    """The base model of a LoRA adapter folder (``base_model_name_or_path``), checked."""
    from raydistill.students import StudentError

    config = Path(adapter_path) / "adapter_config.json"
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise StudentError(f"{config}: unreadable adapter config ({reason}); save the adapter again "
                           "with save_pretrained") from None
    if not base or not isinstance(base, str):
        raise StudentError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown; "
                           "set it to the base model's folder or hub id")
    return base


def tokenizer_folder(model_path: str | Path) -> str:
    """Where a model's tokenizer is: its folder, or for an adapter saved without one its base's."""
    folder = Path(model_path)
    return str(folder) if not is_adapter(folder) or (folder / "tokenizer_config.json").is_file() else adapter_base(folder)


def adds_tokens(adapter_path: str | Path) -> bool:
    """Whether a LoRA adapter's tokenizer has more tokens than its base model has embeddings (peft
    then grows the embeddings before applying it, which `merged_model` does and a shared HF host's
    in-memory merge does not: such adapters are merged on disk)."""
    from transformers import AutoConfig, AutoTokenizer

    if not (Path(adapter_path) / "tokenizer_config.json").is_file():  # the base's tokenizer
        return False
    return len(AutoTokenizer.from_pretrained(str(adapter_path))) > AutoConfig.from_pretrained(
        adapter_base(adapter_path)).vocab_size


# The files a loaded model is made of: weights, config, tokenizer (vLLM detokenizes with the
# tokenizer it started with), an adapter's config.
MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "adapter_config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def weights_version(model_path: str) -> tuple:
    """A model folder and the size and modification time of the files it is made of (`MODEL_FILES`):
    a folder written again (a trial trained again after a crash) is loaded again by a host that had
    it loaded. Only file metadata is read, so a host can compare it on every batch."""
    folder = Path(model_path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for pattern in MODEL_FILES for f in folder.glob(pattern))
    return (str(folder), *files)


def model_version(model_path: str | Path) -> tuple:
    """`weights_version` of a model folder; for a LoRA adapter, with its base's (an adapter on a
    base written again is another model)."""
    version = weights_version(model_path)
    return (*version, weights_version(adapter_base(model_path))) if is_adapter(model_path) else version


def merged_model(adapter_path: str | Path) -> str:
    """An HF folder with the LoRA adapter merged into its base model (built once, then cached)."""
    from raydistill.students import STUDENT_INFO_FILE, default_cache_dir, merge_lora

    adapter = Path(adapter_path).resolve()
    stamp = ([str(adapter)] + [(f.name, f.stat().st_mtime_ns) for f in sorted(adapter.iterdir()) if f.is_file()]
             + [weights_version(adapter_base(adapter))])  # the base written again: merged again
    target = default_cache_dir() / "merged" / content_hash(stamp)
    if (target / "config.json").is_file():
        return str(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    merge_lora(adapter, tmp, tokenizer_folder(adapter))
    if (adapter / STUDENT_INFO_FILE).is_file():
        shutil.copy(adapter / STUDENT_INFO_FILE, tmp / STUDENT_INFO_FILE)
    try:
        os.replace(tmp, target)
    except OSError:  # another process merged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
