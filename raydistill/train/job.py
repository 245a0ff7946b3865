"""What one fine-tuning run is and what it gives back: `TrainJob` (plain data that travels to the Ray
workers), `TrainResult`, and `TrainInputError` for inputs the user has to fix."""

from __future__ import annotations

from dataclasses import dataclass, field

from raydistill.spec import TrainSpec


@dataclass(frozen=True)
class TrainJob:
    """Everything one fine-tuning run needs; it travels to the Ray workers as it is (pickled)."""

    student: str  # registry name or local HF folder (for the template)
    model_path: str  # HF folder with the initial weights
    data_path: str  # Parquet with EXAMPLE_SCHEMA (question, rationale)
    run_name: str
    storage_path: str  # local folder or pyarrow URI (s3://bucket/prefix, gs://...) for checkpoints
    spec: TrainSpec  # a mapping of its fields is validated once, here

    def __post_init__(self) -> None:
        if not isinstance(self.spec, TrainSpec):
            object.__setattr__(self, "spec", TrainSpec.model_validate(self.spec))


@dataclass(frozen=True)
class TrainResult:
    model_path: str  # HF folder of the fine-tuned model
    steps: int
    final_loss: float
    train_seconds: float
    examples: int
    truncated: int
    over_cutoff: int = 0
    padding_fraction: float = 0.0
    resumed_at: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (records.TIME_STAGES)


class TrainInputError(ValueError):
    """A config, data file or checkpoint training cannot use; the message names it and what to do."""
