"""Parquet schemas where the stages meet.

Every stage reads and writes these Arrow schemas; nothing else crosses a stage boundary.
"""

from __future__ import annotations

import pyarrow as pa

# One supervised example or test question, normalised from any upstream file.
EXAMPLE_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),  # sha1 of the normalised question text, 16 hex chars
        ("question", pa.string()),  # what the student sees (choices included for MC tasks)
        ("rationale", pa.string()),  # training target (ends with "The answer is X"); test: gold solution or ""
        ("answer", pa.string()),  # gold answer, normalised as raydistill.answers normalises it
        ("source", pa.string()),  # where the row came from: "<relative upstream path>#<row index>"
    ]
)

# One teacher request and its outcome (annotation stage).
ANNOTATION_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("teacher", pa.string()),
        ("level", pa.int32()),
        ("format", pa.string()),
        ("prompt_hash", pa.string()),
        ("response", pa.string()),
        ("extracted", pa.string()),
        ("gold", pa.string()),
        ("correct", pa.bool_()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("cost_usd", pa.float64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),  # null when the request succeeded, else why it failed
        ("finish_reason", pa.string()),  # the teacher's: "stop", "length" (hit max_tokens: cut short), ...
        ("sample", pa.int32()),  # which of the question's samples (0 .. samples-1; 0 with one per question)
    ]
)

# One student generation on one test question (evaluation stage).
PREDICTION_SCHEMA = pa.schema(
    [
        # The evaluation's identity (raydistill.evaluate.eval_hash): model weights, template, task,
        # test data, decoding settings and grader; resumed parts are matched on it.
        ("eval_hash", pa.string()),
        ("question_id", pa.string()),
        ("prompt", pa.string()),
        ("generation", pa.string()),
        ("extracted", pa.string()),
        ("gold", pa.string()),
        ("correct", pa.bool_()),
        ("tokens_generated", pa.int64()),
        ("truncated", pa.bool_()),  # cut by max_new_tokens: text, but no end-of-text token or stop string before the budget ran out
        ("empty", pa.bool_()),  # only whitespace once special tokens are removed (at any length): nothing to grade, never `truncated`
        # thinking evaluations only (eval.think; null otherwise): the think block's length in the
        # student's tokens (0 without one), and whether the generation ended inside it (then no answer)
        ("think_tokens", pa.int64()),
        ("think_unfinished", pa.bool_()),
    ]
)


def answer_problem(table: pa.Table, ids: list[str] | None = None) -> str | None:
    """What is wrong with a table's ``answer`` column, as the end of an error message naming the
    file; None when it is fine (or absent). An answer is text or a number, present on every row,
    and the same on every row of one question (``ids``, else the question_id column)."""
    if "answer" not in table.column_names:
        return None
    kind = table.schema.field("answer").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        return f"column 'answer' has type {kind}; write one answer per row, as text or a number"
    answers = [None if a is None else str(a).strip() for a in table.column("answer").to_pylist()]
    missing = [i for i, a in enumerate(answers) if not a]
    if missing:
        return (f"rows {missing[:10]}{' ...' if len(missing) > 10 else ''} have no answer (null or empty; "
                f"{len(missing)} in all); fill or remove them")
    if ids is None and "question_id" in table.column_names:
        ids = table.column("question_id").to_pylist()
    first: dict[str, int] = {}
    for i, qid in enumerate(ids or []):
        j = first.setdefault(qid, i)
        if answers[j] != answers[i]:
            return (f"rows {j} and {i} are the same question (question_id {qid}) with different answers "
                    f"({answers[j]!r} and {answers[i]!r}); keep the right one")
    return None
