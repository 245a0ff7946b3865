"""CommonsenseQA: five-choice commonsense questions (1,221 test questions)."""

from raydistill.answers import LabelGrader
from raydistill.tasks.base import COMMONSENSE_PROTOCOL, Task, TestSet

TASK = Task(
    name="csqa",
    kind="commonsense",
    release_names=("cqa", "csqa", "ecqa"),
    test=TestSet("distilling-cot/test/csqa_test.json", question="instruction", answer="label"),
    grader=LabelGrader(labels="ABCDE"),
    protocol=COMMONSENSE_PROTOCOL,
    exemplars="multiple_choice",
)
