"""The config layer: every pydantic model a run is described by, one YAML loader with dotted
`--set` overrides, one error class and formatter. It imports no stage.

- `base`: `Strict` (the frozen, no-extra-fields base), `SpecError`, `read_config`,
  `describe_validation`, `parse_overrides`, `content_hash`, storage URI checks.
- `annotation`: the teacher, questions, padding, hybrid, runtime and cell specs of the annotation
  stage, and the `raydistill annotate` YAML (`AnnotateConfig`, `load_config`).
- `training`: `TrainSpec`, `LoraSpec`, `load_train_spec`.
- `evaluation`: `EvalSpec`, resolved per task from the task registry's protocol.
- `sweep`: `SweepSpec` and its planner (`CellSpec`, `TrialSpec`), `load_sweep`.
"""

from raydistill.spec.annotation import (AnnotateConfig, AnnotationSpec, HybridSpec, PaddingSpec, Policy, QuestionsSpec,
                                        RuntimeSpec, TeacherSpec, load_config)
from raydistill.spec.base import (SpecError, Strict, content_hash, describe_validation, parse_overrides, read_config,
                                  redact_storage, storage_problem)
from raydistill.spec.evaluation import EvalSpec
from raydistill.spec.sweep import (AnnotationStageSpec, CellSpec, GridSpec, SweepSpec, TrialSpec, load_sweep,
                                   sweep_from_dict)
from raydistill.spec.training import LoraSpec, TrainSpec, load_train_spec

__all__ = [
    "AnnotateConfig", "AnnotationSpec", "AnnotationStageSpec", "CellSpec", "EvalSpec", "GridSpec", "HybridSpec",
    "LoraSpec", "PaddingSpec", "Policy", "QuestionsSpec", "RuntimeSpec", "SpecError", "Strict", "SweepSpec",
    "TeacherSpec", "TrainSpec", "TrialSpec", "content_hash", "describe_validation", "load_config", "load_sweep", "load_train_spec",
    "parse_overrides", "read_config", "redact_storage", "storage_problem", "sweep_from_dict",
]
