"""Supervision kinds of a reasoning teacher's cell: short, long, or a mix of both.

A reasoning teacher returns a trace (its thinking) and a reply (the rationale at the level the
prompt asked for, ending in the answer). A cell's rows can train a student on:

* ``short``: the reply alone, as every other cell does;
* ``long``: the trace in think markers, then the reply (``<think>\\ntrace\\n</think>\\n\\nreply``);
* ``mix`` with ratio r: a fraction r of the cell's questions in long form, the others short
  ("Mix Distillation", Li et al. 2025). Which questions are long is fixed by the seed alone and
  nested in r: at one seed the long questions of r = 0.25 are among those of r = 0.5, so cells of
  one seed differ only in the questions r adds.

A student trained on long or mixed rows thinks before it answers; its evaluation grades the text
after the think block (``eval.think``, docs/grading.md).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from raydistill.answers.thinking import THINK_MARKERS


def long_form(trace: str, reply: str, markers: tuple[str, str] = THINK_MARKERS) -> str:
    """The reply preceded by the trace in think markers."""
    return f"{markers[0]}\n{trace.strip()}\n{markers[1]}\n\n{reply.strip()}"


def long_questions(question_ids: list[str], ratio: float, seed: int) -> set[str]:
    """The round(ratio x n) questions in long form: the first of the questions ranked by a hash of
    (seed, question id), so the choice depends on the seed and the ids only and grows with ratio."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mix ratio {ratio} is outside [0, 1]")
    unique = sorted(set(question_ids))
    ranked = sorted(unique, key=lambda q: hashlib.sha256(f"{seed}\x1f{q}".encode()).hexdigest())
    return set(ranked[:round(ratio * len(unique))])


def apply_supervision(table: pa.Table, ratio: float, seed: int, where: str = "cell") -> pa.Table:
    """``table`` (question_id, rationale = the reply, trace) with the rationale of a ``ratio`` share of
    its questions in long form: 0 is short, 1 is long. A question chosen for long form whose row has
    no trace (a provider that hides its reasoning) is an error naming ``where`` and the count."""
    if "trace" not in table.column_names:
        raise ValueError(f"{where}: no 'trace' column; long and mixed supervision need a reasoning teacher's traces")
    ids = table["question_id"].to_pylist()
    chosen = long_questions(ids, ratio, seed)
    rows = table.to_pylist()
    missing = sum(1 for r in rows if r["question_id"] in chosen and not (r["trace"] or "").strip())
    if missing:
        raise ValueError(f"{where}: {missing} row(s) chosen for long form have no trace (the provider returned "
                         "none); use short supervision for this teacher, or a teacher that returns its reasoning")
    rationales = [long_form(r["trace"], r["rationale"]) if r["question_id"] in chosen else r["rationale"] for r in rows]
    return table.set_column(table.column_names.index("rationale"), "rationale", pa.array(rationales, pa.string()))
