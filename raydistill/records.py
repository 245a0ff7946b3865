"""Typed records that stages hand each other through files.

- `TrialRecord` (``trials/<hash>/record.json``): what one finished trial is (its identity, specs,
  cell, paths) and what it measured (`TrialMetrics`). The sweep writes it; the sweep (to skip
  finished trials), tracking (MLflow) and the report read it back with this model.
- `TrainState` (``train_state.json`` in every checkpoint and final model folder): where training
  stands (step, loss history) and what ran (precision, attention, world size, DeepSpeed). The
  training workers write it; a resumed run and the sweep read it.

Records keep fields they do not declare (`extra="allow"`), so a record written by another
raydistill version is read whole and written back unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raydistill import files
from raydistill.spec.base import describe_validation

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record that does not hold what its model needs; the message names the file and the field."""


class UnreadableRecord(RecordError):
    """A record file that is missing, cannot be read or is not JSON; the message names the file."""


class Record(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    @classmethod
    def read(cls: type[R], path: str | os.PathLike) -> R:
        """The record in `path`; RecordError naming the file when it is missing, not JSON or lacks a field."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UnreadableRecord(f"{path}: {' '.join(str(err).split())}") from None
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls: type[R], raw: object, where: str) -> R:
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise RecordError(f"{where}: {describe_validation(err, cls)}") from None

    def write(self, path: str | os.PathLike) -> None:
        files.write_json(path, self.model_dump(mode="json"))


# Where a trial's time goes (`TrialRecord.timings`, seconds), in the order the stages run. The stages
# from train_start to other add up to `wall`, the trial's own time; `queued` (before it) is not part
# of it. model_load_eval and generation are summed over evaluation actors (actor-seconds, inside
# eval_first_batch and eval_generating). `useful` = optimizer_steps + generation. The `CPU_STAGES`
# are CPU seconds, not wall time: trials that share cores stretch each other's stages (and so their
# wall-time useful share) but not the CPU time their work takes.
TIME_STAGES = {
    "queued": "waiting for a trial slot and its resources (Tune), before the trial started",
    "train_start": "Ray Train: controller, worker actors and process group start, until the loop runs",
    "train_data": "tokenizer, reading and tokenising the cell",
    "model_load": "loading the student's weights",
    "deepspeed_init": "deepspeed.initialize (and restoring a checkpoint)",
    "optimizer_steps": "forward, backward and optimizer steps",
    "checkpoints": "resumable checkpoints",
    "final_save": "the final HF folder (LoRA merged)",
    "train_end": "the rest of training: reporting and uploading the final model, workers stopping",
    "eval_prepare": "the evaluation task's start, weights digest, tokenizer, prompts, finished prediction parts",
    "eval_first_batch": "until the first batch is generated: Ray Data and actor start, model load, its generation",
    "eval_generating": "the other batches, as the trial waited for them",
    "grading": "grading and writing prediction parts",
    "eval_finish": "writing predictions.parquet and the metrics",
    "record": "the target ceiling and the trial record",
    "other": "the rest of the trial's time (stage reports to Tune, between stages)",
    "model_load_eval": "evaluation actors loading the model (actor-seconds)",
    "generation": "evaluation actors generating (actor-seconds)",
    "wall": "the trial's own time, from its start to its record",
    "useful": "optimizer steps + generation",
    "optimizer_cpu": "CPU seconds the training workers' processes used in optimizer steps (all workers)",
    "generation_cpu": "CPU seconds the evaluation actors' processes used generating (HF engine)",
    "useful_cpu": "optimizer_cpu + generation_cpu",
}
# timed by the evaluation actors (HF engine), not the trial
ACTOR_STAGES = ("model_load_eval", "generation", "generation_cpu")
CPU_STAGES = ("optimizer_cpu", "generation_cpu", "useful_cpu")  # CPU seconds: not part of a trial's wall time


class TrialMetrics(Record):
    """What a trial measured; None where it does not apply (no predictions scored, no training)."""

    accuracy: float
    n_test: int | None = None
    extraction_failure_rate: float | None = None
    truncation_rate: float | None = None  # share cut by max_new_tokens with text in them
    empty_rate: float | None = None  # share with only whitespace once special tokens are removed (None: not measured)
    think_unfinished_rate: float | None = None  # thinking evaluations: share cut inside the think block
    mean_think_tokens: float | None = None  # thinking evaluations: mean trace length (student tokens)
    mean_answer_tokens: float | None = None  # thinking evaluations: mean length of what follows the trace
    max_new_tokens: int | None = None
    target_ceiling: float | None = None  # share of the cell's targets that grade correct
    mean_generated_tokens: float | None = None
    train_examples: int | None = None
    train_truncated: int | None = None
    train_over_cutoff: int | None = None
    train_padding_fraction: float | None = None
    train_steps: int | None = None
    final_train_loss: float | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    samples_per_question: int | None = None  # generations per test question (n_test counts them all)
    pass_at_k: float | None = None  # with several samples: unbiased pass@k, k = samples_per_question
    maj_at_k: float | None = None  # with several samples: majority vote over the extracted answers


class TrialRecord(Record):
    """One finished trial (``trials/<trial_hash>/record.json``)."""

    trial_hash: str
    eval_hash: str = ""
    raydistill_version: str = ""
    axes: dict[str, str]  # dataset, teacher, level, format, student, seed
    cell: dict[str, Any] | None = None  # the cell's label, hash, source, spec and train_path
    inputs: dict[str, str] = Field(default_factory=dict)  # student weights and test data digests
    train_spec: dict[str, Any] = Field(default_factory=dict)  # TrainSpec, as dumped
    eval_spec: dict[str, Any] = Field(default_factory=dict)  # EvalSpec resolved for the task, as dumped
    eval_protocol: str = ""
    grader: str = ""
    engine: str | None = None
    model_path: str | None = None
    predictions_path: str | None = None
    train_history: list[dict[str, Any]] = Field(default_factory=list)  # {step, loss, lr} per logged step
    train_setup: dict[str, Any] = Field(default_factory=dict)  # precision, checkpointing, attention, ...
    metrics: TrialMetrics
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per TIME_STAGES key (none in older records)
    started_at: float | None = None  # the trial's start and end (Unix seconds; none in older records)
    finished_at: float | None = None


class TrainState(Record):
    """Where a training run stands (``train_state.json``): written by rank 0 with each resumable
    checkpoint and with the final model; the fields after `final` are filled when training ends."""

    step: int = Field(ge=0)  # optimizer steps done
    history: list[dict[str, Any]]  # {step, loss, lr, tokens_per_s, step_seconds} per optimizer step
    resumed_at: list[int] = Field(default_factory=list)  # the steps a restarted worker group resumed from
    final: bool = False
    examples: int | None = None
    over_cutoff: int | None = None  # examples longer than cutoff_len
    overlong: str | None = None  # what was done with them: truncate or drop
    truncated: int | None = None
    padding_fraction: float | None = None
    steps: int | None = None  # the run's optimizer steps
    world_size: int | None = None
    deepspeed: dict[str, Any] | None = None  # ZeRO stage, offload, gradient all-reduce, accelerator, optimizer
    precision: str | None = None
    gradient_checkpointing: bool | None = None
    attn_implementation: str | None = None
    # rank 0's time in this attempt (seconds per TIME_STAGES key) and when its loop started (epoch seconds)
    timings: dict[str, float] = Field(default_factory=dict)
    loop_started_at: float | None = None
