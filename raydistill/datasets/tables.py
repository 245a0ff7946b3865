"""Test sets and training cells as pyarrow Tables with ``raydistill.schemas.EXAMPLE_SCHEMA``.

Training tables never contain a question of the task's test set (see ``load_train``). Also: the
opt-in repair of released targets and golds, a cell's target ceiling, the files each table reads
(its identity's inputs) and ``write_parquet``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import answers, files
from raydistill.datasets.mirror import DATASET_INFO, MalformedData, get_field, local_path, read_rows
from raydistill.datasets.release import TrainFile, cell_name, train_file
from raydistill.schemas import EXAMPLE_SCHEMA
from raydistill.tasks import get_task
from raydistill.tasks.base import Field

log = logging.getLogger("raydistill.datasets")  # one logger for the package


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


# A test set read once per process while its files stay as they are: a sweep, `raydistill data
# ceiling` and every training cell of a task (`load_train` drops its questions) share one reading.
_TEST_SETS: dict[tuple, pa.Table] = {}


def load_test(task: str) -> pa.Table:
    """The task's test set (SVAMP: SVAMP.json minus the training questions = 300)."""
    key = _files_key(task, test_sources(task))
    if key is None or key not in _TEST_SETS:
        table = _read_test(task)
        key = _files_key(task, test_sources(task))  # a downloaded file is on this machine now
        if key is None:
            return table
        _TEST_SETS[key] = table
    return _TEST_SETS[key]


def _files_key(task: str, relpaths: list[str]) -> tuple | None:
    """The task and each file's local path, size and modification time; None while one is not local."""
    key: list = [task]
    for relpath in relpaths:
        found = local_path(relpath)
        if found is None:
            return None
        stat = found[0].stat()
        key.append((str(found[0]), stat.st_size, stat.st_mtime_ns))
    return tuple(key)


def _read_test(task: str) -> pa.Table:
    spec = get_task(task).test
    rows, skip = [], set()
    if spec.minus_train:
        skip = set(_questions(train_file(task, "answer_only")))
    for i, row in enumerate(read_rows(spec.path)):
        question = _nonempty_question(get_field(row, spec.question, spec.path, i), spec.question, spec.path, i)
        if question_id(question) in skip:
            continue
        raw = get_field(row, spec.answer, spec.path, i)
        rows.append((question, get_field(row, spec.rationale, spec.path, i),
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
        out.setdefault(question_id(get_field(row, tf.prompt, tf.path, i)),
                       get_field(row, tf.response, tf.path, i))
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
    return load_train_variants(task, teacher, level, fmt, (repair,))[repair]


def load_train_variants(task: str, teacher: str, level: int | None = None, fmt: str = "cot",
                        repairs: tuple[bool, ...] = (False, True)) -> dict[bool, pa.Table]:
    """`load_train` as released (False) and repaired (True) from one reading of the cell: its
    files read, its rows checked and its counts logged once (`raydistill data ceiling`)."""
    tf = train_file(task, teacher, level, fmt)
    raw = read_rows(tf.path)
    test_ids = set(load_test(task).column("question_id").to_pylist())
    golds = {repair: _gold_answers(task, repair) for repair in repairs}
    rows: dict[bool, list] = {repair: [] for repair in repairs}
    leaked, unannotated = 0, []
    for i, row in enumerate(raw):
        question = _nonempty_question(get_field(row, tf.prompt, tf.path, i), tf.prompt, tf.path, i)
        if row.get(tf.response) is None or not str(row[tf.response]).strip():
            unannotated.append(i)
            continue
        qid = question_id(question)
        if qid in test_ids:
            leaked += 1
            continue
        released = get_field(row, tf.response, tf.path, i)
        for repair in repairs:
            rationale = released
            if teacher == "answer_only":
                rationale = get_task(task).answer_only(repair_gold(rationale) if repair else rationale)
            answer = _train_answer(task, qid, rationale, golds[repair])
            if repair:
                rationale = repair_target(task, rationale, answer)
            rows[repair].append((question, rationale, answer, f"{tf.path}#{i}"))
    if raw and len(unannotated) == len(raw):
        raise MalformedData(f"{tf.path}: no row has column {tf.response!r}")
    if unannotated:
        log.warning("%s: skipped %d rows without column %r or with it blank (first: row %d)",
                    tf.path, len(unannotated), tf.response, unannotated[0])
    (log.warning if leaked else log.info)(
        "%s %s: dropped %d of %d rows whose question is in the %s test set",
        task, cell_name(tf.cell), leaked, len(raw) - len(unannotated), task)
    for repair in repairs:
        missing = sum(1 for r in rows[repair] if not r[2])
        if missing:
            log.info("%s %s%s: %d rows have no gold answer (answer \"\")",
                     task, cell_name(tf.cell), " repaired" if repair else "", missing)
    return {repair: _table(rows[repair]) for repair in repairs}


# ----------------------------------------------------------------------- length ablation

ANSWER_TRIGGER = re.compile(r"[Tt]he answer is")


def pad_rationale(text: str, target_words: int, filler: str = "...") -> str:
    """Pad ``text`` to ``target_words`` whitespace words by repeating ``filler`` right before its
    final "The answer is ..." sentence (at the end if there is none); no content is added."""
    matches = list(ANSWER_TRIGGER.finditer(text))
    cut = matches[-1].start() if matches else len(text)
    body, tail = text[:cut].rstrip(), text[cut:]
    words = len(body.split()) + len(tail.split())  # "= 322.The answer is" counts as the words it becomes
    unit = max(1, len(filler.split()))
    need = math.ceil(max(0, target_words - words) / unit)
    if need == 0:
        return text
    return " ".join(part for part in (body, " ".join([filler] * need), tail) if part)


def pad_to_length_of(table: pa.Table, target: pa.Table, label: str) -> pa.Table:
    """``table`` with each rationale padded (`pad_rationale`) to the word count of the same
    question's rationale in ``target``: the paper's length ablation ("Level 1 + padding", padded to
    level 5). A question ``target`` lacks keeps its rationale; they are counted in the log."""
    lengths = dict(zip(target.column("question_id").to_pylist(),
                       (len(r.split()) for r in target.column("rationale").to_pylist())))
    qids = table.column("question_id").to_pylist()
    padded = [pad_rationale(r, lengths.get(q, 0)) for q, r in zip(qids, table.column("rationale").to_pylist())]
    unmatched = sum(q not in lengths for q in qids)
    (log.warning if unmatched else log.info)("%s: %d of %d rationales padded to the length of the target "
                                             "level's; %d questions have no target rationale and stay as they are",
                                             label, sum(q in lengths for q in qids), len(qids), unmatched)
    return table.set_column(table.schema.get_field_index("rationale"), "rationale", pa.array(padded, pa.string()))


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


# ------------------------------------------------------------------------- data sources


def train_sources(task: str, teacher: str, level: int | None = None, fmt: str = "cot") -> list[str]:
    """Relative paths of every file `load_train` reads for this cell (its identity's inputs)."""
    paths = [DATASET_INFO, train_file(task, teacher, level, fmt).path,
             train_file(task, "answer_only").path, *test_sources(task)]
    return sorted(set(paths))


def test_sources(task: str) -> list[str]:
    """Relative paths of every file `load_test` reads."""
    spec = get_task(task).test
    return sorted({spec.path, *([DATASET_INFO, train_file(task, "answer_only").path] if spec.minus_train else [])})


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an EXAMPLE_SCHEMA table to a local path or a pyarrow filesystem URI."""
    if not table.schema.equals(EXAMPLE_SCHEMA):
        raise ValueError(f"table schema differs from EXAMPLE_SCHEMA:\n{table.schema}")
    path = str(path)
    if "://" in path:
        pq.write_table(table, path)  # object stores write an object whole
    else:
        files.write_parquet(table, path)
