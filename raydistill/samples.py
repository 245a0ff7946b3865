"""Several samples per question: per-question pass@k and majority vote (maj@k).

pass@k is the unbiased estimator (`stats.pass_at_k`) with k the number of samples of the question
that has the fewest (every question has k when the evaluation finished). maj@k scores a question 1
when the most common extracted answer among its first k samples is correct (self-consistency; samples
without an extracted answer do not vote; a tie goes to the answer seen first, as in
lm-evaluation-harness's majority-vote filter). pass@1 is the mean of ``correct`` over all samples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from raydistill import stats


@dataclass(frozen=True)
class SampleScores:
    """Per-question scores over k samples each; question order as first seen."""

    k: int
    pass_at_k: dict[str, float]
    maj_at_k: dict[str, float]

    def means(self) -> tuple[float, float]:
        """(pass@k, maj@k) averaged over the questions."""
        n = len(self.pass_at_k)
        return sum(self.pass_at_k.values()) / n, sum(self.maj_at_k.values()) / n


def majority_correct(extracted: list[str | None], correct: list[bool]) -> bool:
    """Whether the most common extracted answer (first seen among ties) is graded correct."""
    votes = Counter(e for e in extracted if e is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return next(bool(ok) for e, ok in zip(extracted, correct) if e == winner)


def sample_scores(question_ids: list[str], extracted: list[str | None], correct: list[bool]) -> SampleScores | None:
    """pass@k and maj@k per question from prediction rows (one per sample); None with one sample
    per question (pass@k is then the accuracy, and a vote of one is no vote)."""
    samples: dict[str, list[tuple[str | None, bool]]] = defaultdict(list)
    for q, e, ok in zip(question_ids, extracted, correct):
        samples[q].append((e, bool(ok)))
    if not samples:
        return None
    k = min(len(rows) for rows in samples.values())
    if k < 2:
        return None
    passes = {q: stats.pass_at_k(len(rows), sum(ok for _, ok in rows), k) for q, rows in samples.items()}
    votes = {q: float(majority_correct([e for e, _ in rows[:k]], [ok for _, ok in rows[:k]]))
             for q, rows in samples.items()}
    return SampleScores(k, passes, votes)
