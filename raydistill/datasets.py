"""Dataset registry: the paper's seven tasks, their released training annotations and test sets.

Every file is named by a relative path that equals its upstream path under one of the roots
pinned in ``raydistill/data/upstream.json`` (``distilling-cot/...``, ``mammoth2-math-eval/...``).
``resolve`` finds it in a mirror folder (``RAYDISTILL_DATA_DIR``), then in a local cache
(``RAYDISTILL_CACHE_DIR``), then downloads it from the pinned commit and checks its sha256.

Tasks come from the registry (`raydistill.tasks`). Their training files are not listed by hand:
they are read from the release's ``dataset_info.json`` (LLaMA-Factory's dataset table) through
each task's ``release_names`` and exposed on our axes: teacher (chatgpt = GPT-4o, gemini, llama, human,
answer_only), level 1-6 (none for human / answer_only) and format (cot, bsm, rar, sym).

Everything loads as a pyarrow Table with ``raydistill.schemas.EXAMPLE_SCHEMA``. Training tables
never contain a question of the task's test set (see ``load_train``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import answers, files
from raydistill.resources import package_data
from raydistill.schemas import EXAMPLE_SCHEMA
from raydistill.tasks import TASKS, get_task
from raydistill.tasks.base import Field

log = logging.getLogger(__name__)

TEACHERS = ("chatgpt", "gemini", "llama")  # GPT-4o, Gemini-1.5-Flash, LLaMA-3-70B
LEVELLESS = ("human", "answer_only")
LEVELS = (1, 2, 3, 4, 5, 6)
FORMATS = ("cot", "bsm", "rar", "sym")

ENV_DATA_DIR = "RAYDISTILL_DATA_DIR"
ENV_CACHE_DIR = "RAYDISTILL_CACHE_DIR"
ENV_DATA_URL = "RAYDISTILL_DATA_URL"
ENV_TIMEOUT = "RAYDISTILL_DOWNLOAD_TIMEOUT"
DEFAULT_DATA_URL = "https://raw.githubusercontent.com"
DEFAULT_CACHE_DIR = Path("~/.cache/raydistill/data")
MANIFEST = package_data("upstream.json")
DATASET_INFO = "distilling-cot/train/dataset_info.json"

# Relative root -> upstream repository, commit and folder (written into raydistill/data/upstream.json).
_COT_REPO = ("EIT-NLP/Distilling-CoT-Reasoning", "cc33822e99534615a87841bd6c2e865e0d24d123")
_MAMMOTH_REPO = ("TIGER-AI-Lab/MAmmoTH2", "9c67cb137b87e3c2f68ab412c6731b1f47a51b55")
ROOTS = {
    "distilling-cot/train/": (*_COT_REPO, "data/"),
    "distilling-cot/test/": (*_COT_REPO, "Evaluation/reasoning_eval/"),
    "mammoth2-math-eval/": (*_MAMMOTH_REPO, "math_eval/dataset/"),
}


class DataUnavailable(RuntimeError):
    """A file is neither in the mirror nor in the cache, and cannot be downloaded."""


class ChecksumMismatch(DataUnavailable):
    """A downloaded file does not match its pinned sha256 (the download is deleted)."""


class CellNotReleased(ValueError):
    """The release has no file for this (task, teacher, level, format)."""


class MalformedData(ValueError):
    """An upstream file or row does not have the expected shape; names file, row and column."""


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TrainFile:
    """One training cell of a task and the upstream file (and columns) that holds it."""

    teacher: str
    level: int | None
    format: str
    path: str
    prompt: str
    response: str

    @property
    def cell(self) -> tuple[str, int | None, str]:
        return (self.teacher, self.level, self.format)


# ---------------------------------------------------------------------- source resolution


@lru_cache(maxsize=None)
def _manifest(path: Path = MANIFEST) -> dict:
    """raydistill/data/upstream.json: the pinned roots and files (needed to download, not to read a mirror)."""
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing: downloads need the package's raydistill/data/upstream.json "
                              f"(reinstall raydistill), or set {ENV_DATA_DIR} to a mirror")
    return json.loads(path.read_text())


def mirror_dir() -> Path | None:
    value = os.environ.get(ENV_DATA_DIR)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR).expanduser()


def upstream_url(relpath: str) -> str:
    """The pinned download URL of a relative path (base overridable by RAYDISTILL_DATA_URL)."""
    base = (os.environ.get(ENV_DATA_URL) or DEFAULT_DATA_URL).rstrip("/")
    for prefix, root in _manifest()["roots"].items():
        if relpath.startswith(prefix):
            return f"{base}/{root['repo']}/{root['commit']}/{root['path']}{relpath[len(prefix):]}"
    raise DataUnavailable(f"{relpath}: outside the pinned roots {', '.join(_manifest()['roots'])}")


def local_path(relpath: str) -> tuple[Path, str] | None:
    """(path, "mirror" | "cache") when the file is already on this machine, else None."""
    mirror = mirror_dir()
    for where, root in (("mirror", mirror), ("cache", cache_dir())):
        if root is not None and (root / relpath).is_file():
            return root / relpath, where
    return None


def resolve(relpath: str) -> Path:
    """Local path of an upstream file: mirror, else cache, else a verified download."""
    if relpath.startswith("/") or ".." in Path(relpath).parts:
        raise ValueError(f"not a relative data path: {relpath!r}")
    found = local_path(relpath)
    if found:
        return found[0]
    return _download(relpath, cache_dir() / relpath)


def _unavailable(relpath: str, reason: str) -> DataUnavailable:
    mirror = mirror_dir()
    searched = f"mirror {mirror}" if mirror else f"no mirror ({ENV_DATA_DIR} unset)"
    reason = " ".join(str(reason).split())
    return DataUnavailable(
        f"{relpath} is not available offline: not in {searched} nor in cache {cache_dir()}, "
        f"and the download failed ({reason}); set {ENV_DATA_DIR} to a mirror that has it, "
        f"or go online")


def _download(relpath: str, dest: Path) -> Path:
    """Fetch ``relpath`` into ``dest`` atomically; verify the pinned sha256 when there is one."""
    entry = _manifest()["files"].get(relpath)
    if entry is None:
        raise _unavailable(relpath, "not a pinned upstream file in raydistill/data/upstream.json")
    url = upstream_url(relpath)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp, digest = Path(tmp_name), hashlib.sha256()
    try:
        timeout = float(os.environ.get(ENV_TIMEOUT, "10"))
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise _unavailable(relpath, f"{url}: {exc}") from exc
    got, want = digest.hexdigest(), entry.get("sha256")
    if want and got != want:
        tmp.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{relpath}: sha256 {got} of {url} does not match the pinned "
                               f"{want}; the download was deleted")
    if not want:
        log.warning("%s has no pinned sha256; downloaded sha256 is %s", relpath, got)
    os.replace(tmp, dest)
    log.info("downloaded %s -> %s", url, dest)
    return dest


# --------------------------------------------------------------------------- reading rows


def read_rows(relpath: str) -> list[dict]:
    """Rows of a JSON-array or JSON-Lines file (AQuA.json is JSON Lines despite its name)."""
    path = resolve(relpath)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedData(f"{relpath}: {path} is not UTF-8 text (byte {exc.start}); the file is "
                            f"damaged: delete it and restore the upstream file") from None
    if not text.strip():
        raise MalformedData(f"{relpath}: {path} is empty; delete it and restore the upstream file")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise MalformedData(f"{relpath}: invalid JSON ({exc})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MalformedData(f"{relpath}: row {i} is a {type(row).__name__}, not an object")
    return rows


def _get(row: dict, field: Field | None, relpath: str, i: int) -> str:
    """A field of a row as text; a missing column raises MalformedData naming file/row/column."""
    if field is None:
        return ""
    try:
        value = field(row) if callable(field) else row[field]
    except KeyError as exc:
        raise MalformedData(f"{relpath}: row {i} has no column {exc.args[0]!r}") from None
    if value is None or isinstance(value, (dict, list)):
        name = field if isinstance(field, str) else getattr(field, "__name__", "field")
        raise MalformedData(f"{relpath}: row {i} column {name!r} is {value!r}, not text")
    return str(value)


# ------------------------------------------------------------------- dataset_info cells

_CELL_PATTERNS = (  # rest of a dataset_info name after "<alias>_", lower-cased
    (re.compile(r"(chatgpt|gemini|llama)_level(\d)"), lambda m, lv: (m[1], int(m[2]), "cot")),
    (re.compile(r"human"), lambda m, lv: ("human", None, "cot")),
    (re.compile(r"only_?ans"), lambda m, lv: ("answer_only", None, "cot")),
    # format runs: "level5_sym", or "gemma_sym"/"bloom_sym" whose level is in the file name
    (re.compile(r"(?:level\d|gemma|bloom)_(bsm|rar|sym)"), lambda m, lv: ("chatgpt", lv, m[1])),
)


def _parse_info_name(name: str, file_name: str) -> tuple[str, tuple] | None:
    """(task, cell) for one dataset_info entry, or None when no task claims it."""
    level = re.search(r"level_?(\d)", file_name, re.IGNORECASE)
    found = None
    for task in TASKS.values():
        for alias in task.release_names:
            if not name.lower().startswith(alias + "_"):
                continue
            rest = name.lower()[len(alias) + 1:]
            for pattern, cell in _CELL_PATTERNS:
                m = pattern.fullmatch(rest)
                if m:
                    if found:
                        raise MalformedData(f"{DATASET_INFO}: {name!r} matches two tasks")
                    found = (task.name, cell(m, int(level[1]) if level else None))
    return found


@lru_cache(maxsize=8)
def _train_files(info_path: Path) -> dict[str, dict[tuple, TrainFile]]:
    info = json.loads(info_path.read_text())
    by_task: dict[str, dict[tuple, TrainFile]] = {name: {} for name in TASKS}
    for name, entry in info.items():
        parsed = _parse_info_name(name, entry["file_name"])
        if parsed is None:
            log.debug("%s: entry %r maps to no registered task", DATASET_INFO, name)
            continue
        task, cell = parsed
        columns = entry.get("columns", {})
        tf = TrainFile(*cell, path="distilling-cot/train/" + entry["file_name"],
                       prompt=columns.get("prompt", "instruction"),
                       response=columns.get("response", "output"))
        if cell in by_task[task]:
            raise MalformedData(f"{DATASET_INFO}: {name!r} repeats {task} cell {cell}")
        by_task[task][cell] = tf
    return by_task


def _cell_order(cell: tuple) -> tuple:
    teacher, level, fmt = cell
    return ((TEACHERS + LEVELLESS).index(teacher), level or 0, FORMATS.index(fmt))


def train_files(task: str) -> list[TrainFile]:
    """Every training cell of ``task`` that the release lists, in axis order."""
    files = _train_files(resolve(DATASET_INFO))[get_task(task).name]
    return [files[c] for c in sorted(files, key=_cell_order)]


def train_file(task: str, teacher: str, level: int | None = None, fmt: str = "cot") -> TrainFile:
    """The file of one cell; a ValueError lists the task's cells when it does not exist."""
    if teacher in TEACHERS and level not in LEVELS:
        raise ValueError(f"teacher {teacher!r} needs a level in 1-6, got {level!r}")
    if teacher in LEVELLESS and level is not None:
        raise ValueError(f"teacher {teacher!r} has no levels, got level={level!r}")
    if teacher not in TEACHERS + LEVELLESS or fmt not in FORMATS:
        raise ValueError(f"unknown teacher/format {teacher!r}/{fmt!r}; "
                         f"teachers {TEACHERS + LEVELLESS}, formats {FORMATS}")
    for tf in train_files(task):
        if tf.cell == (teacher, level, fmt):
            return tf
    cells = ", ".join(_cell_name(tf.cell) for tf in train_files(task))
    raise CellNotReleased(f"{task} has no released cell {_cell_name((teacher, level, fmt))}; cells: {cells}")


def _cell_name(cell: tuple) -> str:
    teacher, level, fmt = cell
    return teacher + (f"/L{level}" if level else "") + ("" if fmt == "cot" else f"/{fmt}")


# ------------------------------------------------------------------------ normalisation


def question_id(question: str) -> str:
    """First 16 hex chars of sha1 of the whitespace-normalised, lower-cased question."""
    return hashlib.sha1(" ".join(question.split()).lower().encode("utf-8")).hexdigest()[:16]


def text_key(question: str) -> str:
    """Looser key for contamination checks: letters and digits only, no leading "Q:".

    It equates layouts of the same multiple-choice question ("Answer Choices:\\nA. x" vs
    "Answer choices: A: x,").
    """
    words = re.sub(r"[^0-9a-z]+", " ", question.lower()).split()
    return " ".join(words[1:] if words[:1] == ["q"] else words)


def _table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    """(question, rationale, answer, source) tuples -> a Table with EXAMPLE_SCHEMA."""
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return pa.table({
        "question_id": [question_id(q) for q in columns[0]],
        "question": list(columns[0]),
        "rationale": list(columns[1]),
        "answer": list(columns[2]),
        "source": list(columns[3]),
    }, schema=EXAMPLE_SCHEMA)


def _gold(task: str, raw: str, relpath: str, i: int) -> str:
    try:
        return answers.normalize_gold(task, raw)
    except ValueError as exc:
        raise MalformedData(f"{relpath}: row {i} gold answer {raw!r}: {exc}") from None


# ---------------------------------------------------------------------------- test sets


def load_test(task: str) -> pa.Table:
    """The task's test set (SVAMP: SVAMP.json minus the training questions = 300)."""
    spec = get_task(task).test
    rows, skip = [], set()
    if spec.minus_train:
        skip = set(_questions(train_file(task, "answer_only")))
    for i, row in enumerate(read_rows(spec.path)):
        question = _nonempty_question(_get(row, spec.question, spec.path, i), spec.question, spec.path, i)
        if question_id(question) in skip:
            continue
        raw = _get(row, spec.answer, spec.path, i)
        rows.append((question, _get(row, spec.rationale, spec.path, i),
                     _gold(task, raw, spec.path, i), f"{spec.path}#{i}"))
    if skip:
        log.info("%s test: %d rows of %s after removing training questions",
                 task, len(rows), spec.path)
    return _table(rows)


def _nonempty_question(question: str, field: Field, relpath: str, i: int) -> str:
    if not question.strip():
        name = field if isinstance(field, str) else getattr(field, "__name__", "question")
        raise MalformedData(f"{relpath}: row {i} has an empty question (column {name!r}); "
                            f"fix or remove that row")
    return question


def _questions(tf: TrainFile) -> dict[str, str]:
    """question_id -> raw response of a training file (first occurrence wins)."""
    out: dict[str, str] = {}
    for i, row in enumerate(read_rows(tf.path)):
        out.setdefault(question_id(_get(row, tf.prompt, tf.path, i)),
                       _get(row, tf.response, tf.path, i))
    return out


# ------------------------------------------------------------------------ training sets


def _gold_answers(task: str, repair: bool = False) -> dict[str, str]:
    """question_id -> normalised gold answer from the task's answer-only file."""
    out = {}
    for qid, raw in _questions(train_file(task, "answer_only")).items():
        try:
            out[qid] = answers.normalize_gold(task, repair_gold(raw) if repair else raw)
        except ValueError:
            log.debug("%s: answer-only gold %r does not normalise", task, raw)
    return out


def _train_answer(task: str, qid: str, rationale: str, golds: dict[str, str]) -> str:
    if qid in golds:
        return golds[qid]
    extracted = answers.extract(task, rationale)
    if extracted is None:
        return ""
    try:
        return answers.normalize_gold(task, extracted)
    except ValueError:
        return extracted


def load_train(task: str, teacher: str, level: int | None = None, fmt: str = "cot",
               repair: bool = False) -> pa.Table:
    """One training cell as EXAMPLE_SCHEMA rows, with every test question removed.

    ``rationale`` is the upstream training target verbatim; for answer_only it is the released
    answer in the task's answer-only form ("The answer is B."), which the paper's graders read
    (a bare "B" never matches the reasoning evaluator's pattern). ``answer`` comes from the
    task's answer-only file, else from ``answers.extract`` of the rationale, else "". Rows whose
    question_id is in ``load_test(task)`` are dropped and counted in the log: StrategyQA's human
    file holds all 290 test questions. ``repair`` applies `repair_target` and `repair_gold`
    (opt-in; the default is the release as the paper trained on it).

    A row without the response column (or with null or blank text) is skipped and counted, as
    LLaMA-Factory drops examples without a response: math_gemini_level1_ranked.json has 195 rows
    that carry ``chatgpt_output`` instead of ``gemini_output``; stqa_llama_level1_ranked.json has
    one empty response. A file where no row has it, or a row without (or with an empty) prompt, raises
    MalformedData.
    """
    tf = train_file(task, teacher, level, fmt)
    raw = read_rows(tf.path)
    test_ids = set(load_test(task).column("question_id").to_pylist())
    golds = _gold_answers(task, repair)
    rows, leaked, unannotated = [], 0, []
    for i, row in enumerate(raw):
        question = _nonempty_question(_get(row, tf.prompt, tf.path, i), tf.prompt, tf.path, i)
        if row.get(tf.response) is None or not str(row[tf.response]).strip():
            unannotated.append(i)
            continue
        qid = question_id(question)
        if qid in test_ids:
            leaked += 1
            continue
        rationale = _get(row, tf.response, tf.path, i)
        if teacher == "answer_only":
            rationale = get_task(task).answer_only(repair_gold(rationale) if repair else rationale)
        answer = _train_answer(task, qid, rationale, golds)
        if repair:
            rationale = repair_target(task, rationale, answer)
        rows.append((question, rationale, answer, f"{tf.path}#{i}"))
    if raw and len(unannotated) == len(raw):
        raise MalformedData(f"{tf.path}: no row has column {tf.response!r}")
    if unannotated:
        log.warning("%s: skipped %d rows without column %r or with it blank (first: row %d)",
                    tf.path, len(unannotated), tf.response, unannotated[0])
    (log.warning if leaked else log.info)(
        "%s %s: dropped %d of %d rows whose question is in the %s test set",
        task, _cell_name(tf.cell), leaked, len(raw) - len(unannotated), task)
    missing = sum(1 for r in rows if not r[2])
    if missing:
        log.info("%s %s: %d rows have no gold answer (answer \"\")",
                 task, _cell_name(tf.cell), missing)
    return _table(rows)


# ----------------------------------------------------------------------- repair and ceiling


def repair_gold(raw: str) -> str:
    """A released gold answer with LaTeX escapes eaten by JSON restored and cut braces closed
    (released MATH golds such as "2\\sqrt{5" were cut at a "}")."""
    s = answers.repair_escapes(str(raw))
    return s + "}" * max(0, s.count("{") - s.count("}"))


def repair_target(task: str, rationale: str, answer: str) -> str:
    """The opt-in target repair (``repair_targets``): restore LaTeX escapes eaten by JSON, and
    mark the final answer of a target that has no answer trigger and does not grade correct
    (many human MATH solutions end without one) by appending the task's answer form. A target
    that states a wrong answer is left as it is: that is the teacher's error, not the file's."""
    fixed = answers.repair_escapes(rationale)
    if not answer or answers.is_correct(task, fixed, answer):
        return fixed
    grader = get_task(task).grader
    triggers = getattr(grader, "triggers", answers.TRIGGERS)
    if any(t in fixed for t in triggers):
        return fixed
    return f"{fixed.rstrip()} {get_task(task).answer_only(answer)}"


def target_ceiling(task: str, table: pa.Table, options: answers.GraderOptions = answers.PAPER_GRADING) -> float | None:
    """Share of a cell's training targets graded correct against their own answers: the accuracy
    of a student that reproduced its targets exactly. None for an empty table."""
    rows = table.select(["rationale", "answer"]).to_pylist()
    if not rows:
        return None
    return sum(bool(r["answer"]) and answers.is_correct(task, r["rationale"], r["answer"], options)
               for r in rows) / len(rows)


# ------------------------------------------------------------------------ content digests


def train_sources(task: str, teacher: str, level: int | None = None, fmt: str = "cot") -> list[str]:
    """Relative paths of every file `load_train` reads for this cell (its identity's inputs)."""
    paths = [DATASET_INFO, train_file(task, teacher, level, fmt).path,
             train_file(task, "answer_only").path, *test_sources(task)]
    return sorted(set(paths))


def test_sources(task: str) -> list[str]:
    """Relative paths of every file `load_test` reads."""
    spec = get_task(task).test
    return sorted({spec.path, *([DATASET_INFO, train_file(task, "answer_only").path] if spec.minus_train else [])})


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(relpath: str) -> str:
    """sha256 of the local copy of a data file (memoised by path, size and mtime)."""
    path = resolve(relpath)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


def digests(relpaths: list[str]) -> dict[str, str]:
    """relative path -> sha256 of its local copy, for a cell's or a trial's identity."""
    return {p: file_digest(p) for p in relpaths}


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an EXAMPLE_SCHEMA table to a local path or a pyarrow filesystem URI."""
    if not table.schema.equals(EXAMPLE_SCHEMA):
        raise ValueError(f"table schema differs from EXAMPLE_SCHEMA:\n{table.schema}")
    path = str(path)
    if "://" in path:
        pq.write_table(table, path)  # object stores write an object whole
    else:
        files.write_parquet(table, path)


# ------------------------------------------------------------------------- availability


@dataclass(frozen=True)
class CellStatus:
    """A training cell the release lists, and where its file is (None: upstream only)."""

    teacher: str
    level: int | None
    format: str
    path: str
    where: str | None  # "mirror" | "cache" | None

    @property
    def offline(self) -> bool:
        return self.where is not None


def available_cells(task: str) -> list[CellStatus]:
    """Every (teacher, level, format) of ``task`` upstream, and which are on this machine."""
    out = []
    for tf in train_files(task):
        found = local_path(tf.path)
        out.append(CellStatus(tf.teacher, tf.level, tf.format, tf.path,
                              found[1] if found else None))
    return out


# ------------------------------------------------------------------------ contamination


@dataclass(frozen=True)
class Overlap:
    """Overlap between one raw training file and the test set."""

    path: str
    cells: str
    rows: int
    id_overlap: int  # rows whose question_id is a test question_id
    text_overlap: int  # rows whose text_key is a test text_key


@dataclass(frozen=True)
class ContaminationReport:
    task: str
    test_rows: int
    sources: tuple[Overlap, ...]
    unavailable: tuple[str, ...]  # training files not on this machine (not checked)

    def to_text(self) -> str:
        lines = [f"{self.task}: {self.test_rows} test questions; overlap of each raw "
                 f"training file (load_train drops the question_id overlaps)"]
        lines += [f"  {o.id_overlap:>5} id  {o.text_overlap:>5} text  of {o.rows:>5} rows  "
                  f"{o.path} ({o.cells})" for o in self.sources]
        lines += [f"  not available offline: {p}" for p in self.unavailable]
        return "\n".join(lines)


def contamination(task: str) -> ContaminationReport:
    """Exact question_id and normalised-text overlap of each raw training file with the test."""
    test = load_test(task)
    test_ids = set(test.column("question_id").to_pylist())
    test_keys = {text_key(q) for q in test.column("question").to_pylist()}
    by_path: dict[str, list[TrainFile]] = {}
    for tf in train_files(task):
        by_path.setdefault(tf.path, []).append(tf)
    sources, unavailable = [], []
    for path, tfs in by_path.items():
        if local_path(path) is None:
            unavailable.append(path)
            continue
        questions = [_get(r, tfs[0].prompt, path, i) for i, r in enumerate(read_rows(path))]
        sources.append(Overlap(
            path, ", ".join(_cell_name(tf.cell) for tf in tfs), len(questions),
            sum(question_id(q) in test_ids for q in questions),
            sum(text_key(q) in test_keys for q in questions)))
    return ContaminationReport(task, test.num_rows, tuple(sources), tuple(unavailable))


# ----------------------------------------------------------------------------- pinning


def build_manifest(mirror: Path) -> dict:
    """upstream.json content: the roots, and every upstream file with its sha256 and size.

    Files: every file dataset_info.json lists, the mirrored train/test files of the release,
    and the registry's test files. A file absent from ``mirror`` gets sha256 null.
    """
    info = json.loads((mirror / DATASET_INFO).read_text())
    paths = {"distilling-cot/train/" + e["file_name"] for e in info.values()}
    paths |= {t.test.path for t in TASKS.values()}
    for folder in ("distilling-cot/train", "distilling-cot/test"):
        paths |= {f"{folder}/{p.name}" for p in (mirror / folder).glob("*") if p.is_file()}
    files = {}
    for rel in sorted(paths):
        p = mirror / rel
        files[rel] = ({"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                       "bytes": p.stat().st_size} if p.is_file() else
                      {"sha256": None, "bytes": None})
    roots = {k: {"repo": r, "commit": c, "path": p} for k, (r, c, p) in ROOTS.items()}
    return {"roots": roots, "files": files}


# --------------------------------------------------------------------------------- CLI


def _cmd_list(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else list(TASKS):
        task = get_task(name)
        test = local_path(task.test.path)
        print(f"{name} ({task.kind})  test: {task.test.path}  "
              f"[{test[1] if test else 'not available offline'}]")
        for c in available_cells(name):
            level = f"L{c.level}" if c.level else "-"
            print(f"  {c.teacher:<12} {level:<3} {c.format:<4} "
                  f"{c.where or 'not available offline':<22} {c.path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.split == "test":
        table = load_test(args.task)
    else:
        table = load_train(args.task, args.teacher, args.level, args.format, repair=args.repair)
    write_parquet(table, args.out)
    print(f"wrote {table.num_rows} rows to {args.out}")
    return 0


def _cmd_ceiling(args: argparse.Namespace) -> int:
    """Target ceiling of every released cell on this machine (as released, and repaired)."""
    print(f"{'task':<11}{'cell':<18}{'rows':>6}  {'ceiling':>8}  {'repaired':>8}  file")
    for name in [args.task] if args.task else list(TASKS):
        for c in available_cells(name):
            cell = _cell_name((c.teacher, c.level, c.format))
            if not c.offline:
                print(f"{name:<11}{cell:<18}{'':>6}  {'':>8}  {'':>8}  {c.path} (not available offline)")
                continue
            table = load_train(name, c.teacher, c.level, c.format)
            repaired = target_ceiling(name, load_train(name, c.teacher, c.level, c.format, repair=True))
            print(f"{name:<11}{cell:<18}{table.num_rows:>6}  {_share(target_ceiling(name, table)):>8}  "
                  f"{_share(repaired):>8}  {c.path}")
    return 0


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _cmd_contamination(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else list(TASKS):
        print(contamination(name).to_text())
    return 0


def _cmd_pin(args: argparse.Namespace) -> int:
    if not args.mirror:
        raise ValueError(f"pin needs --mirror or {ENV_DATA_DIR}")
    manifest = build_manifest(Path(args.mirror))
    files.write_json(args.out, manifest, indent=1)
    print(f"pinned {len(manifest['files'])} files to {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="training cells per task and where their files are")
    ls.add_argument("--task", choices=list(TASKS))
    ls.set_defaults(run=_cmd_list)
    ex = sub.add_parser("export", help="write one training cell or a test set as Parquet")
    ex.add_argument("--task", choices=list(TASKS), required=True)
    ex.add_argument("--split", choices=("train", "test"), default="train")
    ex.add_argument("--teacher", choices=TEACHERS + LEVELLESS, default="chatgpt")
    ex.add_argument("--level", type=int, choices=LEVELS)
    ex.add_argument("--format", choices=FORMATS, default="cot")
    ex.add_argument("--out", required=True)
    ex.add_argument("--repair", action="store_true",
                    help="repair the targets (LaTeX escapes eaten by JSON, unmarked final answers); see docs/grading.md")
    ex.set_defaults(run=_cmd_export)
    ce = sub.add_parser("ceiling", help="target ceiling per cell: the share of its training targets graded "
                                         "correct against their own answers (as released and repaired)")
    ce.add_argument("--task", choices=list(TASKS))
    ce.set_defaults(run=_cmd_ceiling)
    cc = sub.add_parser("check-contamination", help="train/test question overlap per file")
    cc.add_argument("--task", choices=list(TASKS))
    cc.set_defaults(run=_cmd_contamination)
    pin = sub.add_parser("pin", help="write upstream.json (sha256 of each file) from a mirror")
    pin.add_argument("--mirror", default=os.environ.get(ENV_DATA_DIR),
                     help=f"mirror folder (default: ${ENV_DATA_DIR})")
    pin.add_argument("--out", default=str(MANIFEST))
    pin.set_defaults(run=_cmd_pin)
    return p


def main(argv: list[str]) -> int:
    """`raydistill data list | export | ceiling | check-contamination | pin`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (DataUnavailable, MalformedData, ValueError) as exc:
        print(f"raydistill data: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
