"""Statistical power of the comparisons the report will run, before any trial.

The report (`raydistill.report`) tests each pair of cells with the exact two-sided sign test on
the per-question differences (the exact McNemar test for one seed), Holm-adjusted within each
family. Here every comparison it would run is enumerated with the report's own function
(`raydistill.report.cells.paired_tests`: neighbouring levels, all level pairs, sources without
levels, teachers at a level, formats at a level; and one test per cell against the constant
answer) on the plan's trials, and for each one the smallest detectable difference is computed:

- exact power of that test at the comparison's question count n: the number of discordant
  questions D ~ Binomial(n, psi), the questions the second cell wins among them ~ Binomial(D,
  (psi + delta) / (2 psi)), rejected when the exact two-sided sign test gives p <= alpha; the
  smallest delta with power >= 80 % (bisection). psi, the share of questions on which the two cells
  disagree, is an assumption (default 0.20; `--discordance`): the SVAMP study measured 0.09-0.19
  between SmolLM2-135M cells (docs/results/svamp-study/paired_tests.csv), students nearer 50 %
  accuracy disagree more. A larger psi needs a larger delta;
- at alpha = 0.05 and at Holm's strictest step alpha / m (m: the comparisons of the family): a
  difference of that size is detected whatever the family's other p-values are;
- seeds: the report averages each question's score over the seeds before the sign test; the plan
  does not credit seeds with any power (one seed's count, a conservative figure);
- the floor: with n questions no difference below k/n can reach p <= alpha (k the fewest
  discordant questions all one way that can, `raydistill.stats.min_detectable_difference`).

The paper's published differences (raydistill/data/paper/published_results.csv, from
shared/paper/method.md section 4) are each set against the comparison of the grid that would test
them (or the question count of their dataset when the grid has no such comparison).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np

ALPHA = 0.05
POWER = 0.80
DEFAULT_DISCORDANCE = 0.20


def _binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    from scipy.special import gammaln

    with np.errstate(divide="ignore"):
        logp = (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
                + k * np.log(p if p > 0 else 1e-300) + (n - k) * np.log1p(-p if p < 1 else -1 + 1e-300))
    return np.exp(logp)


def _reject_probability(d: np.ndarray, q: float, alpha: float) -> np.ndarray:
    """P(exact two-sided sign test on d discordant questions rejects | each one goes the second
    cell's way with probability q), for every d."""
    from scipy.special import bdtr

    crit = np.array([_critical(int(dd), alpha) for dd in d])
    ok = crit >= 0
    out = np.zeros(len(d))
    dd, cc = d[ok].astype(np.int64), crit[ok].astype(np.int64)
    # reject when wins <= c or wins >= d - c
    out[ok] = bdtr(cc, dd, q) + (1 - bdtr(dd - cc - 1, dd, q))
    return out


@lru_cache(maxsize=None)
def _critical(d: int, alpha: float) -> int:
    """Largest c with the two-sided exact sign-test p-value of c wins out of d <= alpha (-1: none)."""
    from scipy.special import bdtr

    if d == 0:
        return -1
    c = -1
    lo, hi = 0, d // 2
    while lo <= hi:  # 2 * P(X <= c) grows with c
        mid = (lo + hi) // 2
        if min(1.0, 2 * bdtr(mid, d, 0.5)) <= alpha:
            c, lo = mid, mid + 1
        else:
            hi = mid - 1
    return c


def sign_test_power(n: int, delta: float, psi: float, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided sign test on n paired questions with discordance psi and
    difference delta (= P(second only) - P(first only))."""
    if delta <= 0 or psi <= 0:
        return 0.0
    d = np.arange(n + 1)
    weights = _binom_pmf(d, n, psi)
    keep = weights > 1e-12
    q = min(1.0, (psi + delta) / (2 * psi))
    return float((weights[keep] * _reject_probability(d[keep], q, alpha)).sum())


@lru_cache(maxsize=4096)
def detectable_difference(n: int, psi: float = DEFAULT_DISCORDANCE, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """Smallest delta (<= psi) with exact power >= ``power``; math.inf when even delta = psi falls
    short (every discordant question the same way is then too few)."""
    if n < 1 or sign_test_power(n, psi, psi, alpha) < power:
        return math.inf
    lo, hi = 0.0, psi
    for _ in range(30):
        mid = (lo + hi) / 2
        if sign_test_power(n, mid, psi, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def report_comparisons(trials, test_questions: dict[str, int]) -> list[dict]:
    """Every paired comparison the report would run on these trials, with its family, size and
    question count: the report's own pairing functions on placeholder scores."""
    from raydistill.report.cells import Cell, paired_tests
    from raydistill.report.records import Trial

    groups: dict[tuple, list] = defaultdict(list)
    for t in trials:
        n = test_questions.get(t.cell.dataset, 0)
        if not n:
            continue
        fake = Trial(axes=t.axes(), metrics={"accuracy": 0.0}, trial_hash=t.trial_hash, num_workers=None,
                     num_actors=None, cell=None, scores={str(i): float(i % 2) for i in range(n)})
        groups[fake.key].append(fake)
    cells = [Cell(key, members) for key, members in sorted(groups.items())]
    out = []
    for c in paired_tests(cells):
        out.append({"family": c.family, "row": list(c.row), "a": list(c.a.key), "b": list(c.b.key),
                    "label": c.label, "n": c.test.n_questions, "seeds": len(c.a.seeds)})
    for cell in cells:  # each cell against its dataset's constant answer (baseline family)
        out.append({"family": "baseline", "row": list(cell.key[:4]), "a": None, "b": list(cell.key),
                    "label": "constant answer → " + "/".join(cell.key), "n": len(cell.trials[0].scores),
                    "seeds": len(cell.seeds)})
    return out


def power_section(trials, test_questions: dict[str, int], psi: float = DEFAULT_DISCORDANCE,
                  alpha: float = ALPHA) -> dict:
    from raydistill import stats

    comparisons = report_comparisons(trials, test_questions)
    family_size = defaultdict(int)
    for c in comparisons:
        family_size[c["family"]] += 1
    for c in comparisons:
        m = family_size[c["family"]]
        c["family_size"] = m
        c["floor"] = stats.min_detectable_difference(c["n"], alpha) if c["n"] else math.inf
        c["mdd"] = detectable_difference(c["n"], psi, alpha)
        c["mdd_holm"] = detectable_difference(c["n"], psi, alpha / m)
    families = {}
    for fam, m in family_size.items():
        members = [c for c in comparisons if c["family"] == fam]
        ns = sorted({c["n"] for c in members})
        families[fam] = {"comparisons": m, "questions": ns,
                         "mdd": {n: detectable_difference(n, psi, alpha) for n in ns},
                         "mdd_holm": {n: detectable_difference(n, psi, alpha / m) for n in ns}}
    return {"method": f"exact two-sided sign test (exact McNemar), power {POWER:.0%}, alpha {alpha}, "
                      f"assumed discordance {psi:.2f}; Holm's strictest step alpha/m per family; "
                      "seeds not credited",
            "discordance": psi, "alpha": alpha, "power": POWER, "families": families,
            "comparisons": comparisons, "published": published_differences(comparisons, test_questions,
                                                                            psi, alpha)}


def published_differences(comparisons: list[dict], test_questions: dict[str, int], psi: float,
                          alpha: float) -> list[dict]:
    """The paper's published differences against what this grid can detect."""
    from raydistill.report.published import load_published

    rows = load_published()
    by_cell = {(r["dataset"], r["teacher"], r["student"], r["level"]): r for r in rows if r["kind"] == "level"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in by_cell.values():
        groups[(r["dataset"], r["teacher"], r["student"])].append(r)
    index = {}
    for c in comparisons:
        if c["a"] is None:
            continue
        d, t, f, s, la = c["a"]
        lb = c["b"][4]
        if c["b"][1] == t:
            index.setdefault((d, t, s, la, lb), c)
    out = []
    for (dataset, teacher, student), members in sorted(groups.items()):
        members.sort(key=lambda r: int(r["level"]))
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                out.append(_published_row(f"{dataset} {teacher} {student}: L{a['level']} → L{b['level']}",
                                          b["accuracy_pct"] - a["accuracy_pct"],
                                          index.get((dataset, teacher, student, a["level"], b["level"])),
                                          test_questions.get(dataset), psi, alpha))
    ablation = {r["variant"]: r for r in rows if r["kind"] == "ablation"}
    for a, b in (("level1", "level1+padding"), ("level1+padding", "level5"), ("level1", "level5")):
        if a in ablation and b in ablation:
            dataset = ablation[a]["dataset"]
            match = next((c for c in comparisons if c["a"] and c["a"][0] == dataset
                          and c["a"][4] == _ablation_level(a) and c["b"][4] == _ablation_level(b)), None)
            out.append(_published_row(f"{dataset} ablation: {a} → {b}",
                                      ablation[b]["accuracy_pct"] - ablation[a]["accuracy_pct"], match,
                                      test_questions.get(dataset), psi, alpha))
    return out


def _ablation_level(variant: str) -> str:
    return {"level1": "1", "level5": "5", "level1+padding": "1+pad5"}[variant]


def _published_row(label: str, diff_pct: float, comparison: dict | None, n_dataset: int | None, psi: float,
                   alpha: float) -> dict:
    if comparison is not None:
        n, mdd, mdd_holm, where = comparison["n"], comparison["mdd"], comparison["mdd_holm"], comparison["family"]
    elif n_dataset:  # the dataset is in the grid, this comparison is not: at the dataset's question count
        n, mdd, mdd_holm, where = n_dataset, detectable_difference(n_dataset, psi, alpha), None, "not compared in this grid"
    else:
        return {"difference": label, "published_pp": round(diff_pct, 2), "n": None, "in_grid": False,
                "family": "dataset not in this grid", "mdd": None, "mdd_holm": None, "detectable": None,
                "detectable_holm": None}
    size = abs(diff_pct) / 100
    return {"difference": label, "published_pp": round(diff_pct, 2), "n": n, "in_grid": comparison is not None,
            "family": where, "mdd": mdd, "mdd_holm": mdd_holm, "detectable": size >= mdd,
            "detectable_holm": (size >= mdd_holm) if mdd_holm is not None else None}
