"""Intervals and paired tests of the report: a cell's accuracy with its 95 % interval (Wilson
or percentile bootstrap) and the exact paired sign test between two cells.

Statistics (docs/report.md): a cell's accuracy is the mean over seeds of each trial's accuracy.
With one seed and one sample per question its 95 % interval is the Wilson score interval (never
degenerate at 0 or n correct); with one seed and several samples it is a percentile bootstrap over
test questions; with several seeds a two-stage percentile bootstrap, seeds then questions (each
replicate draws seeds with replacement, then questions, and averages the drawn seeds' accuracies
on the drawn questions), so the interval covers training variance as well as the question sample.
Where a bootstrap has zero width the Wilson interval over the questions replaces it. Paired comparisons use an exact two-sided sign test on the per-question differences
(the exact McNemar test for one seed), p-values Holm-adjusted over the table, next to the smallest
difference the question count can show at all and the difference's 95 % interval (Newcombe's
hybrid score interval for paired proportions). Random numbers come from a fixed
seed mixed with the cell's name, so a report is reproducible and a cell's CI does not change when
other cells are added.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from raydistill import stats

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval and how the interval was computed."""

    estimate: float
    low: float
    high: float
    # "wilson" | "bootstrap" (questions) | "bootstrap-seeds" (seeds, then questions) | either + "+wilson"
    # (Wilson where the bootstrap had zero width)
    method: str = "bootstrap"


@dataclass
class PairedTest:
    """Exact paired comparison of two sets of per-question scores (b minus a)."""

    diff: float
    n_b_better: int  # questions where b scores higher
    n_a_better: int
    p_value: float  # exact two-sided sign test (McNemar for 0/1 scores)
    n_questions: int
    min_detectable: float  # the smallest |diff| that could reach p <= alpha with this many questions
    p_holm: float | None = None  # Holm-adjusted over the report's comparisons
    ci_low: float | None = None  # 95 % interval of diff: Newcombe's paired hybrid score interval (method 10)
    ci_high: float | None = None


def cell_rng(seed: int, *key: str) -> np.random.Generator:
    """A generator fixed by the report seed and a cell's name (stable across Python runs)."""
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(key).encode())])


def bootstrap_weights(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items) counts: how often each item is drawn in each resample with replacement."""
    draws = rng.integers(0, n_items, size=(n_boot, n_items))
    flat = (draws + n_items * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_items).reshape(n_boot, n_items)


def bootstrap_accuracy(scores: np.ndarray, n_boot: int = DEFAULT_N_BOOT, rng: np.random.Generator | None = None,
                       alpha: float = ALPHA, resample_seeds: bool = False) -> Interval:
    """Mean over seeds of per-seed accuracy, with a percentile bootstrap CI resampling questions,
    and with ``resample_seeds`` the seeds first (two stages: a replicate's seeds are drawn with
    replacement, then its questions; its value is the drawn seeds' mean accuracy on the drawn
    questions, a seed drawn twice counted twice).

    ``scores`` is (n_seeds, n_questions) or (n_questions,); NaN marks a question a seed lacks.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    present = ~np.isnan(scores)
    if not present.any():
        raise ValueError("no scores to bootstrap")
    values = np.where(present, scores, 0.0)
    estimate = float(np.mean(values.sum(1) / present.sum(1)))
    weights = bootstrap_weights(scores.shape[1], n_boot, rng or np.random.default_rng(DEFAULT_SEED))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = (weights @ values.T) / (weights @ present.T)  # (n_boot, n_seeds)
    if resample_seeds and scores.shape[0] > 1:
        seed_counts = bootstrap_weights(scores.shape[0], n_boot, rng or np.random.default_rng(DEFAULT_SEED))
        seed_counts = np.where(np.isnan(per_seed), 0, seed_counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates = np.nansum(per_seed * seed_counts, axis=1) / seed_counts.sum(1)
        method = "bootstrap-seeds"
    else:
        replicates = np.nanmean(per_seed, axis=1) if np.isnan(per_seed).any() else per_seed.mean(1)
        method = "bootstrap"
    low, high = np.nanpercentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(estimate, float(low), float(high), method)


def wilson_accuracy(scores: np.ndarray, alpha: float = ALPHA) -> Interval:
    """Accuracy of 0/1 question scores with its Wilson score interval."""
    scores = np.asarray(scores, dtype=float)
    correct, n = int(round(scores.sum())), int(scores.size)
    low, high = stats.wilson_interval(correct, n, alpha)
    return Interval(correct / n, low, high, "wilson")


def accuracy_interval(scores: np.ndarray, n_boot: int = DEFAULT_N_BOOT, rng: np.random.Generator | None = None,
                      alpha: float = ALPHA) -> Interval:
    """A cell's accuracy and 95 % interval from its (n_seeds, n_questions) score matrix.

    One seed whose scores are all 0 or 1: the Wilson interval. One seed with several samples per
    question: the percentile bootstrap over questions; several seeds: the two-stage bootstrap over
    seeds, then questions (`bootstrap_accuracy`). Where it has zero width (every question scored
    alike), the Wilson interval over the questions at the same accuracy, so an interval never
    claims certainty.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    present = scores[~np.isnan(scores)]
    if scores.shape[0] == 1 and np.isin(present, (0.0, 1.0)).all():
        return wilson_accuracy(present, alpha)
    boot = bootstrap_accuracy(scores, n_boot, rng, alpha, resample_seeds=scores.shape[0] > 1)
    if boot.high > boot.low:
        return boot
    n = int((~np.isnan(scores)).any(axis=0).sum())
    low, high = stats.wilson_interval(int(round(boot.estimate * n)), n, alpha)
    return Interval(boot.estimate, low, high, boot.method + "+wilson")


def paired_test(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> PairedTest:
    """Accuracy difference b - a over the same questions with an exact two-sided sign test on the
    per-question differences: the exact McNemar test on the discordant questions for 0/1 scores
    (5 discordant questions all one way: p = 0.0625). Seeds averaged per question keep their sign.
    The difference's 1 - alpha interval is Newcombe's hybrid score interval for paired proportions
    (`raydistill.stats.newcombe_paired_interval`) on the 2x2 table of the two cells' question scores
    (b first): for 0/1 scores the counts of questions both got right, only b, only a, neither; for
    scores averaged over seeds or samples the same sums of products (n11 = sum of b_i a_i, ...)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired scores need two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    test = stats.sign_test(b - a)
    low, high = stats.newcombe_paired_interval(float((b * a).sum()), float((b * (1 - a)).sum()),
                                               float(((1 - b) * a).sum()), float(((1 - b) * (1 - a)).sum()), alpha)
    return PairedTest(float((b - a).mean()), test.n_pos, test.n_neg, test.p_value, int(a.size),
                      stats.min_detectable_difference(int(a.size), alpha), ci_low=low, ci_high=high)
