"""Answer extraction and grading with the paper's semantics, rule by rule (docs/grading.md).

Each task of the registry (`raydistill.tasks`) names one grader; the same grader verifies teacher
rationales (annotate), measures a cell's target ceiling and grades students (evaluate).

* `NumberGrader` (svamp, gsm8k), `ChoiceGrader` (aqua) and `MathGrader` (math) mirror MAmmoTH2's
  ``answer_clean`` and ``compare_answer_with_groundtruth`` (TIGER-AI-Lab/MAmmoTH2 at 9c67cb1,
  ``math_eval/utils.py``), the evaluator the seed paper names for its math sets: the text after
  the last "The answer is" trigger, then numbers, a choice letter or a LaTeX expression
  normalised by ``_strip_string``; gold and prediction are equal as strings, case ignored.
  There is no numeric tolerance for MATH: MAmmoTH2 uses one only where a numeric gold is passed
  (TheoremQA).
* `LabelGrader` (csqa, obqa, strategyqa) mirrors the seed paper's reasoning evaluator
  (EIT-NLP/Distilling-CoT-Reasoning, ``Evaluation/reasoning_eval/run_reasoning.py``): the first
  "[Tt]he answer is (A-E|True|False)" of the cleaned generation, exact equality with the label.

Anything more lenient is an opt-in `GraderOptions` flag; the options are part of a trial's
identity and named in the report.

Public API: ``extract``, ``normalize_gold``, ``is_correct``, ``same_answer`` (by task name), the
grader classes, ``GraderOptions``, ``PAPER_GRADING``, ``repair_escapes`` and ``split_think`` (a
thinking student's think block and answer, `thinking`).

Parts: `graders` (`GraderOptions`, the shared MAmmoTH2 helpers, `NumberGrader`, `ChoiceGrader`,
`LabelGrader`), `latex` (MATH's LaTeX normalisation and `MathGrader`); this module grades by task name.
"""

from __future__ import annotations

from typing import Any

from raydistill.answers.graders import (
    PAPER_GRADING,
    TRIGGERS,
    ChoiceGrader,
    GraderOptions,
    LabelGrader,
    NumberGrader,
    gold_letter,
)
from raydistill.answers.latex import MathGrader, find_box, repair_escapes, strip_string
from raydistill.answers.thinking import THINK_MARKERS, ThinkSplit, split_think

__all__ = [
    "PAPER_GRADING", "THINK_MARKERS", "TRIGGERS", "ThinkSplit", "ChoiceGrader", "GraderOptions", "LabelGrader", "MathGrader", "NumberGrader",
    "extract", "find_box", "gold_letter", "grade", "is_correct", "normalize_gold", "repair_escapes", "same_answer",
    "split_think", "strip_string",
]


def _grader(task: str):
    from raydistill.tasks import get_task

    return get_task(task).grader


def extract(task: str, text: str | None, options: GraderOptions = PAPER_GRADING) -> str | None:
    """The normalised answer in a model's output for ``task``; None when nothing is found."""
    return _grader(task).extract(text or "", options)


def same_answer(task: str, a: str, b: str, options: GraderOptions = PAPER_GRADING) -> bool:
    """Whether two extracted answers are the same answer by ``task``'s grader (``b`` in the gold's place)."""
    return a == b or _grader(task).equal(a, b, options)


def normalize_gold(task: str, raw: Any) -> str:
    """A dataset's raw gold answer in the form ``extract`` produces; ValueError when it cannot."""
    grader = _grader(task)
    if raw is None:
        raise ValueError(f"{task}: gold answer is None")
    try:
        return grader.normalize_gold(raw)
    except ValueError as err:
        raise ValueError(f"{task}: {err}") from None


def is_correct(task: str, text: str | None, gold: Any, options: GraderOptions = PAPER_GRADING) -> bool:
    """Whether the answer extracted from ``text`` matches ``gold`` (raw or normalised)."""
    return grade(task, text, gold, options)[1]


def grade(task: str, text: str | None, gold: Any, options: GraderOptions = PAPER_GRADING) -> tuple[str | None, bool]:
    """(extracted answer, correct) of one output against its gold."""
    grader = _grader(task)
    pred = grader.extract(text or "", options)
    if pred is None or gold is None:
        return pred, False
    try:
        gold_s = grader.normalize_gold(gold)
    except ValueError:
        gold_s = str(gold).strip()
    return pred, grader.equal(pred, gold_s, options)
