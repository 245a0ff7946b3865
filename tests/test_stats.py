"""raydistill.stats against hand-computed values (and scipy, where it is installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raydistill.stats import (
    SignTest,
    clopper_pearson_interval,
    holm_adjust,
    min_detectable_difference,
    min_discordant_for_significance,
    newcombe_paired_interval,
    pass_at_k,
    sign_test,
    wilson_interval,
)

Z975 = 1.959963984540054  # normal quantile at 0.975


# --- Wilson -----------------------------------------------------------------------------------

def test_wilson_matches_closed_formula_for_8_of_40():
    p, n, z2 = 0.2, 40, Z975**2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n**2))
    assert wilson_interval(8, 40) == pytest.approx((center - half, center + half), abs=1e-12)


def test_wilson_known_value_at_zero_of_ten():
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert round(high, 4) == 0.2775


def test_wilson_not_degenerate_at_extremes():
    low, high = wilson_interval(0, 40)
    assert low == 0.0 and 0 < high < 1
    low, high = wilson_interval(40, 40)
    assert high == 1.0 and 0 < low < 1
    assert wilson_interval(0, 40)[1] == pytest.approx(1 - wilson_interval(40, 40)[0], abs=1e-12)


def test_wilson_narrows_with_alpha():
    low95, high95 = wilson_interval(20, 40)
    low99, high99 = wilson_interval(20, 40, alpha=0.01)
    assert low99 < low95 < 0.5 < high95 < high99


# --- Clopper-Pearson --------------------------------------------------------------------------

def test_clopper_pearson_closed_forms_at_extremes():
    assert clopper_pearson_interval(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-10))
    assert clopper_pearson_interval(10, 10) == (pytest.approx(0.025 ** (1 / 10), abs=1e-10), 1.0)
    assert round(clopper_pearson_interval(0, 10)[1], 5) == 0.30850  # 0.308497...
    assert round(clopper_pearson_interval(10, 10)[0], 5) == 0.69150


def test_clopper_pearson_closed_form_at_one_correct():
    # x = 1: P(X >= 1; p) = 1 - (1 - p)^n = alpha/2  =>  low = 1 - (1 - alpha/2)^(1/n)
    low, _ = clopper_pearson_interval(1, 20)
    assert low == pytest.approx(1 - 0.975 ** (1 / 20), abs=1e-10)


def test_clopper_pearson_known_value_five_of_ten():
    low, high = clopper_pearson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)
    assert low == pytest.approx(1 - high, abs=1e-10)


@pytest.mark.parametrize(("x", "n"), [(3, 17), (12, 40), (33, 40), (150, 300)])
def test_clopper_pearson_bounds_hit_alpha_half(x, n):
    """At the bounds the binomial tails equal alpha/2 (tails summed here independently)."""
    low, high = clopper_pearson_interval(x, n)

    def pmf(k, p):
        return math.comb(n, k) * p**k * (1 - p) ** (n - k)

    assert math.fsum(pmf(k, low) for k in range(x, n + 1)) == pytest.approx(0.025, abs=1e-9)
    assert math.fsum(pmf(k, high) for k in range(x + 1)) == pytest.approx(0.025, abs=1e-9)


def test_clopper_pearson_contains_wilson_for_mid_proportion():
    cp_low, cp_high = clopper_pearson_interval(20, 40)
    w_low, w_high = wilson_interval(20, 40)
    assert cp_low < w_low < 0.5 < w_high < cp_high


@pytest.mark.parametrize("interval", [wilson_interval, clopper_pearson_interval])
@pytest.mark.parametrize(("x", "n"), [(0, 0), (-1, 10), (11, 10), (5, -3)])
def test_intervals_reject_bad_counts(interval, x, n):
    with pytest.raises(ValueError):
        interval(x, n)


def test_against_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 2, 7, 10, 40, 100, 300):
        for x in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            low, high = clopper_pearson_interval(x, n)
            ref_low = 0.0 if x == 0 else stats.beta.ppf(0.025, x, n - x + 1)
            ref_high = 1.0 if x == n else stats.beta.ppf(0.975, x + 1, n - x)
            assert (low, high) == (pytest.approx(ref_low, abs=1e-10), pytest.approx(ref_high, abs=1e-10))
            ci = stats.binomtest(x, n).proportion_ci(method="wilson")
            assert wilson_interval(x, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
            # x gains vs n - x losses: the sign test is the binomial test at p = 1/2
            diffs = [1.0] * x + [-1.0] * (n - x)
            assert sign_test(diffs).p_value == pytest.approx(stats.binomtest(x, n).pvalue, rel=1e-12)


# --- sign test --------------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "p"), [(4, 0.125), (5, 0.0625), (6, 0.03125)])
def test_sign_test_all_one_way(k, p):
    assert sign_test([1] * k).p_value == p
    assert sign_test([-1] * k + [0] * 30).p_value == p


def test_sign_test_split_8_2():
    result = sign_test([1] * 8 + [-1] * 2 + [0] * 5)
    assert result == SignTest(n_pos=8, n_neg=2, n_discordant=10, p_value=0.109375)
    assert result.p_value == 2 * (1 + 10 + 45) / 1024


def test_sign_test_no_discordant_and_capped():
    assert sign_test(np.zeros(40)) == SignTest(0, 0, 0, 1.0)
    assert sign_test([]) == SignTest(0, 0, 0, 1.0)
    assert sign_test([1, 1, 1, -1, -1, -1]).p_value == 1.0


def test_sign_test_is_mcnemar_on_one_seed():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    b = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 0])  # 1 question lost, 4 gained
    result = sign_test(b - a)
    assert (result.n_pos, result.n_neg, result.n_discordant) == (4, 1, 5)
    assert result.p_value == 2 * (1 + 5) / 32


def test_sign_test_fractional_differences_only_signs_matter():
    # means over 3 seeds: only the signs count
    diffs = np.array([1 / 3, 2 / 3, 1.0, 1 / 3, 0.01, 0.0, -0.0])
    assert sign_test(diffs) == SignTest(5, 0, 5, 0.0625)
    assert sign_test(-diffs) == SignTest(0, 5, 5, 0.0625)


def test_sign_test_rejects_nan_and_2d():
    with pytest.raises(ValueError):
        sign_test([1.0, float("nan"), -1.0])
    with pytest.raises(ValueError):
        sign_test(np.ones((2, 3)))


def test_sign_test_result_is_frozen():
    result = sign_test([1, 1])
    with pytest.raises(AttributeError):
        result.p_value = 0.0


# --- Holm -------------------------------------------------------------------------------------

def test_holm_hand_cases():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.0625, 0.125]) == pytest.approx([0.125, 0.125])
    assert holm_adjust([]) == []
    assert holm_adjust([0.3]) == [0.3]


def test_holm_order_preserved_monotone_and_capped():
    p = [0.5, 0.001, 0.2, 0.04, 0.9]
    adjusted = holm_adjust(p)
    assert adjusted == pytest.approx([1.0, 0.005, 0.6, 0.16, 1.0])
    order = sorted(range(len(p)), key=p.__getitem__)
    assert [adjusted[i] for i in order] == sorted(adjusted)  # monotone in the raw p-values
    assert all(a >= raw for a, raw in zip(adjusted, p)) and max(adjusted) == 1.0


def test_holm_rejects_out_of_range():
    with pytest.raises(ValueError):
        holm_adjust([0.1, 1.5])
    with pytest.raises(ValueError):
        holm_adjust([float("nan")])


# --- smallest detectable difference -----------------------------------------------------------

def test_min_discordant_for_significance():
    assert min_discordant_for_significance() == 6
    assert min_discordant_for_significance(0.05) == 6
    assert min_discordant_for_significance(0.01) == 8
    assert min_discordant_for_significance(0.0625) == 5  # the boundary counts (p <= alpha)
    for alpha in (0.05, 0.01, 0.001):
        k = min_discordant_for_significance(alpha)
        assert sign_test([1] * k).p_value <= alpha < sign_test([1] * (k - 1)).p_value


def test_min_detectable_difference():
    assert min_detectable_difference(40) == pytest.approx(0.15)
    assert min_detectable_difference(300) == pytest.approx(0.02)
    assert min_detectable_difference(6) == 1.0
    assert min_detectable_difference(5) == math.inf
    assert min_detectable_difference(40, alpha=0.01) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        min_detectable_difference(0)


@pytest.mark.parametrize("n,c", [(5, 0), (5, 2), (5, 5), (8, 3), (10, 1)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n, c):
    from itertools import combinations

    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the accuracy over samples


def test_pass_at_k_by_hand_and_bad_counts():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


# --- Newcombe's interval for a paired difference ----------------------------------------------

def _wilson_by_root_finding(x: float, n: float, z: float = Z975) -> tuple[float, float]:
    """Wilson's limits found numerically: the two pi solving (x/n - pi)^2 = z^2 pi (1 - pi) / n."""
    p = x / n

    def score(pi):  # > 0 outside the interval, < 0 inside
        return (p - pi) ** 2 - z * z * pi * (1 - pi) / n

    def root(lo, hi):  # score changes sign once between lo and hi
        for _ in range(200):
            mid = (lo + hi) / 2
            if (score(mid) > 0) == (score(lo) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if x == 0 else root(0.0, p)
    high = 1.0 if x == n else root(p, 1.0)
    return low, high


def _newcombe_reference(n11, n10, n01, n00):
    """Method 10 written out from Newcombe (1998) a second way: Wilson limits by root finding, the
    correlation's numerator from the expanded 0/1 pairs (n * sum(xy) - sum(x) * sum(y) = n11 n00 - n10 n01)."""
    x = np.repeat([1, 1, 0, 0], [n11, n10, n01, n00])  # first measurement
    y = np.repeat([1, 0, 1, 0], [n11, n10, n01, n00])  # second
    n = x.size
    p1, p2 = x.mean(), y.mean()
    l1, u1 = _wilson_by_root_finding(x.sum(), n)
    l2, u2 = _wilson_by_root_finding(y.sum(), n)
    numerator = n * float((x * y).sum()) - float(x.sum()) * float(y.sum())
    denominator = math.sqrt(x.sum() * (n - x.sum()) * y.sum() * (n - y.sum()))
    if denominator == 0 or 0 <= numerator <= n / 2:
        phi = 0.0
    else:
        phi = (numerator - n / 2 if numerator > 0 else numerator) / denominator
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    return low, high


def test_newcombe_paired_published_example_cavo():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), chapter 8:
    complete response before / after consolidation therapy (Cavo et al., 2012), table 59, 6 / 16, 80.
    The book's Newcombe square-and-add interval: estimate -0.0621, 95 % CI -0.1186 to -0.0046."""
    low, high = newcombe_paired_interval(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert (6 - 16) / 161 == pytest.approx(-0.0621, abs=5e-5)
    assert (low, high) == pytest.approx(_newcombe_reference(59, 6, 16, 80), abs=1e-9)


@pytest.mark.parametrize("table", [(59, 6, 16, 80), (1, 1, 7, 12), (14, 5, 0, 22), (36, 12, 2, 0), (0, 0, 0, 40),
                                   (40, 0, 0, 0), (20, 0, 0, 20), (0, 3, 0, 0), (0, 0, 5, 0), (10, 10, 10, 10),
                                   (3, 17, 1, 279), (250, 4, 30, 16), (0, 15, 15, 0), (5, 0, 9, 286)])
def test_newcombe_paired_equals_an_independent_implementation(table):
    low, high = newcombe_paired_interval(*table)
    ref_low, ref_high = _newcombe_reference(*table)
    assert (low, high) == (pytest.approx(max(-1.0, ref_low), abs=1e-9), pytest.approx(min(1.0, ref_high), abs=1e-9))
    estimate = (table[1] - table[2]) / sum(table)
    assert -1.0 <= low <= estimate <= high <= 1.0
    assert high > low  # never degenerate, even with no discordant pair
    # swapping the two measurements mirrors the interval
    assert newcombe_paired_interval(table[0], table[2], table[1], table[3]) == (
        pytest.approx(-high, abs=1e-12), pytest.approx(-low, abs=1e-12))


@pytest.mark.parametrize("probs", [(0.4, 0.1, 0.1, 0.4), (0.3, 0.2, 0.05, 0.45), (0.1, 0.05, 0.15, 0.7),
                                   (0.25, 0.25, 0.25, 0.25)])
def test_newcombe_paired_exact_coverage_near_95_percent(probs):
    """Exact coverage by enumerating every table of n = 20 pairs under a multinomial: Newcombe reports
    method 10 close to nominal; the Wald interval (p1 - p2 ± z·se) falls short on the same tables."""
    n, true = 20, probs[1] - probs[2]
    covered = wald = total = 0.0
    for n11 in range(n + 1):
        for n10 in range(n + 1 - n11):
            for n01 in range(n + 1 - n11 - n10):
                n00 = n - n11 - n10 - n01
                pr = (math.factorial(n) / math.prod(math.factorial(k) for k in (n11, n10, n01, n00))
                      * math.prod(p**k for p, k in zip(probs, (n11, n10, n01, n00))))
                low, high = newcombe_paired_interval(n11, n10, n01, n00)
                covered += pr * (low <= true <= high)
                d = (n10 - n01) / n
                se = math.sqrt(max((n10 + n01) / n - d * d, 0.0) / n)
                wald += pr * (d - Z975 * se <= true <= d + Z975 * se)
                total += pr
    assert total == pytest.approx(1.0)
    assert 0.94 <= covered <= 0.985
    assert wald < covered


def test_newcombe_paired_fractional_counts_and_bad_input():
    # question scores averaged over seeds: the table of summed products is fractional
    low, high = newcombe_paired_interval(10.5, 4.25, 2.75, 22.5)
    assert low < (4.25 - 2.75) / 40 < high
    assert newcombe_paired_interval(10, 4, 3, 23) != (low, high)
    for bad in [(-1, 0, 0, 5), (0, 0, 0, 0), (1, float("nan"), 0, 3)]:
        with pytest.raises(ValueError):
            newcombe_paired_interval(*bad)
    with pytest.raises(ValueError):
        newcombe_paired_interval(5, 1, 1, 5, alpha=0)
    assert newcombe_paired_interval(10, 4, 3, 23, alpha=0.01)[0] < newcombe_paired_interval(10, 4, 3, 23)[0]
