"""Evaluation stage: batched generation on Ray Data, graded by `raydistill.answers`.

Test questions -> the student's prompt template -> an actor pool of generation engines
(`hf_engine`, `vllm_engine`) -> extracted answer -> predictions Parquet (`PREDICTION_SCHEMA`) + metrics.

Decoding follows each task's evaluation protocol from the paper (`raydistill.tasks`; math: greedy,
1,024 new tokens; commonsense: beam search with 5 beams, 640 new tokens) unless the spec overrides
it. Every generation that used up ``max_new_tokens`` is flagged ``truncated``.

Predictions are written batch by batch into ``<out>.parts/`` as they are generated, so a crash
loses only the batches in flight and a rerun generates only the questions not yet predicted.
Parts are keyed by the evaluation's identity (`eval_hash`: model weights, template, task,
decoding settings, engine, grader), and a row is reused only for a question asked with the same
prompt and gold answer, so another model or setting never inherits predictions; ``<out>`` is then
written from the parts, sorted by question id.

    raydistill eval --model tiny-llama --task svamp --limit 20 --out-dir preds
    raydistill eval --model outputs/x/adapter --task all --protocol none --max-new-tokens 256

Parts: `run` (`evaluate`, `EvalResult`, prompts, grading, metrics, `eval_hash`), `parts` (the
``<out>.parts/`` files), `models` (LoRA adapters, merged copies), `choose` (which engine, asked on
the engine nodes), `hf_engine` (`HFEngine`, transformers ``generate``), `vllm_engine` (vLLM through
``ray.data.llm``, LoRA unmerged), `cli` (``raydistill eval``).
"""

from raydistill.evaluate.choose import (
    ENGINE_PROBE_TIMEOUT_S,
    VLLM_INSTALL_HINT,
    VLLM_ONE_OUTPUT,
    EngineError,
    choose_engine,
    engine_bundle,
    engine_bundles,
    engine_nodes,
    vllm_available,
    vllm_import_error,
    vllm_import_errors_on_engine_nodes,
    vllm_on_engine_nodes,
)
from raydistill.evaluate.cli import main, model_label
from raydistill.evaluate.hf_engine import (
    ROUND_TOKENS,
    HFEngine,
    StopOnStrings,
    cut_at_stop,
    generate_kwargs,
    is_truncated,
    load_tokenizer,
    until_end,
)
from raydistill.evaluate.models import adapter_base, is_adapter, merged_model
from raydistill.evaluate.parts import parts_dir, read_parts, write_part
from raydistill.evaluate.run import (
    EngineTimeout,
    EvalResult,
    build_prompts,
    eval_hash,
    evaluate,
    generate_batches,
    grade,
    metrics,
    model_digest,
    within_timeout,
)
from raydistill.evaluate.vllm_engine import (
    VLLM_LORA_MODULES,
    VLLM_LORA_RANKS,
    LoraPlan,
    engine_placement,
    model_max_len,
    release_engine_placements,
    vllm_engine_kwargs,
    vllm_lora,
    vllm_lora_plan,
    vllm_max_model_len,
    vllm_post,
    vllm_pre,
    vllm_processor,
)

__all__ = [
    "ENGINE_PROBE_TIMEOUT_S", "ROUND_TOKENS", "VLLM_INSTALL_HINT", "VLLM_LORA_MODULES", "VLLM_LORA_RANKS",
    "VLLM_ONE_OUTPUT", "EngineError", "EngineTimeout", "EvalResult", "HFEngine", "LoraPlan", "StopOnStrings",
    "adapter_base", "build_prompts", "choose_engine", "cut_at_stop", "engine_bundle", "engine_bundles",
    "engine_nodes", "engine_placement", "eval_hash", "evaluate", "generate_batches", "generate_kwargs", "grade",
    "is_adapter", "is_truncated", "load_tokenizer", "main", "merged_model", "metrics", "model_digest",
    "model_label", "model_max_len", "parts_dir", "read_parts", "release_engine_placements", "until_end",
    "vllm_available", "vllm_engine_kwargs", "vllm_import_error", "vllm_import_errors_on_engine_nodes", "vllm_lora",
    "vllm_lora_plan", "vllm_max_model_len", "vllm_on_engine_nodes", "vllm_post", "vllm_pre", "vllm_processor",
    "within_timeout", "write_part",
]
