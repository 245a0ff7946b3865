"""MATH: competition mathematics, LaTeX answers; test = MATH-500."""

from raydistill.answers import MathGrader
from raydistill.tasks.base import MATH_PROTOCOL, Task, TestSet

TASK = Task(
    name="math",
    kind="math",
    release_names=("math", "math_mix"),
    test=TestSet("mammoth2-math-eval/math/math_500.jsonl", question="problem", answer="answer", rationale="solution"),
    grader=MathGrader(),
    protocol=MATH_PROTOCOL,
    exemplars="math_latex",
)
