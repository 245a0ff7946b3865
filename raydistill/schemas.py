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
        ("truncated", pa.bool_()),  # cut by max_new_tokens: no EOS and no stop string before the budget ran out
    ]
)
