"""Supervision kinds of a reasoning teacher's cell: short, long and mixed rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raydistill.answers import split_think
from raydistill.datasets.supervision import apply_supervision, long_form, long_questions

IDS = [f"q{i}" for i in range(200)]


def _cell(traces: list[str | None] | None = None) -> pa.Table:
    traces = traces if traces is not None else [f"trace {q}: 2 + 2 = 4" for q in IDS]
    return pa.table({"question_id": IDS, "question": [f"question {q}" for q in IDS],
                     "rationale": [f"2 + 2 = 4. The answer is 4 ({q})" for q in IDS], "trace": traces})


def test_long_questions_are_seeded_nested_in_the_ratio_and_cover_the_ends():
    quarter, half = long_questions(IDS, 0.25, seed=100), long_questions(IDS, 0.5, seed=100)
    assert len(quarter) == 50 and len(half) == 100 and quarter < half
    assert long_questions(IDS, 0.5, seed=100) == half  # the same at every call
    assert long_questions(list(reversed(IDS)), 0.5, seed=100) == half  # the row order does not matter
    assert long_questions(IDS, 0.5, seed=101) != half
    assert long_questions(IDS, 0.0, seed=100) == set() and long_questions(IDS, 1.0, seed=100) == set(IDS)
    with pytest.raises(ValueError, match="outside"):
        long_questions(IDS, 1.5, seed=100)


def test_mixed_rows_are_long_for_the_chosen_questions_and_read_back_by_the_grader():
    mixed = apply_supervision(_cell(), 0.5, seed=100).to_pylist()
    chosen = long_questions(IDS, 0.5, seed=100)
    for row in mixed:
        part = split_think(row["rationale"])
        if row["question_id"] in chosen:
            assert row["rationale"] == long_form(row["trace"], f"2 + 2 = 4. The answer is 4 ({row['question_id']})")
            assert part.think == row["trace"] and part.answer.endswith(f"({row['question_id']})")
        else:
            assert part.think is None and row["rationale"].startswith("2 + 2 = 4.")
    assert apply_supervision(_cell(), 0.0, seed=100).equals(_cell())
    assert all(r["rationale"].startswith("<think>\n") for r in apply_supervision(_cell(), 1.0, seed=100).to_pylist())


def test_hidden_traces_cannot_be_long():
    hidden = _cell([None] * len(IDS))
    assert apply_supervision(hidden, 0.0, seed=100).equals(hidden)  # short needs no trace
    with pytest.raises(ValueError, match="cell x: 100 row\\(s\\) chosen for long form have no trace"):
        apply_supervision(hidden, 0.5, seed=100, where="cell x")
    with pytest.raises(ValueError, match="no 'trace' column"):
        apply_supervision(_cell().drop(["trace"]), 0.5, seed=100)
