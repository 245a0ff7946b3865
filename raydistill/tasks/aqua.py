"""AQuA-RAT: algebra word problems with five answer choices (254 test problems)."""

from raydistill.answers import ChoiceGrader
from raydistill.tasks.base import MATH_PROTOCOL, Task, TestSet


def _question(row: dict) -> str:
    """Question plus "Answer Choices: (A) .. (B) ..", the training files' layout."""
    choices = []
    for option in row["options"]:
        letter, sep, text = option.partition(")")
        choices.append(f"({letter.strip()}) {text.strip()}" if sep else option.strip())
    return f"{row['question'].strip()} Answer Choices: {' '.join(choices)}"


TASK = Task(
    name="aqua",
    kind="math",
    release_names=("aqua", "auqa"),  # the release spells some entries "auqa"
    test=TestSet("mammoth2-math-eval/AQuA/AQuA.json", question=_question, answer="correct", rationale="rationale"),
    grader=ChoiceGrader(),
    protocol=MATH_PROTOCOL,
    exemplars="multiple_choice",
)
