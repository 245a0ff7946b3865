"""OpenBookQA: four-choice elementary science questions (500 test questions)."""

from raydistill.answers import LabelGrader
from raydistill.tasks.base import COMMONSENSE_PROTOCOL, Task, TestSet

TASK = Task(
    name="obqa",
    kind="commonsense",
    release_names=("obqa",),
    test=TestSet("distilling-cot/test/openbookQA_test.json", question="instruction", answer="label"),
    grader=LabelGrader(labels="ABCD"),
    protocol=COMMONSENSE_PROTOCOL,
    exemplars="multiple_choice",
)
