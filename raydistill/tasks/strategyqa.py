"""StrategyQA: yes/no questions that need implicit multi-step reasoning (290 test questions)."""

from raydistill.answers import LabelGrader
from raydistill.tasks.base import COMMONSENSE_PROTOCOL, Task, TestSet

TASK = Task(
    name="strategyqa",
    kind="commonsense",
    release_names=("stqa",),
    test=TestSet("distilling-cot/test/strategyQA_test.json", question="instruction", answer="label"),
    grader=LabelGrader(labels="bool"),
    protocol=COMMONSENSE_PROTOCOL,
    exemplars="yes_no",
)
