"""The sweep configuration: a sweep YAML becomes a `SweepSpec`, whose planner yields one
`TrialSpec` per (annotation cell, student, seed); `CellSpec` names the supervision a trial trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from raydistill.answers import GraderOptions
from raydistill import prompts
from raydistill.spec.annotation import BatchSpec, Mode, Policy, RuntimeSpec, TeacherSpec, check_samples, selection_identity
from raydistill.spec.base import (
    SpecError,
    Strict,
    apply_overrides,
    check_members,
    content_hash,
    describe_validation,
    not_a_mapping,
    read_config,
    storage_problem,
)
from raydistill.spec.evaluation import EvalSpec
from raydistill.spec.training import TrainSpec
from raydistill.tasks import TASK_NAMES

REPLAY_TEACHERS = ("chatgpt", "gemini", "llama", "human", "answer_only")
LEVELLESS_TEACHERS = ("human", "answer_only")
FORMATS = prompts.FORMATS  # the format registry: raydistill/prompts.py and data/prompts/formats/


class CellSpec(Strict):
    """One annotation cell: the supervision a student is trained on.

    `generator` is None when the cell replays the paper's released annotations, else the
    identity (model, sampling parameters, policy, gold hint, samples per question) of the teacher
    that writes it. `selection` names the samples and policy of a grid that sets them
    ("k4-keep_majority"), so the report tells that cell from the same teacher's others.
    `inputs` holds content digests of what the cell is made from (the data files it reads, the
    annotation spec with its prompt and exemplar texts); the sweep fills it (`sweep.identify_cell`)
    before the cell hash names the cell's folder, so an edited file makes a new cell.
    """

    dataset: str
    teacher: str
    level: int | None = None
    format: str = "cot"
    train_limit: int | None = None
    repair_targets: bool = False
    generator: dict | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    # The length ablation: each rationale padded ("...") to the length of the same question's
    # rationale at this level, no content added (the paper's "Level 1 + padding" to level 5).
    pad_to_level: int | None = None
    selection: str | None = None

    @model_serializer(mode="wrap")
    def _unpadded_as_before(self, handler) -> dict:
        """An unpadded cell dumps (and so hashes) without `pad_to_level`, one without a grid's own
        selection without `selection`."""
        data = handler(self)
        for name in ("pad_to_level", "selection"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    def __hash__(self) -> int:  # `generator` is a dict, so hash the content
        return hash(self.cell_hash)

    @property
    def cell_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))

    @property
    def level_name(self) -> str:
        """"3", "1+pad5" for a padded cell, "" without a level."""
        level = "" if self.level is None else str(self.level)
        return level + (f"+pad{self.pad_to_level}" if self.pad_to_level is not None else "")

    @property
    def teacher_name(self) -> str:
        """The teacher, with the grid's selection when it set one: "gpt-4o-mini[k4-keep_majority]"."""
        return f"{self.teacher}[{self.selection}]" if self.selection else self.teacher

    @property
    def label(self) -> str:
        level = f"L{self.level_name}" if self.level is not None else "-"
        return f"{self.dataset}/{self.teacher_name}/{level}/{self.format}"


class TrialSpec(Strict):
    """One trial = fine-tune `student` on `cell`, then evaluate it on the dataset's test set.

    The trial hash covers everything that determines the result: the cell (with its input
    digests), the student, its weights and the test data (`inputs`, filled by the sweep), the seed,
    the training spec, the evaluation spec resolved for the task, and the grader options.
    """

    cell: CellSpec
    student: str
    seed: int
    test_limit: int | None
    train: TrainSpec
    eval: EvalSpec  # resolved for the cell's dataset (EvalSpec.for_task)
    eval_overrides: list[str] = Field(default_factory=list)  # protocol fields the sweep set explicitly
    grader: GraderOptions = GraderOptions()
    inputs: dict[str, str] = Field(default_factory=dict)  # student weights and test data digests

    @property
    def trial_hash(self) -> str:
        """The hash of the dump, with the evaluation's identity (`EvalSpec.identity`: no engine settings)."""
        return content_hash({**self.model_dump(mode="json"), "eval": self.eval.identity()})

    def axes(self) -> dict[str, str]:
        """The values that identify this trial in tables, MLflow params and tags."""
        return {
            "dataset": self.cell.dataset,
            "teacher": self.cell.teacher_name,
            "level": self.cell.level_name,
            "format": self.cell.format,
            "student": self.student,
            "seed": str(self.seed),
        }


class AnnotationStageSpec(Strict):
    """Teachers that write new annotations (any litellm model), and how the stage runs.

    A name under `teachers` may then be used in the sweep's `teachers` list beside the released
    sets; its cells are annotated once, before training, and shared by every student.
    """

    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    policy: Policy = "keep_all"
    # Teacher samples per question (each its own request; needs temperature > 0) and at most how
    # many of a question's samples the policy keeps (raydistill.annotate.selection). Part of the cell.
    samples: int = Field(1, ge=1)
    max_per_question: int | None = Field(None, ge=1)
    # Show the teacher the gold answer (raydistill/data/prompts/gold_hint.md). The released StrategyQA and
    # OBQA annotations agree with gold on 95-100 % of rows for every teacher, and the release ships
    # OBQA files "with_gt" and "without_gt": the paper's teachers probably saw it. Part of the cell.
    show_gold: bool = False
    # Folder of the teacher prompt files (system.md, levels/, formats/, exemplars/, ...); None: the
    # package's raydistill/data/prompts. Their texts are part of each generated cell's identity.
    prompt_dir: str | None = None
    runtime: RuntimeSpec = RuntimeSpec()
    # Stop the annotation stage before it spends more than this (USD, per run, over all cells;
    # raydistill.annotate.spend), and send requests one by one (sync) or through the providers'
    # batch APIs (batch, settings under `batch`). Neither is part of any cell.
    max_spend_usd: float | None = Field(None, gt=0)
    mode: Mode = "sync"
    batch: BatchSpec = BatchSpec()

    @field_validator("teachers")
    @classmethod
    def _not_a_released_name(cls, value: dict[str, TeacherSpec]) -> dict[str, TeacherSpec]:
        clash = sorted(set(value) & set(REPLAY_TEACHERS))
        if clash:
            raise ValueError(f"{clash} name released annotation sets; give the generating teacher another name")
        return value


AXES = ("datasets", "teachers", "levels", "formats", "students", "seeds")


class GridSpec(Strict):
    """A sub-grid of a sweep; an axis left out takes the sweep's top-level value. A sweep with
    `grids` runs the union of them, e.g. each student family at its own level (the paper's
    format runs: Gemma at level 5, BLOOM at level 3)."""

    datasets: list[str] | None = None
    teachers: list[str] | None = None
    levels: list[int] | None = None
    formats: list[str] | None = None
    students: list[str] | None = None
    seeds: list[int] | None = None
    # Pad this grid's cells to the length of the same question's rationale at this level (the
    # length ablation); its levels are then the padded ones, e.g. levels [1], pad_to_level 5.
    pad_to_level: int | None = Field(None, ge=1, le=6)
    # The generating teachers' samples per question, policy and cap for this grid's cells (left
    # out: the annotation stage's); a grid that sets any of them names its cells' selection.
    samples: int | None = Field(None, ge=1)
    policy: Policy | None = None
    max_per_question: int | None = Field(None, ge=1)


SELECTION = ("samples", "policy", "max_per_question")  # per grid, else annotation's


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "outputs"
    datasets: list[str] = Field(default_factory=list)
    teachers: list[str] = Field(default_factory=list)
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    formats: list[str] = Field(default_factory=lambda: ["cot"])
    students: list[str] = Field(default_factory=list)
    grids: list[GridSpec] = Field(default_factory=list)  # empty: the top-level axes are the one grid
    seeds: list[int] = Field(default_factory=lambda: [100])
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    # A released cell missing from the data mirror (and not downloadable): stop with the error,
    # or leave the cell out of the grid and list it in the log and the report.
    missing_cells: Literal["error", "skip"] = "error"
    # Opt-in repair of released targets (raydistill.datasets.repair_target): restore LaTeX escapes
    # eaten by JSON and mark unmarked final answers. Off: the release as the paper trained on it.
    repair_targets: bool = False
    # Opt-in leniency of the grader (raydistill.answers.GraderOptions); off: the paper's grading.
    grader: GraderOptions = GraderOptions()
    annotation: AnnotationStageSpec = AnnotationStageSpec()
    mlflow_tracking_uri: str | None = None  # default sqlite:///<output_dir>/<name>/mlflow.db
    # Where Ray Train keeps training checkpoints: default <output_dir>/<name>/ray; an object-storage
    # URI (s3://bucket/prefix, gs://...; credentials from the environment) keeps them in the bucket.
    checkpoint_storage: str | None = None
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()

    @field_validator("checkpoint_storage")
    @classmethod
    def _usable_storage(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("give an object-storage URI (s3://bucket/prefix, gs://bucket/prefix); local "
                             "checkpoints go under output_dir")
        problem = storage_problem(value, connect=False) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _grids_valid(self) -> SweepSpec:
        for i, grid in enumerate(self.expanded_grids()):
            where = f"grids[{i}]: " if self.grids else ""
            for axis in ("datasets", "teachers", "students"):
                if not grid[axis]:
                    raise ValueError(f"{where}{axis} is empty; list at least one")
            check_members(f"{where}datasets", grid["datasets"], TASK_NAMES)
            check_members(f"{where}formats", grid["formats"], FORMATS)
            bad = [lvl for lvl in grid["levels"] if not 1 <= lvl <= 6]
            if bad:
                raise ValueError(f"{where}granularity levels run from 1 to 6, got {bad}")
            unknown = [t for t in grid["teachers"] if t not in REPLAY_TEACHERS and t not in self.annotation.teachers]
            if unknown:
                raise ValueError(
                    f"{where}teachers {unknown} are neither released annotation sets {list(REPLAY_TEACHERS)} "
                    "nor defined under annotation.teachers (name: {model: <litellm model>, ...})"
                )
            _check_padding(grid, where)
            self._check_selection(grid, where)
        return self

    def _check_selection(self, grid: dict, where: str) -> None:
        """A grid's samples and policy choose among a generating teacher's samples."""
        generating = [t for t in grid["teachers"] if t in self.annotation.teachers]
        if grid["selection"] and not generating:
            raise ValueError(f"{where}{'/'.join(grid['selection'])} choose among a generating teacher's samples; "
                             "this grid has only released teachers")
        for teacher in generating:
            try:
                check_samples(grid["samples"], self.annotation.teachers[teacher])
            except ValueError as err:
                raise ValueError(f"{where}teacher {teacher}: {err}") from None

    def expanded_grids(self) -> list[dict[str, list]]:
        """Every grid with its axes filled from the top level, its samples, policy and cap from the
        annotation stage; "selection" lists the ones the grid set itself."""
        top = {axis: getattr(self, axis) for axis in AXES}
        stage = {name: getattr(self.annotation, name) for name in SELECTION}
        if not self.grids:
            return [{**top, **stage, "pad_to_level": None, "selection": []}]
        return [{**{axis: getattr(g, axis) if getattr(g, axis) is not None else top[axis] for axis in AXES},
                 **{name: getattr(g, name) if getattr(g, name) is not None else stage[name] for name in SELECTION},
                 "pad_to_level": g.pad_to_level, "selection": [n for n in SELECTION if getattr(g, n) is not None]}
                for g in self.grids]

    def axis_values(self, axis: str) -> list:
        """The values an axis takes over all grids, in first-seen order."""
        return list(dict.fromkeys(v for grid in self.expanded_grids() for v in grid[axis]))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    @property
    def cells_dir(self) -> Path:
        """Annotation cells, shared by every sweep writing to the same output_dir."""
        return Path(self.output_dir).expanduser().resolve() / "cells"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"

    def cells(self) -> list[CellSpec]:
        """Annotation cells of the grid; teachers without levels (human, answer-only) appear once."""
        return list(dict.fromkeys(cell for grid in self.expanded_grids() for cell in self._grid_cells(grid)))

    def _grid_cells(self, grid: dict[str, list]) -> list[CellSpec]:
        cells = []
        for dataset in grid["datasets"]:
            for teacher in grid["teachers"]:
                levelless = teacher in LEVELLESS_TEACHERS
                generator = self._generator(teacher, grid)
                for level in [None] if levelless else grid["levels"]:
                    for fmt in ["cot"] if levelless else grid["formats"]:
                        cells.append(CellSpec(dataset=dataset, teacher=teacher, level=level, format=fmt,
                                              train_limit=self.train_limit, generator=generator,
                                              repair_targets=self.repair_targets and generator is None,
                                              pad_to_level=grid["pad_to_level"],
                                              selection=_selection_name(grid) if generator else None))
        return cells

    def _generator(self, teacher: str, grid: dict) -> dict | None:
        spec = self.annotation.teachers.get(teacher)
        if spec is None:
            return None
        return {"model": spec.model, **spec.sampling_params(), "policy": grid["policy"],
                "show_gold": self.annotation.show_gold,
                **selection_identity(grid["samples"], grid["max_per_question"])}

    def trials(self) -> list[TrialSpec]:
        """One trial per (cell, student, seed) of every grid, the evaluation resolved per task."""
        trials: dict[str, TrialSpec] = {}
        for grid in self.expanded_grids():
            for cell in self._grid_cells(grid):
                for student in grid["students"]:
                    for seed in grid["seeds"]:
                        trial = TrialSpec(
                            cell=cell, student=student, seed=seed, test_limit=self.test_limit,
                            train=self.train.model_copy(update={"seed": seed}),
                            eval=self.eval.for_task(cell.dataset), eval_overrides=self.eval.overrides(),
                            grader=self.grader)
                        trials.setdefault(trial.trial_hash, trial)
        return list(trials.values())


def _selection_name(grid: dict) -> str | None:
    """"k4-keep_majority-max2" for a grid that sets its own samples, policy or cap, else None."""
    if not grid["selection"]:
        return None
    cap = f"-max{grid['max_per_question']}" if grid["max_per_question"] is not None else ""
    return f"k{grid['samples']}-{grid['policy']}{cap}"


def _check_padding(grid: dict, where: str) -> None:
    """A padded grid pads cells that have a level to another level."""
    pad = grid["pad_to_level"]
    if pad is None:
        return
    levelless = [t for t in grid["teachers"] if t in LEVELLESS_TEACHERS]
    if levelless:
        raise ValueError(f"{where}pad_to_level pads leveled rationales; teachers {levelless} have no level")
    if pad in grid["levels"]:
        raise ValueError(f"{where}pad_to_level {pad} is also one of the grid's levels {grid['levels']}; "
                         "a cell is padded to another level's length")


SWEEP_FIELDS = "name, datasets, teachers, levels, students, ..."


def load_sweep(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Read a sweep YAML (plus dotted-key overrides) into a validated `SweepSpec`."""
    raw = read_config(path, "sweep", "SweepSpec", SWEEP_FIELDS, missing_hint=" (sweeps/*.yaml are examples)")
    return sweep_from_dict(raw, source=str(path), overrides=overrides)


def sweep_from_dict(raw: dict, source: str = "<config>", overrides: dict | None = None) -> SweepSpec:
    """A validated `SweepSpec` of a mapping; errors are one line starting with `source`."""
    if not isinstance(raw, dict):
        raise not_a_mapping(source, "sweep", "SweepSpec", SWEEP_FIELDS, raw)
    raw = apply_overrides(raw, overrides)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe_validation(err, SweepSpec)}") from None
    _check_students(spec, source)
    return spec


def _check_students(spec: SweepSpec, source: str) -> None:
    """Every student a registry name or a model folder, checked with the config (nothing is
    downloaded here), so a typo fails before any annotation or training."""
    from raydistill.students import StudentError, get_student

    for student in spec.axis_values("students"):
        try:
            get_student(student)
        except StudentError as err:
            raise SpecError(f"{source}: field 'students': {err}") from None

