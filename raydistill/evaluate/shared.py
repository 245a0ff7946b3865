"""Evaluation engines that outlive a trial (``eval.shared_engines: true``).

Per trial, the engines otherwise start anew: HF in fresh Ray Data actors (a process starts, imports
torch and transformers and loads the model before the first batch, `eval_first_batch` in a trial's
time breakdown), vLLM in fresh ray.data.llm engines (and on GPU a CUDA graph capture each). Shared
engines are named, detached actors, one per actor slot of an actor shape, that the sweep's trials
find by name:

- `EngineHost` (HF) keeps its process and imports and loads the weights a call names only when
  they differ from the last call's (the next trial's model); the same `HFEngine` generates, so the
  predictions are those of per-trial actors. LoRA adapters are merged in memory into a copy of
  their base, which stays loaded, instead of on disk (`merged_model`).
- `VLLMHost` keeps a vLLM engine per base model: LoRA adapters of that base are applied per
  request, ``max_loras`` of them kept loaded side by side, so a LoRA sweep starts one engine. A full
  fine-tune has weights of its own, so its trial starts an engine (vLLM's in-place
  ``reload_weights`` did not reproduce a fresh engine's generations when the embeddings changed).
  Requests and outputs are mapped as on per-trial engines (`vllm_pre`, `vllm_post`), so the
  predictions agree as two vLLM runs do.

On CPU the hosts reserve no CPU of their own; the trial's evaluation task holds the CPUs they work
with (`host_cpus`), so an idle host does not keep a training worker from starting. A vLLM host on
GPU holds its GPU (and ``cpus_per_actor`` CPUs) for the whole sweep: size the cluster for it. The
sweep stops the hosts when it ends (`stop_engine_hosts`), or when an evaluation runs past
``eval.timeout_s``.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import numpy as np

from raydistill.spec import EvalSpec

NAMESPACE = "raydistill-engines"


def host_cpus(spec: EvalSpec) -> float:
    """The CPUs a trial's evaluation holds while shared hosts generate for it (none for hosts on GPU,
    which hold their own)."""
    return spec.cpus_per_actor * spec.num_actors if spec.shared_engines and not spec.use_gpu else 0


class EngineHost:
    """One long-lived HF engine (a Ray actor): generates a batch with the weights the call names.
    A LoRA adapter is merged into its base in memory, the base loaded once for all its adapters."""

    def __init__(self):
        self.engine, self.loaded, self.base, self.base_loads = None, None, None, 0

    def generate(self, model_path: str, template_name: str, spec: dict, stop_strings: list[str],
                 rows: list[dict]) -> list[dict]:
        from raydistill.evaluate.hf_engine import HFEngine
        from raydistill.evaluate.models import is_adapter

        wanted = (weights_version(model_path), template_name, repr(sorted(spec.items())), tuple(stop_strings))
        if wanted != self.loaded:  # another trial's model: load it into this process
            import torch

            self.engine, self.loaded = None, None  # the last model goes before the next one loads
            # the threads a per-trial actor of cpus_per_actor CPUs gets from Ray (OMP_NUM_THREADS)
            torch.set_num_threads(max(1, math.floor(spec["cpus_per_actor"])))
            started = time.perf_counter()
            merged = self._merged(model_path) if is_adapter(model_path) else None
            self.engine, self.loaded = HFEngine(model_path, template_name, spec, stop_strings, merged), wanted
            self.engine.load_seconds = time.perf_counter() - started  # with the merge
        batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
        out = self.engine(batch)
        return [{key: _plain(values[i]) for key, values in out.items()} for i in range(len(out["prompt"]))]

    def _merged(self, adapter: str):
        """The LoRA ``adapter`` merged into a copy of its base, the weights `merged_model` writes
        (peft's AutoPeftModelForCausalLM on the base as transformers loads it by default); the base
        stays loaded for the next adapter of it."""
        import copy

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from raydistill.evaluate.models import adapter_base

        base = adapter_base(adapter)
        if self.base is None or self.base[0] != weights_version(base):
            self.base = None
            self.base = (weights_version(base), AutoModelForCausalLM.from_pretrained(base))
            self.base_loads += 1
        return PeftModel.from_pretrained(copy.deepcopy(self.base[1]), adapter).merge_and_unload()

    def pid(self) -> int:
        import os

        return os.getpid()

    def bases_loaded(self) -> int:
        """How often a LoRA base was loaded (once per base while its adapters come in turn)."""
        return self.base_loads

    def close(self) -> None:
        self.engine, self.loaded, self.base = None, None, None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


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


class VLLMHost:
    """One long-lived vLLM engine (a Ray actor): started again only when a call names other model
    files (`weights_version`) or engine arguments; LoRA adapters of its base applied per request."""

    def __init__(self):
        self.llm, self.shape, self.starts, self.adapters = None, None, 0, {}

    def generate(self, model_path: str, template_name: str, spec: EvalSpec, stop_strings: list[str], context: int,
                 lora, rows: list[dict]) -> list[dict]:
        """`vllm_post` rows for the `replicate_samples` rows ``rows`` on ``model_path`` (with ``lora``,
        a `LoraPlan`, the adapter's base, each request applying the adapter)."""
        from vllm import SamplingParams

        from raydistill.evaluate.vllm_engine import vllm_post, vllm_pre

        self._load(model_path, spec, context, lora)
        requests = [vllm_pre(r, model_path, template_name, spec, stop_strings) for r in rows]
        outputs = self.llm.generate([{"prompt_token_ids": list(r["tokenized_prompt"])} for r in requests],
                                    [SamplingParams(**r["sampling_params"]) for r in requests],
                                    lora_request=self._adapter(lora.adapter) if lora else None, use_tqdm=False)
        return [vllm_post({**r, "generated_tokens": list(o.outputs[0].token_ids), "generated_text": o.outputs[0].text},
                          model_path, template_name, stop_strings, spec.max_new_tokens)
                for r, o in zip(requests, outputs)]

    def _load(self, model_path: str, spec: EvalSpec, context: int, lora) -> None:
        """Start an engine unless the running one has these model files and engine arguments.

        A full fine-tune's weights are not reloaded into a running engine: vLLM's ``reload_weights``
        (0.32) left generations different from a fresh engine's when the tied embeddings changed.
        """
        from raydistill.evaluate.vllm_engine import vllm_engine_kwargs

        kwargs = vllm_engine_kwargs(spec, context, lora)
        if lora:
            kwargs["max_loras"] = spec.max_loras
        shape = (weights_version(model_path), json.dumps(kwargs, sort_keys=True))
        if shape != self.shape:
            from vllm import LLM

            self.close()
            self.llm = LLM(model=model_path, **kwargs)
            self.shape, self.starts = shape, self.starts + 1

    def _adapter(self, path: str):
        from vllm.lora.request import LoRARequest

        version = weights_version(path)  # vLLM keeps max_loras adapters loaded, the least recently used goes
        if version not in self.adapters:
            number = len(self.adapters) + 1
            self.adapters[version] = LoRARequest(lora_name=f"adapter-{number}", lora_int_id=number, lora_path=path)
        return self.adapters[version]

    def close(self) -> None:
        """Shut the engine down (its engine-core process included)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.shape, self.adapters = None, None, {}
        gc.collect()

    def engine_starts(self) -> int:
        return self.starts

    def pid(self) -> int:
        import os

        return os.getpid()


def host_names(spec: EvalSpec, group: str, engine: str = "hf") -> list[str]:
    """The names of the hosts a sweep (``group``) evaluates with under ``spec`` on ``engine``."""
    return [f"{group}-{engine}-{i}" for i in range(spec.num_actors)]


def engine_hosts(spec: EvalSpec, group: str, engine: str = "hf") -> list:
    """The sweep's shared hosts for ``spec`` (``num_actors`` of them), started on first use. On
    CPU they reserve nothing (`host_cpus`); a vLLM host on GPU holds its GPU and CPUs."""
    import ray

    host = ray.remote(VLLMHost if engine == "vllm" else EngineHost)
    holds = {"num_cpus": spec.cpus_per_actor, "num_gpus": 1} if spec.use_gpu else {"num_cpus": 0}
    return [host.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", **holds,
                         resources=spec.resources_per_actor or None).remote()
            for name in host_names(spec, group, engine)]


def generate_on_hosts(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                      stop_strings: list[str], group: str):
    """Rows with generations, one list per finished batch of ``spec.batch_size`` prompts (in the
    order given: `generate_batches` sorts them by length)."""
    from ray.util import ActorPool

    batches = [prompts[i:i + spec.batch_size] for i in range(0, len(prompts), spec.batch_size)]
    dumped = spec.model_dump(mode="json")
    pool = ActorPool(engine_hosts(spec, group))
    yield from pool.map_unordered(
        lambda host, rows: host.generate.remote(model_path, template_name, dumped, stop_strings, rows), batches)


def generate_on_vllm_hosts(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                           stop_strings: list[str], context: int, lora, group: str):
    """`generate_on_hosts` on the group's `VLLMHost` engines: each batch is ``spec.batch_size``
    questions with all their samples (`replicate_samples`), so every list comes back whole."""
    from ray.util import ActorPool

    from raydistill.evaluate.vllm_engine import replicate_samples, whole_questions

    batches = [replicate_samples(prompts[i:i + spec.batch_size], spec.n_samples)
               for i in range(0, len(prompts), spec.batch_size)]
    pool = ActorPool(engine_hosts(spec, group, "vllm"))
    yield from whole_questions(pool.map_unordered(lambda host, rows: host.generate.remote(
        model_path, template_name, spec, stop_strings, context, lora, rows), batches), spec.n_samples)


CLOSE_TIMEOUT_S = 30  # how long a host gets to shut its engine down before it is killed


def stop_engine_hosts(group: str, specs: list[EvalSpec]) -> int:
    """Kill the sweep's shared hosts; returns how many were running."""
    import ray

    stopped = 0
    for name in {n for spec in specs for engine in ("hf", "vllm") for n in host_names(spec, group, engine)}:
        try:
            host = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # never started, or already gone
            continue
        ray.wait([host.close.remote()], timeout=CLOSE_TIMEOUT_S)  # a stuck host is killed all the same
        ray.kill(host)
        stopped += 1
    return stopped
