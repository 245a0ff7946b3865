"""SVAMP: arithmetic word problems; test = SVAMP.json minus the 700 training questions = 300."""

from raydistill.answers import NumberGrader
from raydistill.tasks.base import MATH_PROTOCOL, Task, TestSet


def _question(row: dict) -> str:
    """Body and question joined as MAmmoTH2's data_loader does."""
    return f"{row['Body'].strip()} {row['Question'].strip()}"


TASK = Task(
    name="svamp",
    kind="math",
    release_names=("svamp",),
    test=TestSet("mammoth2-math-eval/SVAMP/SVAMP.json", question=_question, answer="Answer", minus_train=True),
    grader=NumberGrader(),
    protocol=MATH_PROTOCOL,
    exemplars="math_numeric",
)
