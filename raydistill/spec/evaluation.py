"""Evaluation configuration: `EvalSpec`, resolved per task from the task registry's protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydistill.spec.base import Strict
from raydistill.tasks import get_task

PROTOCOL_FIELDS = ("max_new_tokens", "num_beams", "stop_strings")
NO_PROTOCOL = {"max_new_tokens": 640, "num_beams": 1, "stop_strings": []}  # protocol: none


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
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    n_samples: int = Field(1, ge=1)  # generations per question (one prediction row each)
    seed: int = 0

    @model_validator(mode="after")
    def _samples_possible(self) -> EvalSpec:
        beams = self.num_beams or 1
        if self.n_samples > 1 and not self.do_sample and beams < self.n_samples:
            raise ValueError(f"n_samples {self.n_samples} needs do_sample: true or num_beams >= n_samples")
        return self

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

    def result_fields(self) -> dict:
        """The fields that determine the generations (not how the work is spread over actors)."""
        keep = ("protocol", *PROTOCOL_FIELDS, "engine", "use_gpu", "do_sample", "temperature", "top_p",
                "n_samples", "seed")
        return {k: v for k, v in self.model_dump(mode="json").items() if k in keep}

