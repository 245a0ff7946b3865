"""Evaluation configuration: `EvalSpec`, resolved per task from the task registry's protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from raydistill.spec.base import Strict
from raydistill.tasks import get_task

PROTOCOL_FIELDS = ("max_new_tokens", "num_beams", "stop_strings")
NO_PROTOCOL = {"max_new_tokens": 640, "num_beams": 1, "stop_strings": []}  # protocol: none
# How the engines run, not what they generate: dumped only when set, never part of an identity.
# Part of the identity, but dumped only when set, so specs written before they existed hash as before.
IDENTITY_WHEN_SET = ("think",)
ENGINE_SETTINGS = ("tensor_parallel_size", "gpu_memory_utilization", "enable_prefix_caching", "max_num_seqs",
                   "timeout_s", "shared_engines", "max_loras", "gpu_memory_gb", "generate_batch_size")
# The rules by which the engines end and count a generation, part of every evaluation's identity
# (`EvalSpec.identity`, `result_fields`), so predictions made under other rules are never reused.
# 2: every end-of-text token ends a generation (`raydistill.evaluate.hf_engine.end_token_ids`) and
# an empty generation is not a truncated one.
GENERATION_RULES = 2
VLLM_ONLY = ("max_model_len", "enforce_eager", "tensor_parallel_size", "gpu_memory_utilization",
             "enable_prefix_caching", "max_num_seqs", "max_loras")


class EvalSpec(Strict):
    """How students are evaluated.

    `protocol: paper` applies each task's evaluation setting from the task registry
    (`raydistill.tasks`): math tasks greedy up to 1,024 new tokens with MAmmoTH2's stop strings,
    commonsense tasks beam search (5 beams) up to 640 new tokens with the seed evaluator's stop
    strings. `protocol: none` is greedy, 640 new tokens and only the student's own end-of-turn
    strings. A protocol field set here (`max_new_tokens`, `num_beams`, `stop_strings`) overrides
    it for every task and is recorded with the trial (`EvalSpec.overrides`).
    """

    protocol: Literal["paper", "none"] = "paper"
    max_new_tokens: int | None = Field(None, ge=1)  # None: the protocol's
    num_beams: int | None = Field(None, ge=1)  # None: the protocol's (1 = greedy)
    stop_strings: list[str] | None = None  # None: the protocol's; the student's end-of-turn strings always stop
    engine: Literal["auto", "hf", "vllm"] = "auto"
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    use_gpu: bool = False
    resources_per_actor: dict[str, float] = Field(default_factory=dict)  # custom Ray resources
    # vLLM only. max_model_len: the context each engine reserves KV cache for (None: the longest
    # prompt + max_new_tokens, rounded up to 256). enforce_eager: skip CUDA-graph capture at engine
    # start (None: eager on CPU, graphs on GPU; true saves the capture time of short evaluations).
    max_model_len: int | None = Field(None, ge=16)
    enforce_eager: bool | None = None
    # vLLM only, throughput settings (`ENGINE_SETTINGS`). tensor_parallel_size: GPUs each engine is
    # sharded over (each shard holds cpus_per_actor CPUs, a GPU and resources_per_actor).
    # gpu_memory_utilization: the share of each GPU an engine may take for weights and KV cache
    # (vLLM's default). enable_prefix_caching: reuse the KV cache of shared prompt prefixes (None:
    # vLLM's default). max_num_seqs: sequences an engine decodes at once (None: vLLM's default).
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0)
    enable_prefix_caching: bool | None = None
    max_num_seqs: int | None = Field(None, ge=1)
    # Both engines: seconds the generation of one evaluation (engine start included) may take before
    # its engines are stopped and the evaluation fails (None: no limit).
    timeout_s: float | None = Field(None, gt=0)
    # Evaluation engines that outlive a trial (`raydistill.evaluate.shared`): HF on CPU loads the next
    # trial's weights into the same process; vLLM (CPU, or one GPU each held for the whole sweep) keeps
    # one engine for the LoRA trials of a base.
    shared_engines: bool = False
    # vLLM shared engines: LoRA adapters of one base kept loaded side by side.
    max_loras: int = Field(4, ge=1)
    # Memory of each evaluation GPU in GiB, as torch reports it: a sweep checks every trial's
    # evaluation against it at its start (raydistill.memory.estimate_generation_memory): the HF
    # engine's generate calls are split into sub-batches that fit (generate_batch_size), a vLLM
    # engine must fit its weights and one max_model_len sequence within gpu_memory_utilization.
    # Checked whenever it is set, also for an evaluation on CPU.
    gpu_memory_gb: float | None = Field(None, gt=0)
    # HF engine: prompts per `generate` call; a batch of batch_size rows is generated in sub-batches
    # of this many (None: the whole batch in one call). The sweep sets it from gpu_memory_gb.
    generate_batch_size: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    n_samples: int = Field(1, ge=1)  # generations per question (one prediction row each)
    seed: int = 0
    # The student writes a think block before its answer (its template's think markers, `<think>` and
    # `</think>`): the answer is graded from the text after the block only, and a generation that
    # ends inside the block has no answer (`think_unfinished`). The sweep sets it for trials whose
    # supervision has traces; set it for students that think on their own.
    think: bool = False

    @model_validator(mode="after")
    def _samples_possible(self) -> EvalSpec:
        beams = self.num_beams or 1
        if self.n_samples > 1 and not self.do_sample and beams < self.n_samples:
            raise ValueError(f"n_samples {self.n_samples} needs do_sample: true or num_beams >= n_samples")
        return self

    @model_validator(mode="after")
    def _vllm_options_need_vllm(self) -> EvalSpec:
        ignored = [f"{name} {getattr(self, name)}" for name in VLLM_ONLY if not self._at_default(name)]
        if self.engine == "hf" and ignored:
            raise ValueError(f"engine: hf ignores the vLLM engine options {', '.join(ignored)}; remove them or set "
                             "engine: auto or vllm")
        if self.shared_engines and self.use_gpu and self.engine == "hf":
            raise ValueError("shared_engines on GPU applies to the vLLM engine (each host holds its GPU for the "
                             "whole sweep); HF engines on GPU start per trial: remove shared_engines, or set "
                             "engine: vllm")
        if self.shared_engines and self.tensor_parallel_size > 1:
            raise ValueError(f"shared_engines runs one-GPU vLLM engines; with tensor_parallel_size "
                             f"{self.tensor_parallel_size} the engines start per trial: remove one of the two")
        if self.tensor_parallel_size > 1 and not self.use_gpu:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} shards each vLLM engine over "
                             f"{self.tensor_parallel_size} GPUs: set use_gpu: true, or tensor_parallel_size: 1")
        return self

    @model_serializer(mode="wrap")
    def _engine_settings_when_set(self, handler) -> dict:
        """Engine settings and `IDENTITY_WHEN_SET` fields at their defaults are left out of the dump,
        so specs written before they existed dump (and hash) as before."""
        data = handler(self)
        for name in (*ENGINE_SETTINGS, *IDENTITY_WHEN_SET):
            if self._at_default(name):
                data.pop(name, None)
        return data

    def _at_default(self, name: str) -> bool:
        return getattr(self, name) == type(self).model_fields[name].default

    def overrides(self) -> list[str]:
        """The protocol fields this spec sets explicitly."""
        return [name for name in PROTOCOL_FIELDS if getattr(self, name) is not None]

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in PROTOCOL_FIELDS)

    def for_task(self, task: str) -> EvalSpec:
        """This spec with every protocol field filled for `task` (explicit fields win)."""
        if self.protocol == "paper":
            protocol = get_task(task).protocol
            base = {"max_new_tokens": protocol.max_new_tokens, "num_beams": protocol.num_beams,
                    "stop_strings": list(protocol.stop_strings)}
        else:
            base = NO_PROTOCOL
        fields = self.model_dump()
        fields.update({k: v for k, v in base.items() if fields[k] is None})
        return EvalSpec.model_validate(fields)

    def protocol_note(self, task: str, overrides: list[str] | None = None) -> str:
        """Where the settings for `task` come from, for records and the report. ``overrides``:
        the explicit fields, for a spec already resolved (default: this spec's own)."""
        overrides = self.overrides() if overrides is None else overrides
        if self.protocol == "none":
            source = "no protocol: greedy, 640 new tokens, the student's end-of-turn strings"
        else:
            source = f"paper ({get_task(task).protocol.source})"
        return source + (f"; overridden: {', '.join(overrides)}" if overrides else "")

    def identity(self) -> dict:
        """The dump that identifies a trial's evaluation: without the engine settings (`ENGINE_SETTINGS`),
        with the engines' rules for ending a generation (`GENERATION_RULES`)."""
        return {**{k: v for k, v in self.model_dump(mode="json").items() if k not in ENGINE_SETTINGS},
                "generation_rules": GENERATION_RULES}

    def result_fields(self) -> dict:
        """The fields that determine the generations (not how the work is spread over actors)."""
        keep = ("protocol", *PROTOCOL_FIELDS, "engine", "use_gpu", "do_sample", "temperature", "top_p",
                "n_samples", "seed", *IDENTITY_WHEN_SET)
        return {**{k: v for k, v in self.model_dump(mode="json").items() if k in keep},
                "generation_rules": GENERATION_RULES}

