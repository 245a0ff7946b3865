"""Baselines of a report, per dataset: the constant answer (always answering the most frequent gold
answer of the test set as evaluated) and chance where it is defined; every cell is tested against
the constant answer on the same questions, and a cell not significantly above it is flagged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from raydistill.report.cells import BASELINE_FAMILY, Cell, Comparison, _tested, seed_key
from raydistill.report.intervals import ALPHA
from raydistill.report.records import Trial

BOOLEAN_LABELS = {"True", "False"}


@dataclass
class Baseline:
    """The constant answer of one dataset, its per-question correctness, and chance."""

    dataset: str
    answer: str  # the most frequent gold answer (ties: the first in sorted order)
    correct: dict[str, float]  # question_id -> 1.0 where the gold is the constant answer, else 0.0
    chance: float | None  # expected accuracy of a uniform random choice; None: undefined (free-form answers)
    chance_basis: str  # "5 options", "True/False", or why chance is undefined

    @property
    def n_questions(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> int:
        return int(sum(self.correct.values()))

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_questions

    @property
    def label(self) -> str:
        return f'constant "{self.answer}"'

    def cell(self, fmt: str, student: str) -> Cell:
        """The constant answer as a one-trial cell (for the paired tests; never a row of its own)."""
        axes = {"dataset": self.dataset, "teacher": self.label, "format": fmt, "student": student, "level": "",
                "seed": "constant answer"}
        trial = Trial(axes=axes, metrics={"accuracy": self.accuracy, "n_test": self.n_questions},
                      trial_hash=f"baseline:{self.dataset}", num_workers=None, num_actors=None, cell=None,
                      scores=dict(self.correct))
        return Cell(trial.key, [trial])


def chance_level(dataset: str, golds: list[str]) -> tuple[float | None, str]:
    """1 / the number of options for a multiple-choice task (the task registry's labels), 1/2 for
    True/False answers, None for free-form answers (numbers, expressions) where chance is undefined."""
    from raydistill.answers import ChoiceGrader, LabelGrader
    from raydistill.tasks import TASKS

    task = TASKS.get(dataset)
    grader = task.grader if task else None
    if isinstance(grader, LabelGrader) and grader.labels == "bool" or (grader is None and golds
                                                                        and set(golds) <= BOOLEAN_LABELS):
        return 0.5, "True/False"
    if isinstance(grader, LabelGrader):
        return 1 / len(grader.labels), f"{len(grader.labels)} options"
    if isinstance(grader, ChoiceGrader):
        return 1 / 5, "5 options"  # ChoiceGrader reads the letters A-E
    return None, "undefined for free-form answers"


def build_baselines(cells: list[Cell]) -> dict[str, Baseline]:
    """dataset -> its constant-answer baseline, from the gold answers of every evaluated question of
    the dataset's trials (the union over trials; a question's gold is the first one seen)."""
    golds: dict[str, dict[str, str]] = {}
    for cell in cells:
        for trial in sorted(cell.trials, key=lambda t: seed_key(t.axes["seed"])):
            for q, g in (trial.gold or {}).items():
                golds.setdefault(cell.key[0], {}).setdefault(q, g)
    baselines = {}
    for dataset, by_question in sorted(golds.items()):
        if not by_question:
            continue
        counts = Counter(by_question.values())
        answer = min(counts, key=lambda g: (-counts[g], g))
        chance, basis = chance_level(dataset, list(by_question.values()))
        correct = {q: float(g == answer) for q, g in sorted(by_question.items())}
        baselines[dataset] = Baseline(dataset, answer, correct, chance, basis)
    return baselines


def baseline_tests(cells: list[Cell], baselines: dict[str, Baseline], alpha: float = ALPHA) -> list[Comparison]:
    """Each cell with predictions against its dataset's constant answer on the questions both have
    (Δ = cell − constant; exact sign test, the exact McNemar test for one seed); Holm-adjusted over
    them. A cell not significantly above the constant answer (Δ ≤ 0 or Holm-adjusted p > alpha) gets
    a weak-number flag with the two accuracies, the discordant counts and p."""
    pairs = []
    for cell in cells:
        baseline = baselines.get(cell.key[0])
        if baseline is None or not any(t.scores for t in cell.trials):
            continue
        constant = baseline.cell(cell.key[2], cell.key[3])
        pairs.append((constant.key[:4], constant, cell))
    comparisons = _tested(pairs, BASELINE_FAMILY)
    for c in comparisons:
        c.b.baseline_flag = None
        if c.test.diff <= 0 or c.test.p_holm > alpha:
            baseline = baselines[c.b.key[0]]
            c.b.baseline_flag = (
                f"not significantly above the constant answer \"{baseline.answer}\": "
                f"{100 * (c.test.diff + _mean(c.a, c)):.1f} % vs {100 * _mean(c.a, c):.1f} % on "
                f"{c.test.n_questions} questions, {c.test.n_b_better} better / {c.test.n_a_better} worse, "
                f"p = {_p(c.test.p_value)} (Holm {_p(c.test.p_holm)})")
    return comparisons


def _mean(constant: Cell, c: Comparison) -> float:
    """The constant answer's accuracy on the questions of the comparison (the cell's questions)."""
    questions = set.intersection(*(set(t.scores) for t in c.b.trials if t.scores))
    correct = constant.trials[0].scores
    shared = [correct[q] for q in questions if q in correct]
    return sum(shared) / len(shared)


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
