"""Typed specs: a sweep YAML becomes a `SweepSpec`; the planner turns it into `TrialSpec`s.

Defaults are the paper's (LLaMA-Factory SFT: full fine-tuning, lr 5e-5, 3 epochs, cosine, no
warm-up, global batch 64, cutoff 4096, grad-norm 1.0, seed 100, DeepSpeed ZeRO-3). A CPU demo
overrides a few of them in its YAML.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydistill.annotate import Policy, RuntimeSpec, TeacherSpec
from raydistill.answers import GraderOptions
from raydistill.tasks import TASK_NAMES, get_task

REPLAY_TEACHERS = ("chatgpt", "gemini", "llama", "human", "answer_only")
LEVELLESS_TEACHERS = ("human", "answer_only")
FORMATS = ("cot", "bsm", "rar", "sym", "least_to_most")


class SpecError(ValueError):
    """A config that cannot run; the message names the file and the field."""


def redact_storage(storage: str) -> str:
    """`storage` with any user:password part of a URI replaced by ***, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(storage) if "://" in storage else None
    if parts is None or not (parts.username or parts.password):
        return storage
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # pyarrow's


def storage_problem(storage: str, connect: bool = True) -> str | None:
    """Why pyarrow cannot use `storage` (a local folder or a URI such as s3://bucket/prefix) for
    checkpoints, or None. Credentials inside the URI are refused: the URI is saved with the run.
    With `connect`, pyarrow opens the file system (an S3 bucket's region is looked up online)."""
    from urllib.parse import urlsplit

    import pyarrow as pa
    import pyarrow.fs

    if "://" in storage:
        parts = urlsplit(storage)
        if parts.username or parts.password:
            return ("holds credentials; remove them from the URI (it is saved with the run) and set them in the "
                    "environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")
        if parts.scheme not in STORAGE_SCHEMES:
            return f"unknown scheme {parts.scheme!r}; give a local folder or a URI such as s3://bucket/prefix"
        if parts.scheme != "file" and not parts.netloc:
            return "names no bucket; give s3://bucket/prefix or gs://bucket/prefix"
    if not connect:
        return None
    try:
        pyarrow.fs.FileSystem.from_uri(storage)
    except (pa.ArrowException, ValueError) as err:
        return f"{err}; give a local folder or a URI such as s3://bucket/prefix or gs://bucket/prefix"
    except OSError as err:
        return f"cannot open it ({' '.join(str(err).split())[:300]}); check the bucket, network and credentials"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the student family's default
    merge_on_save: bool = True


class TrainSpec(_Strict):
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float = Field(3.0, gt=0)
    global_batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    cutoff_len: int = Field(4096, ge=8)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 100
    zero_stage: Literal[0, 1, 2, 3] = 3
    # None: bf16 with use_gpu (checked on the GPU, which must support it), fp32 on CPU.
    precision: Literal["fp32", "bf16"] | None = None
    # Recompute each layer's activations in the backward pass (None: on with use_gpu, off on CPU).
    gradient_checkpointing: bool | None = None
    # auto: the student family's choice (students.FAMILY_ATTENTION: eager for BLOOM, which has no
    # SDPA path; sdpa for Llama and Gemma), else transformers' default.
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    # Memory of each training GPU, to refuse before any worker starts a config that cannot fit
    # (raydistill.memory). None: checked on the worker against the GPU it got.
    gpu_memory_gb: float | None = Field(None, gt=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)  # with use_gpu
    # Custom Ray resources each worker needs, e.g. {gpu_node: 1} to land on a cluster's GPU nodes.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    lora: LoraSpec | None = None
    # DeepSpeed JSON: a path, or a file name in raydistill/configs/deepspeed/ (zero2.json,
    # zero3.json, zero3_offload.json); None picks zero{zero_stage}.json. "auto" values are filled
    # from this spec (batch sizes, lr, clipping, bf16).
    deepspeed_config: str | None = None
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: only at epoch ends and the end of the run
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1: unlimited
    overlong: Literal["truncate", "drop"] = "truncate"  # sequences longer than cutoff_len

    @model_validator(mode="before")
    @classmethod
    def _device_defaults(cls, fields: object) -> object:
        """precision and gradient_checkpointing left open follow use_gpu (stored resolved, so the
        trial's identity names what runs)."""
        if isinstance(fields, dict):
            gpu = bool(fields.get("use_gpu", False))
            if fields.get("precision") is None:
                fields = {**fields, "precision": "bf16" if gpu else "fp32"}
            if fields.get("gradient_checkpointing") is None:
                fields = {**fields, "gradient_checkpointing": gpu}
        return fields

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSpec:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {per_step}"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


PROTOCOL_FIELDS = ("max_new_tokens", "num_beams", "stop_strings")
NO_PROTOCOL = {"max_new_tokens": 640, "num_beams": 1, "stop_strings": []}  # protocol: none


class EvalSpec(_Strict):
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


class CellSpec(_Strict):
    """One annotation cell: the supervision a student is trained on.

    `generator` is None when the cell replays the paper's released annotations, else the
    identity (model, sampling parameters, policy, gold hint) of the teacher that writes it.
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

    def __hash__(self) -> int:  # `generator` is a dict, so hash the content
        return hash(self.cell_hash)

    @property
    def cell_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))

    @property
    def label(self) -> str:
        level = f"L{self.level}" if self.level is not None else "-"
        return f"{self.dataset}/{self.teacher}/{level}/{self.format}"


class TrialSpec(_Strict):
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
        return content_hash(self.model_dump(mode="json"))

    def axes(self) -> dict[str, str]:
        """The values that identify this trial in tables, MLflow params and tags."""
        return {
            "dataset": self.cell.dataset,
            "teacher": self.cell.teacher,
            "level": "" if self.cell.level is None else str(self.cell.level),
            "format": self.cell.format,
            "student": self.student,
            "seed": str(self.seed),
        }


class AnnotationStageSpec(_Strict):
    """Teachers that write new annotations (any litellm model), and how the stage runs.

    A name under `teachers` may then be used in the sweep's `teachers` list beside the released
    sets; its cells are annotated once, before training, and shared by every student.
    """

    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    policy: Policy = "keep_all"
    # Show the teacher the gold answer (raydistill/data/prompts/gold_hint.md). The released StrategyQA and
    # OBQA annotations agree with gold on 95-100 % of rows for every teacher, and the release ships
    # OBQA files "with_gt" and "without_gt": the paper's teachers probably saw it. Part of the cell.
    show_gold: bool = False
    # Folder of the teacher prompt files (system.md, levels/, formats/, exemplars/, ...); None: the
    # package's raydistill/data/prompts. Their texts are part of each generated cell's identity.
    prompt_dir: str | None = None
    runtime: RuntimeSpec = RuntimeSpec()

    @field_validator("teachers")
    @classmethod
    def _not_a_released_name(cls, value: dict[str, TeacherSpec]) -> dict[str, TeacherSpec]:
        clash = sorted(set(value) & set(REPLAY_TEACHERS))
        if clash:
            raise ValueError(f"{clash} name released annotation sets; give the generating teacher another name")
        return value


AXES = ("datasets", "teachers", "levels", "formats", "students")


class GridSpec(_Strict):
    """A sub-grid of a sweep; an axis left out takes the sweep's top-level value. A sweep with
    `grids` runs the union of them, e.g. each student family at its own level (the paper's
    format runs: Gemma at level 5, BLOOM at level 3)."""

    datasets: list[str] | None = None
    teachers: list[str] | None = None
    levels: list[int] | None = None
    formats: list[str] | None = None
    students: list[str] | None = None


class SweepSpec(_Strict):
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
            _check_members(f"{where}datasets", grid["datasets"], TASK_NAMES)
            _check_members(f"{where}formats", grid["formats"], FORMATS)
            bad = [lvl for lvl in grid["levels"] if not 1 <= lvl <= 6]
            if bad:
                raise ValueError(f"{where}granularity levels run from 1 to 6, got {bad}")
            unknown = [t for t in grid["teachers"] if t not in REPLAY_TEACHERS and t not in self.annotation.teachers]
            if unknown:
                raise ValueError(
                    f"{where}teachers {unknown} are neither released annotation sets {list(REPLAY_TEACHERS)} "
                    "nor defined under annotation.teachers (name: {model: <litellm model>, ...})"
                )
        return self

    def expanded_grids(self) -> list[dict[str, list]]:
        """Every grid with its axes filled from the top level."""
        top = {axis: getattr(self, axis) for axis in AXES}
        if not self.grids:
            return [top]
        return [{axis: getattr(g, axis) if getattr(g, axis) is not None else top[axis] for axis in AXES}
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
                generator = self._generator(teacher)
                for level in [None] if levelless else grid["levels"]:
                    for fmt in ["cot"] if levelless else grid["formats"]:
                        cells.append(CellSpec(dataset=dataset, teacher=teacher, level=level, format=fmt,
                                              train_limit=self.train_limit, generator=generator,
                                              repair_targets=self.repair_targets and generator is None))
        return cells

    def _generator(self, teacher: str) -> dict | None:
        spec = self.annotation.teachers.get(teacher)
        if spec is None:
            return None
        return {"model": spec.model, **spec.sampling_params(), "policy": self.annotation.policy,
                "show_gold": self.annotation.show_gold}

    def trials(self) -> list[TrialSpec]:
        """One trial per (cell, student, seed) of every grid, the evaluation resolved per task."""
        trials: dict[str, TrialSpec] = {}
        for grid in self.expanded_grids():
            for cell in self._grid_cells(grid):
                for student in grid["students"]:
                    for seed in self.seeds:
                        trial = TrialSpec(
                            cell=cell, student=student, seed=seed, test_limit=self.test_limit,
                            train=self.train.model_copy(update={"seed": seed}),
                            eval=self.eval.for_task(cell.dataset), eval_overrides=self.eval.overrides(),
                            grader=self.grader)
                        trials.setdefault(trial.trial_hash, trial)
        return list(trials.values())


def _check_members(field: str, value: list[str], allowed: tuple[str, ...]) -> list[str]:
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {field} {unknown}; choose from {list(allowed)}")
    return value


def content_hash(obj: object) -> str:
    """Stable 16-hex-char hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_overrides(items: list[str]) -> dict:
    """`--set a.b=1` pairs, values parsed as YAML (numbers, lists, booleans)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set expects KEY=VALUE (e.g. train.epochs=1), got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item!r}: the value is not valid YAML ({err.__class__.__name__}); "
                            "quote it, e.g. --set 'name=\"a b\"'") from None
    return overrides


def load_sweep(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Read a sweep YAML (plus dotted-key overrides) into a validated `SweepSpec`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file; check the path given to --config (sweeps/*.yaml are examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise SpecError(f"{path}: cannot read sweep config: {err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    return sweep_from_dict(raw, source=str(path), overrides=overrides)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem}{where}"


def sweep_from_dict(raw: dict, source: str = "<config>", overrides: dict | None = None) -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a sweep config is a mapping of fields, got {type(raw).__name__}")
    raw = dict(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise SpecError(f"{source}: {problems}") from None
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


def _problem(error: dict) -> str:
    """One validation error as "field 'a.b': message", with the allowed names for an unknown field."""
    loc = ".".join(str(p) for p in error["loc"]) or "<root>"
    if error["type"] != "extra_forbidden":
        return f"field '{loc}': {error['msg'].removeprefix('Value error, ')}"
    allowed = _fields_at(SweepSpec, error["loc"][:-1])
    close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"field '{loc}' is not a sweep setting; {hint}allowed here: {', '.join(allowed)}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`; [] where `loc` is not a model."""
    for key in loc:
        field = model.model_fields.get(str(key))
        annotation = field.annotation if field else None
        model = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _set_dotted(raw: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
