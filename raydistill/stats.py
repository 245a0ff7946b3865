"""Small-sample statistics for accuracy reports (pure Python + numpy, no scipy).

What each function is for in a report:

    wilson_interval, clopper_pearson_interval
        a confidence interval for one seed's accuracy (correct out of n test questions);
        Clopper-Pearson is exact (conservative), Wilson is the usual score interval.
    sign_test
        an exact paired test between two cells on the same questions (score of b minus a);
        for 0/1 scores of one seed it is the exact McNemar test.
    holm_adjust
        Holm-Bonferroni adjusted p-values over a table's family of comparisons.
    newcombe_paired_interval
        a confidence interval for the difference of two paired proportions (Newcombe's
        method 10): the interval of an accuracy difference between two cells on the same questions.
    min_discordant_for_significance, min_detectable_difference
        the smallest paired accuracy difference a test set of n questions can show at all.
    pass_at_k
        the unbiased pass@k of one question from n samples, c of them correct.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import numpy as np


def _check_counts(correct: int, n: int, alpha: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def wilson_interval(correct: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided Wilson score interval for correct/n; never degenerate at 0 or n correct."""
    _check_counts(correct, n, alpha)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def _binom_sum(n: int, p: float, ks: range) -> float:
    """Sum of Binomial(n, p) probabilities over ks, each term computed in log space (0 < p < 1)."""
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return math.fsum(
        math.exp(log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        for k in ks)


def _bisect_decreasing(f: Callable[[float], float], target: float, tol: float = 1e-13) -> float:
    """The p in (0, 1) where the decreasing function f crosses target, by bisection."""
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson_interval(correct: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for correct/n: the binomial CDF inverted by bisection.

    low solves P(X >= correct; p) = alpha/2 and high solves P(X <= correct; p) = alpha/2, which
    equal the beta quantiles Beta(alpha/2; x, n-x+1) and Beta(1-alpha/2; x+1, n-x). Precise to 1e-10.
    """
    _check_counts(correct, n, alpha)
    # P(X <= correct - 1; p) falls to 1 - alpha/2 at low; P(X <= correct; p) falls to alpha/2 at high
    low = 0.0 if correct == 0 else _bisect_decreasing(
        lambda p: _binom_sum(n, p, range(correct)), 1 - alpha / 2)
    high = 1.0 if correct == n else _bisect_decreasing(
        lambda p: _binom_sum(n, p, range(correct + 1)), alpha / 2)
    return low, high


@dataclass(frozen=True)
class SignTest:
    """Result of sign_test: counts of positive / negative differences and the two-sided p-value."""

    n_pos: int
    n_neg: int
    n_discordant: int
    p_value: float


def sign_test(differences: Sequence[float] | np.ndarray) -> SignTest:
    """Exact two-sided sign test on per-question score differences (b - a), zeros dropped.

    p = min(1, 2 * P(X <= min(n_pos, n_neg))) for X ~ Binomial(n_pos + n_neg, 1/2), computed with
    integers; 1.0 when no question is discordant. Only signs matter, so fractional differences
    (means over seeds) are fine. For 0/1 scores of one seed this is the exact McNemar test.
    """
    diffs = np.asarray(differences, dtype=float)
    if diffs.ndim != 1:
        raise ValueError(f"differences must be 1-D, got shape {diffs.shape}")
    if np.isnan(diffs).any():
        raise ValueError("differences contain NaN")
    n_pos, n_neg = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = n_pos + n_neg
    tail = sum(math.comb(n, k) for k in range(min(n_pos, n_neg) + 1))
    p = min(Fraction(1), Fraction(2 * tail, 2**n))
    return SignTest(n_pos, n_neg, n, float(p))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order (monotone, capped at 1)."""
    m = len(p_values)
    if any(not 0 <= p <= 1 for p in p_values):  # also rejects NaN
        raise ValueError(f"p-values must be in [0, 1], got {list(p_values)}")
    adjusted = [0.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - j) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _wilson_real(successes: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score limits for successes/n (successes may be fractional), clipped to [0, 1]."""
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def newcombe_paired_interval(n11: float, n10: float, n01: float, n00: float,
                             alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided interval for the difference of paired proportions p1 - p2, where p1 = (n11 + n10)/n
    and p2 = (n11 + n01)/n, so p1 - p2 = (n10 - n01)/n: Newcombe's hybrid score interval for paired
    data, method 10 of R. G. Newcombe, "Improved confidence intervals for the difference between
    binomial proportions based on paired data", Statistics in Medicine 17:2635-2650 (1998); the
    "Newcombe square-and-add interval" of Fagerland, Lydersen & Laake, *Statistical Analysis of
    Contingency Tables* (2017), section 8.5.

    ``n11`` counts the pairs where both measurements succeed, ``n10`` first only, ``n01`` second
    only, ``n00`` neither. With Wilson score limits (l1, u1) for p1 and (l2, u2) for p2:

        L = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        U = (p1 - p2) + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

    where phi estimates the correlation of the two measurements, with Newcombe's correction:
    A = n11 n00 - n10 n01; phi = (A - n/2)/sqrt(margins) when A > n/2, 0 when 0 <= A <= n/2,
    A/sqrt(margins) when A < 0, and 0 when a margin is empty (margins = the product of the four
    marginal totals). The interval lies in [-1, 1], contains the estimate, and never has zero
    width unless n10 = n01 = 0 with all n pairs on one diagonal cell.

    Counts may be fractional (e.g. question scores averaged over seeds, n11 = sum of x_i y_i):
    the same formula then applies to that expected table; Newcombe defined it for 0/1 pairs.
    """
    counts = (n11, n10, n01, n00)
    if any(not c >= 0 for c in counts):  # also rejects NaN
        raise ValueError(f"counts must be >= 0, got {counts}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = math.fsum(counts)
    if n <= 0:
        raise ValueError("no pairs: the counts sum to 0")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    s1, s2 = n11 + n10, n11 + n01
    p1, p2 = s1 / n, s2 / n
    l1, u1 = _wilson_real(s1, n, z)
    l2, u2 = _wilson_real(s2, n, z)
    margins = s1 * (n - s1) * s2 * (n - s2)
    a = n11 * n00 - n10 * n01
    if margins <= 0 or 0 <= a <= n / 2:
        phi = 0.0
    else:
        phi = (a - n / 2 if a > n / 2 else a) / math.sqrt(margins)
    d1, e1, d2, e2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    estimate = (n10 - n01) / n
    low = estimate - math.sqrt(max(0.0, d1 * d1 - 2 * phi * d1 * e2 + e2 * e2))
    high = estimate + math.sqrt(max(0.0, d2 * d2 - 2 * phi * d2 * e1 + e1 * e1))
    return max(-1.0, low), min(1.0, high)


def min_discordant_for_significance(alpha: float = 0.05) -> int:
    """Smallest k such that k discordant questions all one way give sign-test p <= alpha."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    k = 1
    while 2 * 0.5**k > alpha:
        k += 1
    return k


def min_detectable_difference(n_questions: int, alpha: float = 0.05) -> float:
    """Smallest paired accuracy difference (a fraction) that can reach p <= alpha on n_questions.

    It is min_discordant_for_significance(alpha) / n_questions, or math.inf when the test set has
    fewer questions than that: then no difference at all can be significant.
    """
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    k = min_discordant_for_significance(alpha)
    return math.inf if n_questions < k else k / n_questions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question (Chen et al., 2021, "Evaluating Large Language Models
    Trained on Code"): the chance that at least one of k samples drawn without replacement from
    the n generated, c of them correct, is correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
