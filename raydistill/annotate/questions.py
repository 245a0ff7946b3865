"""The questions of a cell (a task's released training questions or a Parquet file), rationale
padding for the length ablation, and hybrid levels by question length.
"""

from __future__ import annotations

import logging
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.schemas import answer_problem
from raydistill.spec.annotation import HybridSpec, QuestionsSpec
from raydistill.spec.base import SpecError

log = logging.getLogger(__name__)


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
    """The questions file of ``questions.path``; every problem is a SpecError naming the file
    (and the column or rows) and what to do."""
    where = f"questions.path {path}"
    try:
        t = pq.read_table(path)
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file; point questions.path at a Parquet file") from None
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())[:200]
        raise SpecError(f"{where}: not a readable Parquet file ({reason}); rewrite it with "
                          "pyarrow.parquet.write_table") from None
    missing = {"question", "answer"} - set(t.column_names)
    if missing:
        raise SpecError(f"{where}: missing columns {sorted(missing)} (has {t.column_names}); the file needs "
                          "question and answer columns (question_id and source are optional)")
    for name in ("question", "question_id"):
        if name in t.column_names and not pa.types.is_string(t.schema.field(name).type) \
                and not pa.types.is_large_string(t.schema.field(name).type):
            raise SpecError(f"{where}: column {name!r} has type {t.schema.field(name).type}, not string; "
                              "write it as text")
    if t.num_rows == 0:
        raise SpecError(f"{where}: no rows; there is nothing to annotate")
    blank = [i for i, x in enumerate(t.column("question").to_pylist()) if x is None or not x.strip()]
    if blank:
        raise SpecError(f"{where}: rows {blank[:10]}{' ...' if len(blank) > 10 else ''} have an empty "
                          f"question ({len(blank)} in all); remove or fill them")
    from raydistill.datasets import question_id

    ids = None if "question_id" in t.column_names else [question_id(x) for x in t.column("question").to_pylist()]
    problem = answer_problem(t, ids)
    if problem:
        raise SpecError(f"{where}: {problem}")
    return t


def question_length_levels(questions: pa.Table, h: HybridSpec) -> list[int]:
    lens = [len(q.split()) for q in questions.column("question").to_pylist()]
    if not lens:
        return []
    s = sorted(lens)
    thr = s[max(0, math.ceil(h.length_quantile * len(s)) - 1)]  # the shortest quantile share is easy
    return [h.hard_level if n > thr else h.easy_level for n in lens]
