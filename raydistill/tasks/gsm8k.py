"""GSM8K: grade-school math word problems (1,319 test problems, gold after "####")."""

from raydistill.answers import TRIGGERS, NumberGrader
from raydistill.tasks.base import MATH_PROTOCOL, Task, TestSet

TASK = Task(
    name="gsm8k",
    kind="math",
    release_names=("gsm8k",),
    test=TestSet("mammoth2-math-eval/gsm8k/gsm8k.jsonl", question="question", answer="answer", rationale="answer"),
    grader=NumberGrader(triggers=TRIGGERS + ("####",)),  # run_open.get_seperation_trigger
    protocol=MATH_PROTOCOL,
    exemplars="math_numeric",
)
