"""Which of a question's teacher samples become training examples.

A policy looks at one question's samples (in sample order) and returns those it keeps; then
``max_per_question`` keeps at most the first m of them. Failed samples are never kept.

    keep_all            every successful sample
    keep_correct        the samples whose answer matches the gold answer
    keep_first_correct  the first correct sample (at most one per question)
    keep_majority       the samples that give the most common answer (self-consistency: no gold
                        needed); answers are compared with the task's grader, samples without an
                        answer do not vote, and a tie goes to the answer seen first
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Same = Callable[[str, str], bool]  # are two extracted answers the same answer?


@dataclass(frozen=True)
class Sample:
    """One teacher sample of a question, as far as selection cares."""

    index: int
    ok: bool  # the request succeeded
    correct: bool | None  # None: no gold answer to grade against
    extracted: str | None


def _equal(a: str, b: str) -> bool:
    return a == b


def keep_all(samples: list[Sample], same: Same = _equal) -> list[Sample]:
    return [s for s in samples if s.ok]


def keep_correct(samples: list[Sample], same: Same = _equal) -> list[Sample]:
    return [s for s in samples if s.ok and s.correct]


def keep_first_correct(samples: list[Sample], same: Same = _equal) -> list[Sample]:
    return keep_correct(samples)[:1]


def majority_answer(samples: list[Sample], same: Same = _equal) -> str | None:
    """The most common extracted answer of the successful samples (the first seen among ties)."""
    votes: list[list[str]] = []  # one group of equal answers each, in order of first appearance
    for s in samples:
        if not s.ok or s.extracted is None:
            continue
        group = next((g for g in votes if same(s.extracted, g[0])), None)
        if group is None:
            votes.append([s.extracted])
        else:
            group.append(s.extracted)
    return max(votes, key=len)[0] if votes else None  # max keeps the first of equal lengths


def keep_majority(samples: list[Sample], same: Same = _equal) -> list[Sample]:
    winner = majority_answer(samples, same)
    return [s for s in samples if s.ok and s.extracted is not None and winner is not None
            and same(s.extracted, winner)]


POLICIES: dict[str, Callable[[list[Sample], Same], list[Sample]]] = {
    "keep_all": keep_all,
    "keep_correct": keep_correct,
    "keep_first_correct": keep_first_correct,
    "keep_majority": keep_majority,
}


def select(samples: list[Sample], policy: str, max_per_question: int | None = None,
           same: Same = _equal) -> list[Sample]:
    """The samples of one question that ``policy`` keeps, at most ``max_per_question`` of them."""
    kept = POLICIES[policy](samples, same)
    return kept if max_per_question is None else kept[:max_per_question]


def questions_kept(by_question: list[list[Sample]], same: Same = _equal) -> dict[str, int]:
    """For each policy, how many questions it keeps at least one sample of."""
    return {name: sum(bool(policy(samples, same)) for samples in by_question) for name, policy in POLICIES.items()}
