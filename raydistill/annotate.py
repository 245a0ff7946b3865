"""Teacher annotation: chain-of-thought rationales from any litellm model, on Ray Data.

Pipeline (one Ray Data job for every cell of a run)::

    questions (EXAMPLE_SCHEMA) -> prompt (level, format, one-shot; raydistill.prompts)
      -> request key = sha256(model, messages, sampling params)     [driver]
      -> cached response?  (durable request cache, JSON Lines shards)  [driver]
      -> actor pool (map_batches, async UDF): rate limiter (shared Ray actor) -> litellm.acompletion
         with retries -> append to this actor's cache shard -> extract + verify (raydistill.answers)
      -> cell rows (ANNOTATION_SCHEMA) written to Parquet as results arrive           [driver]
      -> examples.parquet (EXAMPLE_SCHEMA, filtered by policy) + summary.json

Durability: every completed response is appended to the cache as soon as it arrives, so a
rerun after a crash sends no request that had completed. Rows that fail after all retries are
written with their error (never dropped) and are not cached: a finished cell is reused as it is,
and ``--retry-failed`` runs it again, sending only its failed rows.

API keys are read from the environment only (``TeacherSpec.api_key_env`` or the provider's usual
variable such as OPENAI_API_KEY / GEMINI_API_KEY). No key is stored in a spec, a Parquet file, the
cache, a summary or a log line; error messages are scrubbed of the key.

Entry points: ``annotate(spec, out_dir) -> AnnotationResult`` (one cell),
``annotate_cells([(spec, out_dir), ...]) -> AnnotationRun`` (many cells, one pipeline), and
``raydistill annotate --config x.yaml`` (``main``).
"""

from __future__ import annotations

import os

# litellm downloads its model cost map at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import argparse
import contextlib
import asyncio
import hashlib
import json
import logging
import math
import random
import re
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from raydistill import files, prompts
from raydistill.schemas import ANNOTATION_SCHEMA, EXAMPLE_SCHEMA, answer_problem

log = logging.getLogger(__name__)

TASKS = prompts.TASKS


def _known_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return name


TaskName = Annotated[str, AfterValidator(_known_task)]  # a name in the task registry (raydistill.tasks)
SCHEMA_VERSION = 1
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
RETRYABLE_NAMES = frozenset(
    {
        "Timeout",
        "APITimeoutError",
        "TimeoutError",
        "APIConnectionError",
        "RateLimitError",
        "InternalServerError",
        "ServiceUnavailableError",
        "BadGatewayError",
        "ClientConnectionError",
        "ServerDisconnectedError",
    }
)
LIMITER_NAMESPACE = "raydistill"


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


_SECRET_NAME = re.compile(r"(?i)(api_?key|secret|password|authori[sz]ation|bearer|access_?token|api_?token|^key$|^token$|headers)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
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


class QuestionsSpec(_Strict):
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


class HybridSpec(_Strict):
    """Hybrid granularity: each question gets the easy or the hard level by its difficulty."""

    by: Literal["answer_only", "question_length"] = Field(
        "answer_only",
        description="answer_only: hard if the teacher's answer-only reply is wrong; question_length: hard if the "
        "question is longer than the quantile",
    )
    easy_level: int = Field(1, ge=1, le=6)
    hard_level: int = Field(5, ge=1, le=6)
    length_quantile: float = Field(0.5, gt=0.0, lt=1.0)


class PaddingSpec(_Strict):
    """Length control: rationales padded to the length of another level's, without new content."""

    to_level: int = Field(5, ge=1, le=6)
    filler: str = Field("...", min_length=1, description="the unit repeated as padding (whitespace words)")


class RuntimeSpec(_Strict):
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


Policy = Literal["keep_all", "keep_correct"]


class AnnotationSpec(_Strict):
    """One annotation cell: a teacher writing rationales for a task's questions at one granularity
    level (or a hybrid of two) in one format."""

    task: TaskName
    teacher: TeacherSpec
    level: int | None = Field(None, ge=1, le=6)
    format: Literal["cot", "least_to_most", "rar", "bsm", "sym"] = "cot"
    hybrid: HybridSpec | None = None
    pad: PaddingSpec | None = None
    policy: Policy = Field("keep_all", description="which successful rows go to examples.parquet")
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
        return f"{self.task}-{self.teacher.label}-{self.format}-{lv}" + ("-gold" if self.show_gold else "")


class GridSpec(_Strict):
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


class CellOverride(_Strict):
    """An extra cell in a config: the shared settings plus these fields."""

    task: TaskName
    level: int | None = Field(None, ge=1, le=6)
    format: Literal["cot", "least_to_most", "rar", "bsm", "sym"] = "cot"
    hybrid: HybridSpec | None = None
    pad: PaddingSpec | None = None
    policy: Policy | None = None
    show_gold: bool | None = None
    questions: QuestionsSpec | None = None


class AnnotateConfig(_Strict):
    """The YAML of ``raydistill annotate --config``: shared settings, a grid and/or explicit cells.

    Each cell is written to ``<output_dir>/<cell name>/``; the request cache is shared at
    ``<output_dir>/request-cache`` unless ``runtime.cache_dir`` says otherwise.
    """

    output_dir: str
    teacher: TeacherSpec
    grid: GridSpec | None = None
    cells: list[CellOverride] = Field(default_factory=list)
    policy: Policy = "keep_all"
    show_gold: bool = False
    questions: QuestionsSpec = Field(default_factory=QuestionsSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    prompt_dir: str | None = None

    @model_validator(mode="after")
    def _some_cells(self) -> AnnotateConfig:
        if self.grid is None and not self.cells:
            raise ValueError("nothing to annotate: give a grid and/or cells")
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
                                                    show_gold=self.show_gold, questions=self.questions, **common))
        for c in self.cells:
            specs.append(
                AnnotationSpec(
                    task=c.task, level=c.level, format=c.format, hybrid=c.hybrid, pad=c.pad,
                    policy=c.policy or self.policy, questions=c.questions or self.questions,
                    show_gold=self.show_gold if c.show_gold is None else c.show_gold, **common,
                )
            )
        seen: dict[str, AnnotationSpec] = {}
        for s in specs:
            name = s.cell_name()
            if name in seen and seen[name].cell_hash() != s.cell_hash():
                raise ConfigError(f"two different cells are both named {name!r} (they would share a folder); "
                                  "give one of them its own questions or policy in the grid, not in cells")
            seen.setdefault(name, s)
        return [(s, out_root / name) for name, s in seen.items()]


def _format_validation(e: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid annotate config"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> AnnotateConfig:
    """Read and validate an annotate YAML; raises ConfigError with one line per problem."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config ({e}); pass a readable YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields (output_dir, teacher, grid, cells, ...), "
                          f"got {type(data).__name__}")
    for k, v in (overrides or {}).items():
        cur = data
        *parents, last = k.split(".")
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[last] = v
    try:
        cfg = AnnotateConfig.model_validate(data)
        for spec, _ in cfg.expand():  # prompt files exist and levels/formats are known
            spec.identity()
        return cfg
    except ValidationError as e:
        raise ConfigError(_format_validation(e, str(p))) from None
    except (prompts.PromptError, ConfigError) as e:
        raise ConfigError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class AnnotationResult:
    """What one cell produced. Counts are over the cell's rows; ``new_*`` fields count only the
    requests sent during this run (a cache hit costs nothing now)."""

    cell_name: str
    cell_hash: str
    out_dir: str
    annotations_path: str  # ANNOTATION_SCHEMA, one row per question, failures included
    examples_path: str  # EXAMPLE_SCHEMA, the rows the policy keeps (training input)
    summary_path: str
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    kept: int = 0
    cache_hits: int = 0
    requests_sent: int = 0  # API calls made now, retries included
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0  # the sum of the rows' cost_usd: the cell's price from an empty cache
    new_cost_usd: float = 0.0  # spent during this run on requests this cell was the first to use
    wall_time_s: float = 0.0
    teacher_accuracy: float | None = None  # correct / succeeded rows that have a gold answer
    mean_rationale_words: float | None = None
    mean_rationale_tokens: float | None = None
    truncated: int = 0  # succeeded rows the teacher cut at max_tokens (finish_reason "length")
    truncated_share: float | None = None  # truncated / succeeded
    errors: dict[str, int] = field(default_factory=dict)  # failure kind -> rows
    levels: dict[str, int] = field(default_factory=dict)  # level -> rows (hybrid cells mix levels)
    reused: bool = False  # outputs existed with the same cell hash; nothing ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnnotationRun:
    cells: list[AnnotationResult]
    totals: dict[str, Any]  # over unique requests of the run


# ----------------------------------------------------------------------------------------------
# Request cache
# ----------------------------------------------------------------------------------------------


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 of (model, messages, sampling params): the identity of one teacher request."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def prompt_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


_CACHE_FIELDS = frozenset({"key", "response"})  # what a record must have to be served
_RECORD_START = b'{"key": "'  # every record line starts so (the writer puts "key" first)


class CacheWriteError(RuntimeError):
    """A record could not be appended to the request cache (disk full, folder gone): the run stops
    rather than leave a torn record in the shard."""


class RequestCache:
    """Completed responses, durable as they arrive: append-only JSON Lines shards in one folder.

    Each writer (one per actor process) appends to its own shard, so there is no locking. A failed
    append is cut back off the shard and stops the run (:class:`CacheWriteError`); a crash can
    still leave a half-written last line. Readers skip damaged records with a warning naming the
    shard and line (their requests are sent again) and recover a whole record written after a
    torn one on the same line. When a key has two different responses (two runs sampled the same
    request at once), the earliest is served, also with a warning. The folder must be on a POSIX
    file system that every node reaches (local disk for one machine, NFS or similar for a
    cluster).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.exists() else []

    def load(self, keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """key -> record for the wanted keys (all if None)."""
        out: dict[str, dict[str, Any]] = {}
        where: dict[str, str] = {}
        problems: list[str] = []
        for shard in self.shards():
            with open(shard, "rb") as f:
                for number, line in enumerate(f, 1):
                    for rec, problem in _records_of_line(line, keys):
                        place = f"{shard}:{number}"
                        if problem:
                            problems.append(f"{place}: {problem}")
                            continue
                        known = out.get(rec["key"])
                        if known is not None and known["response"] != rec["response"]:
                            problems.append(f"{place}: key {rec['key'][:12]} has another response at "
                                            f"{where[rec['key']]}; the earlier one is served")
                            if known.get("t", 0) <= rec.get("t", 0):
                                continue
                        out[rec["key"]], where[rec["key"]] = rec, place
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            log.warning("request cache: %d damaged or conflicting record(s), damaged ones are sent again: %s",
                        len(problems), shown)
        return out

    def writer(self, fsync: bool = False) -> "CacheWriter":
        return CacheWriter(self.root, fsync)


def _records_of_line(line: bytes, keys: set[str] | None) -> list[tuple[dict[str, Any] | None, str | None]]:
    """The records of one shard line as (record, None) or (None, what is wrong with it). A line
    normally holds one record; after a torn append it holds the torn part, then a whole record."""
    if not line.endswith(b"\n"):
        return [(None, "cut short (the last line of a crashed writer)")]
    parts = line.split(_RECORD_START)[1:] if line.startswith(_RECORD_START) else [None]
    if parts == [None]:
        return [(None, "not a cache record")]
    found: list[tuple[dict[str, Any] | None, str | None]] = []
    for k, part in enumerate(parts):
        text = _RECORD_START + part
        key = part[:64].decode("ascii", "replace")
        if keys is not None and key not in keys and k == len(parts) - 1 and len(parts) == 1:
            return []  # not wanted: not parsed
        try:
            rec = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            found.append((None, "torn (a failed append)" if k < len(parts) - 1 else "not JSON"))
            continue
        if not isinstance(rec, dict) or not _CACHE_FIELDS <= rec.keys():
            found.append((None, "missing key or response"))
        elif not isinstance(rec["response"], str):
            found.append((None, f"response is {type(rec['response']).__name__}, not text"))
        elif keys is None or rec["key"] in keys:
            found.append((rec, None))
    return found


class CacheFollower:
    """Where the records appended to a cache folder since this follower started are, read
    incrementally (each byte once). An actor that takes over the batch of an actor that died
    serves what the dead one had already completed instead of sending it again."""

    def __init__(self, root: Path, since: dict[str, int]):
        """``since``: each shard's size when the run started (the driver served what came before)."""
        self.root = root
        self.offsets = {Path(shard): size for shard, size in since.items()}
        self.places: dict[str, tuple[Path, int]] = {}

    def refresh(self) -> None:
        for shard in RequestCache(self.root).shards():
            start = self.offsets.get(shard, 0)
            with open(shard, "rb") as f:
                f.seek(start)
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
            at = start
            for line in whole.splitlines(keepends=True):
                if line.startswith(_RECORD_START):
                    self.places[line[len(_RECORD_START):len(_RECORD_START) + 64].decode("ascii", "replace")] = (shard, at)
                at += len(line)
            self.offsets[shard] = start + len(whole)

    def find(self, key: str) -> dict[str, Any] | None:
        """The record of ``key`` appended since the start, if it is whole."""
        place = self.places.get(key)
        if place is None:
            return None
        with open(place[0], "rb") as f:
            f.seek(place[1])
            line = f.readline()
        return next((rec for rec, problem in _records_of_line(line, {key}) if rec is not None), None)


class CacheWriter:
    def __init__(self, root: Path, fsync: bool = False):
        root.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.path = root / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync = fsync
        self.failed: str | None = None

    def append(self, record: dict[str, Any]) -> None:
        """Append one record whole, or cut the partial write back off and raise CacheWriteError."""
        if self.failed:
            raise CacheWriteError(self.failed)
        # "key" first, so readers can skip unwanted lines without parsing them.
        line = json.dumps({"key": record["key"], **{k: v for k, v in record.items() if k != "key"}},
                          ensure_ascii=False) + "\n"
        data = line.encode()
        size = os.fstat(self.fd).st_size  # this writer is the shard's only one
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
            if self.fsync:
                os.fsync(self.fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)  # truncating frees space, so it works on a full disk too
            self.failed = (f"request cache: could not append to {self.path} ({err.strerror or err}); the records "
                           "before it are whole. Make room (or fix the folder) and rerun: completed requests are "
                           "not sent again")
            raise CacheWriteError(self.failed) from None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# Rate limits
# ----------------------------------------------------------------------------------------------


class TokenBucket:
    """Reservation-style token bucket: ``reserve(n)`` takes n units now and returns how long the
    caller must wait before using them (0 when the bucket had them). Over any window of W seconds
    at most ``capacity + rate * W`` units start."""

    def __init__(self, rate_per_s: float, capacity: float, clock=time.monotonic):
        self.rate = rate_per_s
        self.capacity = max(capacity, 1.0)
        self.clock = clock
        self.level = self.capacity
        self.t = clock()

    def reserve(self, n: float) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) units after the fact, e.g. actual tokens."""
        self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Requests/min and tokens/min for one model, shared by every actor as a named Ray actor."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, burst_s: float = 1.0):
        self.req = None
        self.tok = None
        if requests_per_minute:
            r = requests_per_minute / 60.0
            self.req = TokenBucket(r, r * burst_s)
        if tokens_per_minute:
            r = tokens_per_minute / 60.0
            self.tok = TokenBucket(r, r * burst_s)

    def reserve(self, tokens: float) -> float:
        d = 0.0
        if self.req:
            d = max(d, self.req.reserve(1))
        if self.tok:
            d = max(d, self.tok.reserve(tokens))
        return d

    def adjust(self, delta_tokens: float) -> None:
        if self.tok:
            self.tok.adjust(delta_tokens)


def limiter_name(teacher: TeacherSpec) -> str:
    ident = f"{teacher.model}|{teacher.api_base or ''}"
    return "raydistill-ratelimit-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The actor-pool UDF
# ----------------------------------------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, kind: str, reason: str, attempts: int):
        super().__init__(reason)
        self.kind, self.reason, self.attempts = kind, reason, attempts


def _classify(e: BaseException) -> tuple[bool, str, int | None]:
    """(retryable, kind, http status) of an exception from litellm."""
    status = getattr(e, "status_code", None)
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    name = type(e).__name__
    if isinstance(e, asyncio.TimeoutError) or name in ("Timeout", "APITimeoutError") or status == 408:
        return True, "timeout", status
    if status == 429 or name == "RateLimitError":
        return True, "rate_limit", status
    if status is not None and status in RETRYABLE_STATUS or (status or 0) >= 500:
        return True, f"http_{status}", status
    if name in RETRYABLE_NAMES:
        return True, "connection" if "Connection" in name else name, status
    if status is not None:
        return False, f"http_{status}", status
    return False, name, status


def _retry_after(e: BaseException) -> float | None:
    for obj in (getattr(e, "response", None), e):
        headers = getattr(obj, "headers", None) or getattr(obj, "litellm_response_headers", None)
        if not headers:
            continue
        try:
            v = headers.get("retry-after") or headers.get("Retry-After")
            if v is not None:
                return max(0.0, float(v))
        except (TypeError, ValueError, AttributeError):
            pass
    return None


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def _empty_result(key: str) -> dict[str, Any]:
    return {"key": key, "response": None, "extracted": None, "correct": None, "tokens_in": 0, "tokens_out": 0,
            "cost_usd": 0.0, "latency_s": 0.0, "error": None, "error_kind": None, "cache_hit": False,
            "attempts": 0, "finish_reason": None, "cpu_s": 0.0}


def _finish_result(out: dict[str, Any], rec: dict[str, Any], task: str, gold: str | None, answers: Any
                   ) -> dict[str, Any]:
    """Fill a result from a completed response (fresh or cached) and verify its answer."""
    out.update(response=rec["response"], tokens_in=int(rec.get("tokens_in") or 0),
               tokens_out=int(rec.get("tokens_out") or 0), cost_usd=float(rec.get("cost_usd") or 0.0),
               latency_s=float(rec.get("latency_s") or 0.0), finish_reason=rec.get("finish_reason"))
    if not out["response"]:
        out.update(error=f"empty response (finish_reason={rec.get('finish_reason')})", error_kind="empty")
        return out
    try:
        out["extracted"] = answers.extract(task, out["response"])
        out["correct"] = bool(answers.is_correct(task, out["response"], gold)) if gold else None
    except Exception as e:  # noqa: BLE001 - a checker bug must not lose the response
        out["correct"] = None
        log.warning("answer check failed for %s: %s", out["key"][:12], e)
    return out


class TeacherCaller:
    """Ray Data actor UDF: one teacher request per row, many in flight per actor via asyncio.

    Input columns: key, teacher_idx, task, gold, messages (JSON). Cached requests never reach it.
    Output columns: key, response, extracted, correct, tokens_in, tokens_out, cost_usd, latency_s,
    error, error_kind, cache_hit, attempts, finish_reason, cpu_s.
    """

    SLOT_TOLERANCE_S = 0.1

    def __init__(self, teachers: list[dict[str, Any]], runtime: dict[str, Any], cache_dir: str,
                 limiters: list[str | None], in_flight: int, cache_since: dict[str, int]):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        litellm.set_verbose = False
        logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
        self.litellm = litellm
        self.teachers = [TeacherSpec.model_validate(t) for t in teachers]
        self.runtime = RuntimeSpec.model_validate(runtime)
        self.cache = RequestCache(cache_dir).writer(self.runtime.fsync)
        self.appended = CacheFollower(Path(cache_dir), cache_since)
        self.limiter_names = limiters
        self.limiters: list[Any] = [None] * len(limiters)
        self.in_flight = in_flight
        self.sem: asyncio.Semaphore | None = None
        self.cpu_mark = time.process_time()
        self.expected_out = [min(t.max_tokens, 256) for t in self.teachers]
        self.unpriced = [False] * len(self.teachers)
        from raydistill import answers

        self.answers = answers
        # litellm imports and builds much of its machinery on the first call; do it now, offline,
        # so the first real requests are not held up behind it.
        try:
            litellm.completion(model=self.teachers[0].model, messages=[{"role": "user", "content": "warm-up"}],
                               mock_response="ok")
        except Exception:  # noqa: BLE001 - a warm-up only
            pass

    # -- helpers -------------------------------------------------------------------------------
    def _limiter(self, i: int) -> Any:
        if self.limiter_names[i] is None:
            return None
        if self.limiters[i] is None:
            import ray

            self.limiters[i] = ray.get_actor(self.limiter_names[i], namespace=LIMITER_NAMESPACE)
        return self.limiters[i]

    def _api_key(self, t: TeacherSpec) -> str | None:
        if t.api_key_env:
            key = os.environ.get(t.api_key_env)
            if not key:
                raise _Failed("auth", f"environment variable {t.api_key_env} is not set on this worker", 0)
            return key
        return None

    def _cost(self, i: int, resp: Any, tin: int, tout: int) -> float:
        t = self.teachers[i]
        if t.input_cost_per_token is not None or t.output_cost_per_token is not None:
            return tin * (t.input_cost_per_token or 0.0) + tout * (t.output_cost_per_token or 0.0)
        hidden = getattr(resp, "_hidden_params", None) or {}
        if hidden.get("response_cost") is not None:  # litellm priced it already
            return float(hidden["response_cost"])
        if self.unpriced[i]:
            return 0.0
        try:
            return float(self.litellm.completion_cost(completion_response=resp) or 0.0)
        except Exception:
            self.unpriced[i] = True  # a model litellm has no price for (local servers): 0, and stop asking
            return 0.0

    async def _wait_for_slot(self, limiter: Any, est_tokens: float) -> None:
        """Reserve a slot from the shared limiter and sleep until it. A slot this process reached
        late (its event loop was busy) is given up and a new one reserved, so a stall here never
        turns into a burst at the server."""
        for _ in range(8):
            t0 = time.monotonic()
            delay = await limiter.reserve.remote(est_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - t0 - delay <= self.SLOT_TOLERANCE_S:
                return

    async def _send(self, i: int, messages: list[dict[str, str]]) -> tuple[Any, int, float]:
        t = self.teachers[i]
        key = self._api_key(t)
        kw: dict[str, Any] = dict(model=t.model, messages=messages, timeout=t.timeout_s, num_retries=0,
                                  max_retries=0, drop_params=t.drop_unsupported_params, **t.sampling_params())
        if t.api_base:
            kw["api_base"] = t.api_base
        if key:
            kw["api_key"] = key
        est = sum(len(m["content"]) for m in messages) / 4 + self.expected_out[i]
        limiter = self._limiter(i)
        attempts = 0
        while True:
            attempts += 1
            if limiter is not None:
                await self._wait_for_slot(limiter, est)
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(self.litellm.acompletion(**kw), timeout=t.timeout_s * 1.5 + 5)
                return resp, attempts, time.perf_counter() - t0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is classified and recorded
                retry, kind, status = _classify(e)
                if not retry or attempts >= self.runtime.max_attempts:
                    msg = _scrub(str(e), [key or ""]).replace("\n", " ")[:400]
                    st = f" (HTTP {status})" if status else ""
                    raise _Failed(kind, f"{type(e).__name__}{st} after {attempts} attempt(s): {msg}", attempts) from None
                base = min(self.runtime.backoff_max_s, self.runtime.backoff_base_s * 2 ** (attempts - 1))
                wait = base * random.uniform(0.5, 1.0)
                ra = _retry_after(e)
                if ra is not None:
                    wait = max(wait, min(ra, self.runtime.retry_after_max_s))
                await asyncio.sleep(wait)

    async def _row(self, r: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._row_inner(r)
        except CacheWriteError:
            raise  # the run stops: a row must not be answered without its record in the cache
        except Exception as e:  # noqa: BLE001 - a bug here must cost one row, not the job
            log.exception("internal error on request %s", r["key"][:12])
            out = _empty_result(r["key"])
            out.update(error_kind="internal", error=f"internal error: {type(e).__name__}: {str(e)[:300]}")
            return out

    async def _row_inner(self, r: dict[str, Any]) -> dict[str, Any]:
        out = _empty_result(r["key"])
        i = int(r["teacher_idx"])
        t = self.teachers[i]
        messages = json.loads(r["messages"])
        done = self.appended.find(r["key"])
        if done is not None:  # completed by an actor of this run that died before returning it
            return _finish_result(out, done, r["task"], r.get("gold"), self.answers)
        assert self.sem is not None
        async with self.sem:
            try:
                resp, attempts, latency = await self._send(i, messages)
            except _Failed as f:
                out.update(error=f.reason, error_kind=f.kind, attempts=f.attempts)
                return out
        choice = resp.choices[0]
        text = getattr(choice.message, "content", None) or ""
        usage = getattr(resp, "usage", None)
        tin = int(getattr(usage, "prompt_tokens", 0) or 0)
        tout = int(getattr(usage, "completion_tokens", 0) or 0)
        rec = {"key": r["key"], "model": t.model, "response": text, "tokens_in": tin, "tokens_out": tout,
               "cost_usd": self._cost(i, resp, tin, tout), "latency_s": latency,
               "finish_reason": getattr(choice, "finish_reason", None), "t": time.time()}
        self.cache.append(rec)  # durable before anything else happens to it
        out["attempts"] = attempts
        lim = self._limiter(i)
        if lim is not None and t.tokens_per_minute:  # charge what the request really used
            est = sum(len(m["content"]) for m in messages) / 4 + self.expected_out[i]
            lim.adjust.remote(tin + tout - est)
        if tout:
            self.expected_out[i] = 0.9 * self.expected_out[i] + 0.1 * tout
        return _finish_result(out, rec, r["task"], r.get("gold"), self.answers)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.in_flight)
        self.appended.refresh()
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._row(r) for r in rows))
        now = time.process_time()
        cpu, self.cpu_mark = now - self.cpu_mark, now
        cols = {k: [res[k] for res in results] for k in _RESULT_SCHEMA.names if k != "cpu_s"}
        cols["cpu_s"] = [cpu] + [0.0] * (len(results) - 1)
        return pa.Table.from_pydict(cols, schema=_RESULT_SCHEMA)

    def __del__(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()


_RESULT_SCHEMA = pa.schema(
    [("key", pa.string()), ("response", pa.string()), ("extracted", pa.string()), ("correct", pa.bool_()),
     ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("cost_usd", pa.float64()),
     ("latency_s", pa.float64()), ("error", pa.string()), ("error_kind", pa.string()),
     ("cache_hit", pa.bool_()), ("attempts", pa.int32()), ("finish_reason", pa.string()), ("cpu_s", pa.float64())]
)


# ----------------------------------------------------------------------------------------------
# Questions, padding, hybrid
# ----------------------------------------------------------------------------------------------


def load_questions(task: str, q: QuestionsSpec) -> pa.Table:
    """The questions of a cell as EXAMPLE_SCHEMA columns (question_id, question, answer, source),
    unique by question_id, in a stable order."""
    if q.source == "parquet":
        assert q.path
        t = _read_questions_parquet(q.path)
        if "question_id" not in t.column_names:
            from raydistill.datasets import question_id

            t = t.append_column("question_id", pa.array([question_id(x) for x in t.column("question").to_pylist()]))
        if "source" not in t.column_names:
            t = t.append_column("source", pa.array([f"{q.path}#{i}" for i in range(t.num_rows)]))
    else:
        from raydistill import datasets

        t = datasets.load_train(task, "answer_only") if q.source == "train" else datasets.load_test(task)
    t = t.select(["question_id", "question", "answer", "source"])
    t = t.cast(pa.schema([("question_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                          ("source", pa.string())]))
    seen: set[str] = set()
    keep = []
    for i, qid in enumerate(t.column("question_id").to_pylist()):
        if qid not in seen:
            seen.add(qid)
            keep.append(i)
    if len(keep) < t.num_rows:
        log.info("%s: %d duplicate questions dropped", task, t.num_rows - len(keep))
        t = t.take(keep)
    if q.shuffle_seed is not None:
        order = list(range(t.num_rows))
        random.Random(q.shuffle_seed).shuffle(order)
        t = t.take(order)
    end = None if q.limit is None else q.offset + q.limit
    return t.slice(q.offset, (end or t.num_rows) - q.offset)


def _read_questions_parquet(path: str) -> pa.Table:
    """The questions file of ``questions.path``; every problem is a ConfigError naming the file
    (and the column or rows) and what to do."""
    where = f"questions.path {path}"
    try:
        t = pq.read_table(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; point questions.path at a Parquet file") from None
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"{where}: not a readable Parquet file ({reason}); rewrite it with "
                          "pyarrow.parquet.write_table") from None
    missing = {"question", "answer"} - set(t.column_names)
    if missing:
        raise ConfigError(f"{where}: missing columns {sorted(missing)} (has {t.column_names}); the file needs "
                          "question and answer columns (question_id and source are optional)")
    for name in ("question", "question_id"):
        if name in t.column_names and not pa.types.is_string(t.schema.field(name).type) \
                and not pa.types.is_large_string(t.schema.field(name).type):
            raise ConfigError(f"{where}: column {name!r} has type {t.schema.field(name).type}, not string; "
                              "write it as text")
    if t.num_rows == 0:
        raise ConfigError(f"{where}: no rows; there is nothing to annotate")
    blank = [i for i, x in enumerate(t.column("question").to_pylist()) if x is None or not x.strip()]
    if blank:
        raise ConfigError(f"{where}: rows {blank[:10]}{' ...' if len(blank) > 10 else ''} have an empty "
                          f"question ({len(blank)} in all); remove or fill them")
    from raydistill.datasets import question_id

    ids = None if "question_id" in t.column_names else [question_id(x) for x in t.column("question").to_pylist()]
    problem = answer_problem(t, ids)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return t


_ANSWER_TRIGGER = re.compile(r"[Tt]he answer is")


def pad_rationale(text: str, target_words: int, filler: str = "...") -> str:
    """Pad ``text`` to ``target_words`` whitespace words by repeating ``filler`` right before its
    final "The answer is ..." sentence (at the end if there is none); no content is added."""
    words = len(text.split())
    unit = max(1, len(filler.split()))
    need = math.ceil(max(0, target_words - words) / unit)
    if need == 0:
        return text
    pad = " ".join([filler] * need)
    matches = list(_ANSWER_TRIGGER.finditer(text))
    if not matches:
        return f"{text.rstrip()} {pad}"
    cut = matches[-1].start()
    body, tail = text[:cut].rstrip(), text[cut:]
    return f"{body} {pad} {tail}" if body else f"{pad} {tail}"


def _question_length_levels(questions: pa.Table, h: HybridSpec) -> list[int]:
    lens = [len(q.split()) for q in questions.column("question").to_pylist()]
    if not lens:
        return []
    s = sorted(lens)
    thr = s[max(0, math.ceil(h.length_quantile * len(s)) - 1)]  # the shortest quantile share is easy
    return [h.hard_level if n > thr else h.easy_level for n in lens]


# ----------------------------------------------------------------------------------------------
# Driver: plan, run, write
# ----------------------------------------------------------------------------------------------


@dataclass
class _Req:
    key: str
    teacher_idx: int
    task: str
    gold: str
    messages: list[dict[str, str]]
    prompt_hash: str


@dataclass
class _Target:
    cell: int
    qidx: int  # index into the cell's question table
    level: int | None  # None: answer-only probe
    role: str  # "main" | "pad_target" | "probe"


class _CellState:
    def __init__(self, idx: int, spec: AnnotationSpec, out_dir: Path, questions: pa.Table, teacher_idx: int):
        self.idx = idx
        self.spec = spec
        self.out_dir = out_dir
        self.questions = questions
        self.qids = questions.column("question_id").to_pylist()
        self.qtext = questions.column("question").to_pylist()
        self.gold = questions.column("answer").to_pylist()
        self.qsource = questions.column("source").to_pylist()
        self.teacher_idx = teacher_idx
        self.hash = spec.cell_hash()
        self.name = spec.cell_name()
        self.level_of: list[int] = []  # per question: the level of its main request
        self.probe_rows: list[dict[str, Any] | None] = []
        self.pad_main: dict[int, dict[str, Any]] = {}
        self.pad_target_words: dict[int, int] = {}
        self.responses_cost: dict[int, dict[str, float]] = {}  # per question: every response its row uses
        self.writer: pq.ParquetWriter | None = None
        self.tmp_path = out_dir / f".annotations.{uuid.uuid4().hex[:8]}.partial.parquet"
        self.buffer: list[dict[str, Any]] = []
        self.stats = Counter()
        self.sums = Counter()
        self.errors: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.written = 0

    # rows --------------------------------------------------------------------------------------
    def make_row(self, qidx: int, level: int | None, req: _Req, res: dict[str, Any], response: str | None = None,
                 fmt: str | None = None, cost_usd: float | None = None) -> dict[str, Any]:
        return {
            "question_id": self.qids[qidx],
            "question": self.qtext[qidx],
            "teacher": self.spec.teacher.label,
            "level": level if level is not None else 0,
            "format": fmt or self.spec.output_format(),
            "prompt_hash": req.prompt_hash,
            "response": res["response"] if response is None else response,
            "extracted": res["extracted"],
            "gold": self.gold[qidx],
            "correct": res["correct"],
            "tokens_in": res["tokens_in"],
            "tokens_out": res["tokens_out"],
            "cost_usd": res["cost_usd"] if cost_usd is None else cost_usd,
            "latency_s": res["latency_s"],
            "error": res["error"],
            "finish_reason": res.get("finish_reason"),
        }

    def account(self, res: dict[str, Any], row: dict[str, Any]) -> None:
        st = self.stats
        st["rows"] += 1
        if row["error"] is None:
            st["succeeded"] += 1
            st["truncated"] += row["finish_reason"] == "length"
            self.sums["words"] += len((row["response"] or "").split())
            self.sums["tokens_out_ok"] += row["tokens_out"]
            if row["correct"] is not None:
                st["graded"] += 1
                st["correct"] += bool(row["correct"])
        else:
            st["failed"] += 1
            self.errors[res.get("error_kind") or "error"] += 1
        if res["cache_hit"]:
            st["cache_hits"] += 1
        else:
            st["requests_sent"] += res["attempts"]
            st["retries"] += max(0, res["attempts"] - 1)
        self.sums["tokens_in"] += row["tokens_in"]
        self.sums["tokens_out"] += row["tokens_out"]
        self.sums["cost"] += row["cost_usd"]
        self.levels[str(row["level"])] += 1

    def emit(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp_path, ANNOTATION_SCHEMA)
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=ANNOTATION_SCHEMA))
        self.written += len(self.buffer)
        self.buffer = []

    def uses(self, qidx: int, req: _Req, res: dict[str, Any]) -> None:
        """Record a response that goes into question ``qidx``'s row (its rationale, padding target
        or probe): the row's cost_usd is the price of all of them, each counted once."""
        self.responses_cost.setdefault(qidx, {})[req.key] = res["cost_usd"]

    def row_cost(self, qidx: int) -> float:
        return sum(self.responses_cost.get(qidx, {}).values())

    def on_result(self, tgt: _Target, req: _Req, res: dict[str, Any]) -> None:
        self.uses(tgt.qidx, req, res)
        if tgt.role == "main" and self.spec.pad is None:
            row = self.make_row(tgt.qidx, tgt.level, req, res, cost_usd=self.row_cost(tgt.qidx))
            self.account(res, row)
            self.emit(row)
        elif tgt.role == "main":
            self.pad_main[tgt.qidx] = {"req": req, "res": res, "level": tgt.level}
        elif tgt.role == "pad_target":
            if res["error"] is None and res["response"]:
                self.pad_target_words[tgt.qidx] = len(res["response"].split())

    def finish_padding(self) -> None:
        assert self.spec.pad is not None
        lens = list(self.pad_target_words.values())
        mean_len = round(sum(lens) / len(lens)) if lens else 0
        for qidx in sorted(self.pad_main):
            m = self.pad_main[qidx]
            res = dict(m["res"])
            response = None
            if res["error"] is None and res["response"]:
                target = self.pad_target_words.get(qidx, mean_len)
                response = pad_rationale(res["response"], target, self.spec.pad.filler)
            row = self.make_row(qidx, m["level"], m["req"], res, response=response, cost_usd=self.row_cost(qidx))
            self.account(res, row)
            self.emit(row)

    def close(self, wall: float, order: dict[str, int]) -> AnnotationResult:
        if self.spec.pad is not None:
            self.finish_padding()
        self.flush()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.writer is not None:
            self.writer.close()
            table = pq.read_table(self.tmp_path)
        else:
            table = ANNOTATION_SCHEMA.empty_table()
        idx = pa.array([order.get(q, 1 << 30) for q in table.column("question_id").to_pylist()], pa.int64())
        table = table.take(pc.sort_indices(idx))
        ann = self.out_dir / "annotations.parquet"
        files.write_parquet(table, ann)
        if self.tmp_path.exists():
            self.tmp_path.unlink()
        ok = pc.is_null(table.column("error"))
        if self.spec.policy == "keep_correct":
            keep = pc.and_(ok, pc.fill_null(table.column("correct"), False))
        else:
            keep = ok
        kept = table.filter(keep)
        source_of = dict(zip(self.qids, self.qsource))
        examples = pa.Table.from_pydict(
            {
                "question_id": kept.column("question_id"),
                "question": kept.column("question"),
                "rationale": [_ensure_trigger(r, x) for r, x in zip(kept.column("response").to_pylist(),
                                                                      kept.column("extracted").to_pylist())],
                "answer": kept.column("gold"),
                "source": [source_of.get(q, "") for q in kept.column("question_id").to_pylist()],
            },
            schema=EXAMPLE_SCHEMA,
        )
        exa = self.out_dir / "examples.parquet"
        files.write_parquet(examples, exa)
        st, sm = self.stats, self.sums
        result = AnnotationResult(
            cell_name=self.name,
            cell_hash=self.hash,
            out_dir=str(self.out_dir),
            annotations_path=str(ann),
            examples_path=str(exa),
            summary_path=str(self.out_dir / "summary.json"),
            rows=table.num_rows,
            succeeded=st["succeeded"],
            failed=st["failed"],
            kept=examples.num_rows,
            cache_hits=st["cache_hits"],
            requests_sent=st["requests_sent"],
            retries=st["retries"],
            tokens_in=int(sm["tokens_in"]),
            tokens_out=int(sm["tokens_out"]),
            cost_usd=float(sm["cost"]),
            new_cost_usd=float(sm["new_cost"]),
            wall_time_s=wall,
            teacher_accuracy=(st["correct"] / st["graded"]) if st["graded"] else None,
            mean_rationale_words=(sm["words"] / st["succeeded"]) if st["succeeded"] else None,
            mean_rationale_tokens=(sm["tokens_out_ok"] / st["succeeded"]) if st["succeeded"] else None,
            truncated=st["truncated"],
            truncated_share=(st["truncated"] / st["succeeded"]) if st["succeeded"] else None,
            errors=dict(self.errors),
            levels=dict(sorted(self.levels.items())),
        )
        summary = {
            "complete": True,
            "cell_name": self.name,
            "cell_hash": self.hash,
            "spec": self.spec.model_dump(mode="json"),
            "identity": self.spec.identity(),
            "result": result.to_dict(),
            "versions": _versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        files.write_json(result.summary_path, summary)
        return result


def _ensure_trigger(response: str, extracted: str | None) -> str:
    text = (response or "").strip()
    if extracted is not None and not _ANSWER_TRIGGER.search(text):
        text = f"{text} The answer is {extracted}"
    return text


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("raydistill", "litellm", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _read_summary(out_dir: Path) -> dict[str, Any] | None:
    """The cell's summary.json; {} when it exists but is damaged, None when there is none."""
    try:
        data = json.loads((out_dir / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # cut short, not JSON, not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _reuse(spec: AnnotationSpec, out_dir: Path) -> AnnotationResult | None:
    data = _read_summary(out_dir)
    if not data or not data.get("complete") or data.get("cell_hash") != spec.cell_hash():
        return None
    try:
        res = data["result"]
        if not (Path(res["annotations_path"]).exists() and Path(res["examples_path"]).exists()):
            return None
        return AnnotationResult(**{**res, "reused": True})
    except (KeyError, TypeError):  # a summary of another layout: run the cell again
        return None


_CELL_OUTPUTS = ("annotations.parquet", "examples.parquet", "probe.parquet", "summary.json")


def _set_aside_other_outputs(spec: AnnotationSpec, out_dir: Path) -> Path | None:
    """Move the outputs of a different cell (or under a damaged summary) out of ``out_dir`` into
    ``out_dir/superseded/<their hash>-<time>/`` before this cell writes there, so nothing computed
    is overwritten. Returns where they went (None: nothing to move)."""
    data = _read_summary(out_dir)
    if data is None or data.get("cell_hash") == spec.cell_hash():
        return None
    old = str(data.get("cell_hash") or "damaged-summary")[:16]
    dest = out_dir / "superseded" / f"{old}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dest.mkdir(parents=True)
    for name in _CELL_OUTPUTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
    what = f"of cell {old}" if data.get("cell_hash") else "under a damaged summary.json"
    log.warning("%s: the outputs %s in this folder were moved to %s; this cell (%s) is written in their place",
                out_dir, what, dest, spec.cell_hash()[:16])
    return dest


def _ensure_ray(runtime: RuntimeSpec, started: list[bool]) -> None:
    """Start or join Ray if the caller did not; records in ``started`` that this call did."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=runtime.ray_address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False if runtime.ray_address is None else None)
    started.append(True)


def _run_requests(reqs: list[_Req], teachers: list[TeacherSpec], runtime: RuntimeSpec, cache_dir: Path,
                  on_batch) -> None:
    """Send the requests through the actor pool; calls ``on_batch(list[result dict])`` as results arrive."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not reqs:
        return
    # Rate limiters: one named actor per (model, endpoint), shared by all actors and runs.
    handles = []
    names: list[str | None] = []
    for t in teachers:
        if t.requests_per_minute or t.tokens_per_minute:
            name = limiter_name(t)
            h = ray.remote(RateLimiter).options(
                name=name, namespace=LIMITER_NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1,
            ).remote(t.requests_per_minute, t.tokens_per_minute, t.burst_s)
            handles.append(h)
            names.append(name)
        else:
            names.append(None)

    actors, per_actor, batch, calls = runtime.layout()
    actors = min(actors, math.ceil(len(reqs) / batch))  # no actor without a batch to work on
    rows = [
        {"key": r.key, "teacher_idx": r.teacher_idx, "task": r.task, "gold": r.gold,
         "messages": json.dumps(r.messages, ensure_ascii=False)}
        for r in reqs
    ]
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.wait_for_min_actors_s)
    ctx.enable_progress_bars = runtime.ray_progress_bars
    # Start sending only when every actor is up, so the first seconds do not run at a fraction of
    # the concurrency while the other actors still import litellm.
    ctx.wait_for_min_actors_s = int(runtime.actor_start_timeout_s)
    try:
        # One block per batch, so the actors can work on many batches at once. from_items builds
        # the blocks in this process (from_arrow would run one remote metadata task per block);
        # the dataset keeps a copy of the context as it is now.
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch))
    finally:
        ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved
    ds = ds.map_batches(
        TeacherCaller,
        fn_constructor_kwargs=dict(
            teachers=[t.model_dump(mode="json") for t in teachers],
            runtime=runtime.model_dump(mode="json"),
            cache_dir=str(cache_dir),
            limiters=names,
            in_flight=per_actor,
            cache_since={str(shard): shard.stat().st_size for shard in RequestCache(cache_dir).shards()},
        ),
        batch_size=batch,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                  max_tasks_in_flight_per_actor=calls + 2),
        num_cpus=runtime.num_cpus_per_actor,
        resources=runtime.resources_per_actor or None,
    )
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            on_batch(out.to_pylist())
    except Exception as err:
        stopped = cache_write_error_in(err)
        if stopped is None:
            raise
        raise stopped from None
    del handles


def cache_write_error_in(err: BaseException) -> CacheWriteError | None:
    """The CacheWriteError an actor raised, out of the error Ray Data raises at the driver (which
    keeps only the remote traceback's text), so the run ends on its one line."""
    found = re.search(r"CacheWriteError: (.+)", str(err))
    return CacheWriteError(found.group(1).strip()) if found else None


def annotate_cells(cells: Sequence[tuple[AnnotationSpec, str | os.PathLike]], *, overwrite: bool = False,
                   retry_failed: bool = False, progress: bool | None = None) -> AnnotationRun:
    """Annotate several cells in one Ray Data pipeline (requests shared between cells are sent once).

    Cells whose ``summary.json`` already carries the same cell hash are returned as they are,
    unless ``overwrite``, or ``retry_failed`` and some of their rows failed (the cell runs again: its
    completed requests come from the cache, only the failed rows are sent). Outputs of a different cell in a cell's folder (another hash, or a
    damaged summary) are moved to ``<folder>/superseded/`` first, never overwritten. The runtime
    settings (concurrency, actors, cache folder) of the first cell apply to the whole run.
    """
    if not cells:
        return AnnotationRun([], {})
    t_start = time.perf_counter()
    specs = [(s if isinstance(s, AnnotationSpec) else AnnotationSpec.model_validate(s), Path(d)) for s, d in cells]
    runtime = specs[0][0].runtime
    cache_dir = Path(runtime.cache_dir) if runtime.cache_dir else specs[0][1] / "request-cache"
    show = runtime.progress if progress is None else progress

    results: list[AnnotationResult | None] = [None] * len(specs)
    todo = _cells_to_run(specs, results, overwrite, retry_failed)
    if not todo:
        return AnnotationRun([r for r in results if r], {"cells": len(specs), "reused": len(specs)})
    # Another run (a second sweep or `raydistill annotate` on the same folders) may be annotating
    # some of these cells: wait for it, then reuse what it finished instead of sending it again.
    with files.exclusive_locks([specs[i][1] / CELL_LOCK for i in todo],
                               waiting="{path}: another run is annotating this cell; waiting for it"):
        if not overwrite:
            todo = _cells_to_run(specs, results, False, retry_failed, todo)
        totals = _annotate(specs, todo, results, runtime, cache_dir, show) if todo else Counter()
    totals["wall_time_s"] = time.perf_counter() - t_start
    totals["cells"] = len(specs)
    totals["reused"] = len(specs) - len(todo)
    return AnnotationRun([r for r in results if r is not None], dict(totals))


CELL_LOCK = ".lock"  # in a cell's folder, held while a run annotates it


def _cells_to_run(specs: list[tuple[AnnotationSpec, Path]], results: list[AnnotationResult | None],
                  overwrite: bool, retry_failed: bool, among: list[int] | None = None) -> list[int]:
    """Indices of the cells to annotate; the others' finished outputs go into ``results``."""
    todo = []
    for i in range(len(specs)) if among is None else among:
        spec, out = specs[i]
        r = None if overwrite else _reuse(spec, out)
        if r is not None and retry_failed and r.failed:
            log.info("%s: %d row(s) failed; sending them again", spec.cell_name(), r.failed)
            r = None
        if r is not None:
            results[i] = r
            log.info("%s: outputs exist with the same cell hash, reused", spec.cell_name())
        else:
            todo.append(i)
    return todo


def _annotate(specs: list[tuple[AnnotationSpec, Path]], todo: list[int], results: list[AnnotationResult | None],
              runtime: RuntimeSpec, cache_dir: Path, show: bool) -> Counter:
    """Annotate the cells ``todo`` (their locks held); fills ``results``, returns the run's totals."""
    t_start = time.perf_counter()
    # Teachers, questions, cell states.
    teachers: list[TeacherSpec] = []
    tindex: dict[str, int] = {}
    qcache: dict[str, pa.Table] = {}
    states: list[_CellState] = []
    for i in todo:
        spec, out = specs[i]
        tk = spec.teacher.model_dump_json()
        if tk not in tindex:
            tindex[tk] = len(teachers)
            teachers.append(spec.teacher)
        qk = spec.task + "|" + spec.questions.model_dump_json()
        if qk not in qcache:
            qcache[qk] = load_questions(spec.task, spec.questions)
        states.append(_CellState(i, spec, out, qcache[qk], tindex[tk]))
    for c in states:  # every cell's questions loaded: now make room for its outputs
        _set_aside_other_outputs(c.spec, c.out_dir)

    started: list[bool] = []  # set when this call starts Ray (only if something is not cached)
    cache = RequestCache(cache_dir)
    totals: Counter = Counter()
    try:
        # Stage 1: answer-only probes for hybrid cells that need them.
        probe_cells = [c for c in states if c.spec.hybrid and c.spec.hybrid.by == "answer_only"]
        if probe_cells:
            reqs, targets = _plan(probe_cells, teachers, probe=True)
            _execute(reqs, targets, states, cache, teachers, runtime, cache_dir, show, totals, "probe", started)
            for c in probe_cells:
                _write_probe(c)
        for c in states:
            if c.spec.hybrid is None:
                assert c.spec.level is not None
                c.level_of = [c.spec.level] * len(c.qids)
            elif c.spec.hybrid.by == "question_length":
                c.level_of = _question_length_levels(c.questions, c.spec.hybrid)
            else:
                h = c.spec.hybrid
                c.level_of = [h.easy_level if (p and p["error"] is None and p["correct"]) else h.hard_level
                              for p in c.probe_rows]
        # Stage 2: the rationales.
        reqs, targets = _plan(states, teachers, probe=False)
        _execute(reqs, targets, states, cache, teachers, runtime, cache_dir, show, totals, "annotate", started)
        wall = time.perf_counter() - t_start
        for c in states:
            order = {q: k for k, q in enumerate(c.qids)}
            results[c.idx] = c.close(wall, order)
    finally:
        for c in states:
            if c.writer is not None:
                try:
                    c.writer.close()
                except Exception:
                    pass
            if c.tmp_path.exists():
                c.tmp_path.unlink()
        if started:
            import ray

            ray.shutdown()
    return totals


def _plan(states: list[_CellState], teachers: list[TeacherSpec], probe: bool
          ) -> tuple[dict[str, _Req], dict[str, list[_Target]]]:
    reqs: dict[str, _Req] = {}
    targets: dict[str, list[_Target]] = {}

    def add(c: _CellState, qidx: int, level: int | None, role: str) -> None:
        spec = c.spec
        t = teachers[c.teacher_idx]
        if level is None:
            msgs = prompts.answer_only_messages(spec.task, c.qtext[qidx], spec.prompt_dir)
        else:
            gold = (c.gold[qidx] or None) if spec.show_gold else None
            msgs = prompts.build_messages(spec.task, level, spec.format, c.qtext[qidx], spec.prompt_dir, gold)
        key = request_key(t.model, msgs, t.sampling_params())
        if key not in reqs:
            reqs[key] = _Req(key, c.teacher_idx, spec.task, c.gold[qidx] or "", msgs, prompt_hash(msgs))
        targets.setdefault(key, []).append(_Target(c.idx, qidx, level, role))

    for c in states:
        for q in range(len(c.qids)):
            if probe:
                add(c, q, None, "probe")
            else:
                add(c, q, c.level_of[q], "main")
                if c.spec.pad is not None:
                    add(c, q, c.spec.pad.to_level, "pad_target")
    return reqs, targets


def _execute(reqs: dict[str, _Req], targets: dict[str, list[_Target]], states: list[_CellState],
             cache: RequestCache, teachers: list[TeacherSpec], runtime: RuntimeSpec, cache_dir: Path,
             show: bool, totals: Counter, stage: str, started: list[bool]) -> None:
    from tqdm.auto import tqdm

    by_idx = {c.idx: c for c in states}
    cached = cache.load(set(reqs))
    bar = tqdm(total=len(reqs), desc=stage, unit="req", disable=not show, dynamic_ncols=True)
    counts: Counter = Counter()

    def on_batch(results: list[dict[str, Any]]) -> None:
        for res in results:
            req = reqs[res["key"]]
            for tgt in targets[res["key"]]:
                c = by_idx[tgt.cell]
                if tgt.role == "probe":
                    if not c.probe_rows:
                        c.probe_rows = [None] * len(c.qids)
                    c.probe_rows[tgt.qidx] = {**res, "req": req}
                    c.uses(tgt.qidx, req, res)
                else:
                    c.on_result(tgt, req, res)
            if not res["cache_hit"]:  # what this run spent, charged once: to the first cell using it
                by_idx[targets[res["key"]][0].cell].sums["new_cost"] += res["cost_usd"]
            counts["requests"] += 1
            counts["cache_hits"] += bool(res["cache_hit"])
            counts["failed"] += res["error"] is not None
            if not res["cache_hit"]:
                counts["api_calls"] += res["attempts"]
                counts["new_cost_usd"] += res["cost_usd"]
                counts["new_tokens_in"] += res["tokens_in"]
                counts["new_tokens_out"] += res["tokens_out"]
            counts["actor_cpu_s"] += res["cpu_s"]
        bar.update(len(results))
        bar.set_postfix(cached=counts["cache_hits"], failed=counts["failed"], refresh=False)

    try:
        # Cached responses are served here, without Ray; only the rest goes to the actor pool.
        from raydistill import answers

        hits = [r for r in reqs.values() if r.key in cached]
        for i in range(0, len(hits), 256):
            chunk = []
            for r in hits[i:i + 256]:
                res = _empty_result(r.key)
                res["cache_hit"] = True
                chunk.append(_finish_result(res, cached[r.key], r.task, r.gold, answers))
            on_batch(chunk)
        misses = [r for r in reqs.values() if r.key not in cached]
        if misses:
            _ensure_ray(runtime, started)
            _run_requests(misses, teachers, runtime, cache_dir, on_batch)
    finally:
        bar.close()
    if counts["requests"] != len(reqs):
        raise RuntimeError(f"{stage}: {len(reqs) - counts['requests']} requests produced no result")
    for k, v in counts.items():
        totals[f"{stage}_{k}" if stage != "annotate" else k] += v


def _write_probe(c: _CellState) -> None:
    rows = []
    for q, p in enumerate(c.probe_rows or []):
        if p is None:
            continue
        rows.append(c.make_row(q, None, p["req"], p, fmt="answer_only"))
    c.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_parquet(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), c.out_dir / "probe.parquet")


def annotate(spec: AnnotationSpec | dict[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False,
             retry_failed: bool = False, progress: bool | None = None) -> AnnotationResult:
    """Annotate one cell into ``out_dir`` (annotations.parquet, examples.parquet, summary.json).

    Returns at once with ``reused=True`` when ``out_dir`` already holds this cell's outputs (and,
    with ``retry_failed``, none of its rows failed).
    """
    run = annotate_cells([(spec, out_dir)], overwrite=overwrite, retry_failed=retry_failed, progress=progress)
    return run.cells[0]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def spent_usd(totals: dict[str, Any]) -> float:
    """What a run paid its teachers: every request it sent, answer-only probes and padding targets
    included (the cells' ``new_cost_usd`` add up to it)."""
    return float(totals.get("new_cost_usd", 0.0)) + float(totals.get("probe_new_cost_usd", 0.0))


def summary_table(results: Sequence[AnnotationResult]) -> str:
    head = ["cell", "rows", "failed", "cache hits", "sent", "tokens in", "tokens out", "cost $", "spent now $",
            "teacher acc", "mean words", "cut at max_tokens", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = f"{100 * r.teacher_accuracy:.1f}%" if r.teacher_accuracy is not None else "-"
        words = f"{r.mean_rationale_words:.1f}" if r.mean_rationale_words is not None else "-"
        lines.append(
            f"| {r.cell_name}{' (reused)' if r.reused else ''} | {r.rows} | {r.failed} | {r.cache_hits} | "
            f"{r.requests_sent} | {r.tokens_in} | {r.tokens_out} | {r.cost_usd:.4f} | {r.new_cost_usd:.4f} | "
            f"{acc} | {words} | {r.truncated} | {r.wall_time_s:.1f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill annotate", description="Generate teacher annotations (litellm on Ray Data).")
    p.add_argument("--config", required=True, help="annotate YAML (see docs/annotate.md)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--limit", type=int, help="annotate only the first N questions of each cell")
    p.add_argument("--overwrite", action="store_true", help="run cells even if their outputs exist")
    p.add_argument("--retry-failed", action="store_true",
                   help="run finished cells with failed rows again, sending only those rows")
    p.add_argument("--dry-run", action="store_true", help="print the cells and cache hits, send nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="also write the per-cell results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.limit:
        overrides["questions.limit"] = args.limit
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    cells = cfg.expand()
    if args.dry_run:
        for spec, out in cells:
            done = _reuse(spec, out) is not None
            print(f"{spec.cell_name():<48} {spec.cell_hash()[:12]}  {out}{'  (done)' if done else ''}")
        return 0
    try:
        run = annotate_cells(cells, overwrite=args.overwrite, retry_failed=args.retry_failed,
                             progress=not args.no_progress)
    except (ConfigError, prompts.PromptError) as e:
        print(str(e), file=sys.stderr)
        return 2
    except CacheWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_table(run.cells))
    t = run.totals
    if "requests" in t:
        probes = t.get("probe_requests", 0)
        print(f"\n{t.get('requests', 0) + probes} unique requests{f' ({probes} answer-only probes)' if probes else ''}: "
              f"{t.get('cache_hits', 0) + t.get('probe_cache_hits', 0)} cache hits, "
              f"{t.get('api_calls', 0) + t.get('probe_api_calls', 0)} API calls, "
              f"{t.get('failed', 0) + t.get('probe_failed', 0)} failed; spent ${spent_usd(t):.4f}; "
              f"wall {t.get('wall_time_s', 0.0):.1f} s")
    if args.json:
        files.write_json(args.json, {"cells": [r.to_dict() for r in run.cells], "totals": t})
    return 0


if __name__ == "__main__":
    sys.exit(main())
