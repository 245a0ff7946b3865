"""Evaluation engines that outlive a trial (``eval.shared_engines: true``).

Per trial, the engines otherwise start anew: HF in fresh Ray Data actors (a process starts, imports
torch and transformers and loads the model before the first batch, `eval_first_batch` in a trial's
time breakdown), vLLM in fresh ray.data.llm engines (and on GPU a CUDA graph capture each). Shared
engines are named, detached actors, ``num_actors`` of them, that the sweep's trials find by name
(`host_names`):

- `EngineHost` (HF) keeps its process and imports and loads the weights a call names only when
  they differ from the last call's (the next trial's model); the same `HFEngine` generates, so the
  predictions are those of per-trial actors. LoRA adapters are merged in memory into a copy of
  their base, which stays loaded, instead of on disk (`merged_model`). Each trial slot (a trial
  driver process that Tune hands from trial to trial) has hosts of its own (`hosts_group`), so
  trials that evaluate at the same time do not queue behind one host.
- `VLLMHost` keeps a vLLM engine per engine shape (architecture, tokenizer, engine arguments): a
  full fine-tune's weights are reloaded into it in place (vLLM's ``reload_weights``, with the CPU
  backend's packed embedding GEMMs refreshed, `WeightsReload`); LoRA adapters of its base are
  applied per request, ``max_loras`` of them kept loaded side by side. A sweep of one student
  starts one engine per host for its full fine-tunes and one for its LoRA trials; all the sweep's
  trials share the hosts. Requests and outputs are mapped as on per-trial engines (`vllm_pre`,
  `vllm_post`), so the predictions agree as two vLLM runs do.

On CPU the hosts reserve no CPU of their own; the trial's evaluation task holds the CPUs they work
with (`host_cpus`), so an idle host does not keep a training worker from starting. A vLLM host on
GPU holds its GPU (and ``cpus_per_actor`` CPUs) for the whole sweep: size the cluster for it. The
sweep stops the hosts when it ends (`stop_engine_hosts`); an evaluation that runs past
``eval.timeout_s`` stops those it used.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from raydistill.evaluate.models import model_version, weights_version
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

        wanted = (model_version(model_path), template_name, repr(sorted(spec.items())), tuple(stop_strings))
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
        version = weights_version(base)
        if self.base is None or self.base[0] != version:
            self.base = None  # the last base goes before the next one loads
            self.base = (version, AutoModelForCausalLM.from_pretrained(base))
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


# Config fields that do not shape a vLLM engine (the engine arguments set the dtype), and the
# files besides the config that do: the tokenizer (vLLM detokenizes with the one it started with)
# and the generation config (its EOS ids end requests).
NOT_SHAPE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
SHAPE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json")


def engine_shape(model_path: str) -> str:
    """What a vLLM engine started from ``model_path`` is fixed to besides the weights: the
    architecture (the model's config as transformers reads it, but for the fields in `NOT_SHAPE`)
    and the files in `SHAPE_FILES`. Models of one shape are reloaded into a running engine."""
    from transformers import AutoConfig

    folder = Path(model_path)
    config = {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items() if k not in NOT_SHAPE}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in SHAPE_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


class WeightsReload:
    """Methods a shared host's vLLM workers gain (``worker_extension_cls``), called by name through
    ``collective_rpc`` after vLLM's own ``reload_weights``."""

    def refresh_cpu_embedding_gemms(self) -> int:
        """Pack the embedding-shaped layers' CPU GEMMs again from their current weights; returns how
        many. vLLM's CPU backend packs them at load (``dispatch_cpu_unquantized_gemm``, weights
        kept) and its in-place reload (0.32) does not pack them again when the checkpoint names
        no weight of theirs: a tied ``lm_head`` kept projecting with the old embeddings, so
        generations after a reload differed from a fresh engine's. Nothing to do on GPU."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        layers = [m for m in self.model_runner.get_model().modules()
                  if isinstance(m, VocabParallelEmbedding) and hasattr(m, "cpu_linear")]
        for layer in layers:
            layer.quant_method.process_weights_after_loading(layer)
        return len(layers)


class VLLMHost:
    """One long-lived vLLM engine (a Ray actor): the weights of another model of the same shape
    (`engine_shape`) are reloaded into it in place; another shape or other engine arguments start
    an engine anew. LoRA adapters of its base are applied per request."""

    def __init__(self):
        self.llm, self.engine, self.weights, self.starts, self.reloads, self.adapters = None, None, None, 0, 0, {}

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
        """Keep the engine for the same model files (`weights_version`, file metadata only); reload
        the weights of another model of the engine's shape and arguments in place; else start one."""
        from raydistill.evaluate.vllm_engine import vllm_engine_kwargs

        kwargs = vllm_engine_kwargs(spec, context, lora)
        if lora:
            kwargs["max_loras"] = spec.max_loras
        kwargs["worker_extension_cls"] = f"{__name__}.{WeightsReload.__qualname__}"
        weights = weights_version(model_path)
        if self.llm is not None and weights == self.weights and kwargs == self.engine[0]:
            return
        engine = (kwargs, engine_shape(model_path))
        if self.llm is not None and engine == self.engine:
            self._reload(model_path)
        else:
            from vllm import LLM

            self.close()
            self.llm, self.engine = LLM(model=model_path, **kwargs), engine
            self.starts += 1
        self.weights = weights

    def _reload(self, model_path: str) -> None:
        """Load another model's weights into the running engine: vLLM's in-place reload, the CPU
        GEMMs of the embeddings packed again (`WeightsReload`), and no prefix cached for the last
        weights; adapters are loaded again on their next request."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path, "is_checkpoint_format": True})
        self.llm.collective_rpc("refresh_cpu_embedding_gemms")
        self.llm.reset_prefix_cache()
        self.adapters = {}
        self.reloads += 1

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
        self.llm, self.engine, self.weights, self.adapters = None, None, None, {}
        gc.collect()

    def engine_starts(self) -> int:
        return self.starts

    def weight_reloads(self) -> int:
        return self.reloads

    def pid(self) -> int:
        import os

        return os.getpid()


def hosts_group(group: str, slot: str | None, engine: str) -> str:
    """The group whose hosts an evaluation of trial slot ``slot`` uses in sweep ``group``.

    HF hosts generate with the CPUs of the evaluation that calls them, so each slot (a trial driver
    process, which Tune hands from a finished trial to the next) has its own: evaluations that
    per-trial actors ran side by side still do, and each host serves its slot's trials in turn. A
    vLLM engine batches what it is sent and on GPU holds a GPU of its own: the sweep shares it.
    """
    return f"{group}-{slot}" if engine == "hf" and slot else group


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


def stop_engine_hosts(group: str) -> int:
    """Kill the hosts of ``group`` (a sweep's, or one trial slot's of it: `hosts_group`); returns how
    many were running."""
    import ray

    stopped = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] != NAMESPACE or not actor["name"].startswith(f"{group}-"):
            continue
        try:
            host = ray.get_actor(actor["name"], namespace=NAMESPACE)
        except ValueError:  # already gone
            continue
        ray.wait([host.close.remote()], timeout=CLOSE_TIMEOUT_S)  # a stuck host is killed all the same
        ray.kill(host)
        stopped += 1
    return stopped
