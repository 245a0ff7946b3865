"""Annotation configuration: the teacher (`TeacherSpec`), where questions come from, padding and
hybrid levels, how the stage runs (`RuntimeSpec`), one cell (`AnnotationSpec`), and the
`raydistill annotate` YAML (`AnnotateConfig`) with its loader."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from raydistill import prompts
from raydistill.spec.base import SpecError, Strict, describe_validation, read_config

TASKS = prompts.TASKS


def _known_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return name


TaskName = Annotated[str, AfterValidator(_known_task)]  # a name in the task registry (raydistill.tasks)


SCHEMA_VERSION = 1


_SECRET_NAME = re.compile(r"(?i)(api_?key|secret|password|authori[sz]ation|bearer|access_?token|api_?token|^key$|^token$|headers)")


class TeacherSpec(Strict):
    """The teacher model and its sampling parameters (everything here except name, api_key_env,
    timeout, costs and limits is part of each request's cache key)."""

    model: str = Field(description="litellm model string: openai/gpt-4o, gemini/gemini-1.5-flash, openai/<served name>")
    name: str | None = Field(None, description="teacher label in the output; default: the model's last path part")
    api_base: str | None = Field(None, description="endpoint of an OpenAI-compatible server, e.g. http://host:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    extra_params: dict[str, Any] = Field(default_factory=dict, description="other litellm/sampling params (cache key)")
    drop_unsupported_params: bool = True
    timeout_s: float = Field(120.0, gt=0)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    burst_s: float = Field(1.0, gt=0, description="bucket size of the rate limits, in seconds of rate")
    input_cost_per_token: float | None = Field(None, ge=0, description="USD; overrides litellm's price table")
    output_cost_per_token: float | None = Field(None, ge=0, description="USD; overrides litellm's price table")

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            extra = data.get("extra_params") or {}
            bad = [k for k in [*data, *(extra if isinstance(extra, dict) else {})] if k != "api_key_env" and _SECRET_NAME.search(str(k))]
            if bad:
                raise ValueError(
                    f"{bad[0]!r}: API keys are never read from a config; put the key in an environment "
                    "variable and name it in api_key_env"
                )
        return data

    @field_validator("extra_params")
    @classmethod
    def _extra_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = {"model", "messages", "temperature", "max_tokens", "top_p", "seed", "api_base", "timeout",
                 "num_retries", "max_retries", "stream"} & set(v)
        if clash:
            raise ValueError(f"extra_params may not set {sorted(clash)}; use the dedicated fields")
        json.dumps(v)  # must be JSON (it is hashed into the cache key)
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1]) or "teacher"

    def sampling_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            p["top_p"] = self.top_p
        if self.seed is not None:
            p["seed"] = self.seed
        p.update(self.extra_params)
        return p

    def sample_params(self, sample: int) -> dict[str, Any]:
        """The sampling parameters of sample ``sample`` of a question: a set seed moves on by the
        sample's index, so each sample is its own reproducible draw (sample 0 is the plain request)."""
        p = self.sampling_params()
        if sample and self.seed is not None:
            p["seed"] = self.seed + sample
        return p


class QuestionsSpec(Strict):
    """Which questions to annotate."""

    source: Literal["train", "test", "parquet"] = Field(
        "train", description="train: the task's training questions (answer-only file); test: its test set; parquet: path"
    )
    path: str | None = Field(None, description="Parquet with question_id, question, answer[, source] (source=parquet)")
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    shuffle_seed: int | None = Field(None, description="shuffle before offset/limit")

    @model_validator(mode="after")
    def _path(self) -> QuestionsSpec:
        if self.source == "parquet" and not self.path:
            raise ValueError("questions.source=parquet needs questions.path")
        return self


class HybridSpec(Strict):
    """Hybrid granularity: each question gets the easy or the hard level by its difficulty."""

    by: Literal["answer_only", "question_length"] = Field(
        "answer_only",
        description="answer_only: hard if the teacher's answer-only reply is wrong; question_length: hard if the "
        "question is longer than the quantile",
    )
    easy_level: int = Field(1, ge=1, le=6)
    hard_level: int = Field(5, ge=1, le=6)
    length_quantile: float = Field(0.5, gt=0.0, lt=1.0)


class PaddingSpec(Strict):
    """Length control: rationales padded to the length of another level's, without new content."""

    to_level: int = Field(5, ge=1, le=6)
    filler: str = Field("...", min_length=1, description="the unit repeated as padding (whitespace words)")


class RuntimeSpec(Strict):
    """How the run executes; not part of a cell's identity."""

    concurrency: int = Field(64, ge=1, description="requests in flight across all actors")
    num_actors: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1, description="rows per Ray Data batch (and block)")
    num_cpus_per_actor: float = Field(1.0, ge=0)
    resources_per_actor: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per actor, e.g. {annotation_node: 1} on a cluster")
    max_attempts: int = Field(6, ge=1, description="tries per request, the first included")
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0, description="the longest backoff of our own")
    retry_after_max_s: float = Field(300.0, ge=0, description="the longest wait a server's Retry-After can ask for")
    cache_dir: str | None = Field(None, description="request cache folder (POSIX path; default <out>/request-cache)")
    fsync: bool = Field(False, description="fsync the cache after every response (survives power loss, slower)")
    actor_start_timeout_s: float = Field(600, gt=0, description="how long to wait for the actor pool to start")
    progress: bool = True
    ray_progress_bars: bool = False
    ray_address: str | None = None

    def layout(self) -> tuple[int, int, int, int]:
        """(actors, in-flight requests per actor, batch size, concurrent batches per actor).

        Each actor runs four times the batches its share of the concurrency needs, and a
        semaphore caps its requests in flight: batches waiting for their slowest rows then do not
        leave slots idle, because rows of the other batches take the slots that free up.
        """
        actors = max(1, min(self.num_actors, self.concurrency))
        per_actor = math.ceil(self.concurrency / actors)
        batch = max(1, min(self.batch_size, per_actor))
        calls = max(1, math.ceil(per_actor / batch)) * (4 if per_actor > 1 else 1)
        return actors, per_actor, batch, calls


Policy = Literal["keep_all", "keep_correct", "keep_first_correct", "keep_majority"]  # raydistill.annotate.selection

Mode = Literal["sync", "batch"]  # how uncached requests are sent: one by one, or through the provider's batch API


class BatchSpec(Strict):
    """Provider batch APIs (``mode: batch``, raydistill.annotate.batch): limits, polling, re-sends."""

    max_requests: int = Field(50_000, ge=1, description="requests per batch (OpenAI's limit: 50,000)")
    max_bytes: int = Field(200_000_000, ge=1024, description="bytes of a batch's input file (OpenAI's limit: 200 MB)")
    completion_window: str = Field("24h", description="the provider's completion window")
    poll_s: float = Field(30.0, gt=0, description="seconds between looks at the pending batches")
    resend: Literal["batch", "sync"] = Field(
        "sync", description="how rows that failed or expired inside a batch are sent again")
    max_rounds: int = Field(3, ge=1, description="batch rounds per cell, re-sends included, with resend: batch")
    discount: float = Field(0.5, gt=0, le=1, description="batch price / synchronous price, applied to declared "
                            "prices (litellm's table has batch prices of its own)")


class AnnotationSpec(Strict):
    """One annotation cell: a teacher writing rationales for a task's questions at one granularity
    level (or a hybrid of two) in one format."""

    task: TaskName
    teacher: TeacherSpec
    level: int | None = Field(None, ge=1, le=6)
    format: Literal["cot", "least_to_most", "rar", "bsm", "sym"] = "cot"
    hybrid: HybridSpec | None = None
    pad: PaddingSpec | None = None
    policy: Policy = Field("keep_all", description="which successful rows go to examples.parquet")
    samples: int = Field(1, ge=1, description="teacher samples per question, each its own request (temperature > 0)")
    max_per_question: int | None = Field(None, ge=1, description="keep at most this many of a question's samples")
    show_gold: bool = Field(False, description="show the teacher the gold answer (prompts/gold_hint.md); the "
                            "released StrategyQA and OBQA annotations suggest the paper's teachers saw it")
    questions: QuestionsSpec = Field(default_factory=QuestionsSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    prompt_dir: str | None = None

    @model_validator(mode="after")
    def _one_level(self) -> AnnotationSpec:
        if (self.level is None) == (self.hybrid is None):
            raise ValueError("set exactly one of level (1-6) and hybrid")
        if self.pad is not None and self.level is None:
            raise ValueError("pad needs a fixed level")
        if self.pad is not None and self.pad.to_level == self.level:
            raise ValueError("pad.to_level must differ from level")
        check_samples(self.samples, self.teacher)
        return self

    def identity(self) -> dict[str, Any]:
        t = self.teacher
        ident: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "task": self.task,
            "teacher": {"model": t.model, "label": t.label, **t.sampling_params()},
            "level": self.level,
            "format": self.format,
            "hybrid": self.hybrid.model_dump() if self.hybrid else None,
            "pad": self.pad.model_dump() if self.pad else None,
            "policy": self.policy,
            "show_gold": self.show_gold,
            "questions": self.questions.model_dump(),
            "prompts": sorted({prompts.template_fingerprint(self.task, lv, self.format, self.prompt_dir, self.show_gold)
                               for lv in self.levels_used()}),
        }
        ident.update(selection_identity(self.samples, self.max_per_question))
        if self.hybrid and self.hybrid.by == "answer_only":
            ident["probe_prompt"] = prompts.template_fingerprint(self.task, None, "cot", self.prompt_dir)
        return ident

    def cell_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def levels_used(self) -> list[int]:
        if self.hybrid:
            return sorted({self.hybrid.easy_level, self.hybrid.hard_level})
        assert self.level is not None
        return sorted({self.level} | ({self.pad.to_level} if self.pad else set()))

    def output_format(self) -> str:
        return f"{self.format}+pad{self.pad.to_level}" if self.pad else self.format

    def cell_name(self) -> str:
        if self.hybrid:
            lv = f"hybrid-{self.hybrid.by}-L{self.hybrid.easy_level}L{self.hybrid.hard_level}"
        else:
            lv = f"L{self.level}" + (f"-pad{self.pad.to_level}" if self.pad else "")
        return (f"{self.task}-{self.teacher.label}-{self.format}-{lv}" + ("-gold" if self.show_gold else "")
                + selection_suffix(self.samples, self.policy, self.max_per_question))


NEW_POLICIES = ("keep_first_correct", "keep_majority")  # named in a cell's folder (the first two never were)


def check_samples(samples: int, teacher: TeacherSpec) -> None:
    """Several samples of one question differ only when the teacher samples."""
    if samples > 1 and teacher.temperature <= 0:
        raise ValueError(f"samples: {samples} needs teacher.temperature > 0 (at 0 every sample is the same reply)")


def selection_identity(samples: int, max_per_question: int | None) -> dict[str, Any]:
    """The sampling fields of a cell's identity, left out at their defaults so that the hashes of
    cells with one sample per question stay as they were."""
    ident: dict[str, Any] = {}
    if samples != 1:
        ident["samples"] = samples
    if max_per_question is not None:
        ident["max_per_question"] = max_per_question
    return ident


def selection_suffix(samples: int, policy: str, max_per_question: int | None) -> str:
    """"-k4-keep_majority-max2" and the like: what sets a cell's samples apart in its name ("" at
    one sample per question with keep_all or keep_correct)."""
    parts = [f"k{samples}"] if samples != 1 else []
    if samples != 1 or policy in NEW_POLICIES:
        parts.append(policy)
    if max_per_question is not None:
        parts.append(f"max{max_per_question}")
    return "".join(f"-{p}" for p in parts)


class AnnotateGrid(Strict):
    tasks: list[TaskName] = Field(min_length=1)
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    formats: list[Literal["cot", "least_to_most", "rar", "bsm", "sym"]] = Field(default_factory=lambda: ["cot"])

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        bad = [x for x in v if x not in prompts.LEVELS]
        if bad:
            raise ValueError(f"levels must be within 1..6, got {bad}")
        return v


class CellOverride(Strict):
    """An extra cell in a config: the shared settings plus these fields."""

    task: TaskName
    level: int | None = Field(None, ge=1, le=6)
    format: Literal["cot", "least_to_most", "rar", "bsm", "sym"] = "cot"
    hybrid: HybridSpec | None = None
    pad: PaddingSpec | None = None
    policy: Policy | None = None
    samples: int | None = Field(None, ge=1)
    max_per_question: int | None = Field(None, ge=1)
    show_gold: bool | None = None
    questions: QuestionsSpec | None = None


class AnnotateConfig(Strict):
    """The YAML of ``raydistill annotate --config``: shared settings, a grid and/or explicit cells.

    Each cell is written to ``<output_dir>/<cell name>/``; the request cache is shared at
    ``<output_dir>/request-cache`` unless ``runtime.cache_dir`` says otherwise.
    """

    output_dir: str
    teacher: TeacherSpec
    grid: AnnotateGrid | None = None
    cells: list[CellOverride] = Field(default_factory=list)
    policy: Policy = "keep_all"
    samples: int = Field(1, ge=1)
    max_per_question: int | None = Field(None, ge=1)
    show_gold: bool = False
    questions: QuestionsSpec = Field(default_factory=QuestionsSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    prompt_dir: str | None = None
    max_spend_usd: float | None = Field(None, gt=0, description="stop before this run spends more (USD); "
                                        "raydistill.annotate.spend")
    mode: Mode = "sync"
    batch: BatchSpec = Field(default_factory=BatchSpec)

    @model_validator(mode="after")
    def _some_cells(self) -> AnnotateConfig:
        if self.grid is None and not self.cells:
            raise ValueError("nothing to annotate: give a grid and/or cells")
        for samples in {self.samples, *(c.samples for c in self.cells if c.samples)}:
            check_samples(samples, self.teacher)
        return self

    def expand(self) -> list[tuple[AnnotationSpec, Path]]:
        out_root = Path(self.output_dir)
        runtime = self.runtime
        if runtime.cache_dir is None:
            runtime = runtime.model_copy(update={"cache_dir": str(out_root / "request-cache")})
        common = dict(teacher=self.teacher, runtime=runtime, prompt_dir=self.prompt_dir)
        specs: list[AnnotationSpec] = []
        if self.grid:
            for task in self.grid.tasks:
                for fmt in self.grid.formats:
                    for lv in self.grid.levels:
                        specs.append(AnnotationSpec(task=task, level=lv, format=fmt, policy=self.policy,
                                                    samples=self.samples, max_per_question=self.max_per_question,
                                                    show_gold=self.show_gold, questions=self.questions, **common))
        for c in self.cells:
            specs.append(
                AnnotationSpec(
                    task=c.task, level=c.level, format=c.format, hybrid=c.hybrid, pad=c.pad,
                    policy=c.policy or self.policy, questions=c.questions or self.questions,
                    samples=c.samples or self.samples,
                    max_per_question=c.max_per_question or self.max_per_question,
                    show_gold=self.show_gold if c.show_gold is None else c.show_gold, **common,
                )
            )
        seen: dict[str, AnnotationSpec] = {}
        for s in specs:
            name = s.cell_name()
            if name in seen and seen[name].cell_hash() != s.cell_hash():
                raise SpecError(f"two different cells are both named {name!r} (they would share a folder); "
                                  "give one of them its own questions or policy in the grid, not in cells")
            seen.setdefault(name, s)
        return [(s, out_root / name) for name, s in seen.items()]


ANNOTATE_FIELDS = "output_dir, teacher, grid, cells, ..."


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> AnnotateConfig:
    """Read and validate an annotate YAML; raises SpecError, one line naming the file and each field."""
    data = read_config(path, "annotate", "AnnotateConfig", ANNOTATE_FIELDS, overrides)
    try:
        cfg = AnnotateConfig.model_validate(data)
        for spec, _ in cfg.expand():  # prompt files exist and levels/formats are known
            spec.identity()
        return cfg
    except ValidationError as e:
        raise SpecError(f"{path}: {describe_validation(e, AnnotateConfig)}") from None
    except (prompts.PromptError, SpecError) as e:
        raise SpecError(f"{path}: {e}") from None
