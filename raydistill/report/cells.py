"""Trials -> cells: the seeds of one (dataset, teacher, format, student, level) grouped, with their
interval, weak-number flags, cost and published value; the exact paired tests, Holm-adjusted within
each family (neighbouring levels with the length ablation; sources without levels against the
levels); the order and labels of cells and levels."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from raydistill import stats
from raydistill.report.intervals import Interval, PairedTest, accuracy_interval, cell_rng, paired_test
from raydistill.report.published import published_key, published_lookup
from raydistill.report.records import Trial

TRUNCATION_FLAG = 0.05  # a cell with more truncated generations than this is marked
CEILING_FLAG = 0.95  # a cell whose targets grade below this against their own answers is listed


@dataclass
class Cost:
    """Teacher spend and student compute of one cell (compute summed over its seeds)."""

    source: str  # "generated", "replayed" or "unknown"
    usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    train_worker_seconds: float | None = None
    eval_actor_seconds: float | None = None


@dataclass
class Cell:
    """All seeds of one (dataset, teacher, format, student, level) with their statistics."""

    key: tuple[str, ...]
    trials: list[Trial]
    interval: Interval | None = None  # None: no predictions to bootstrap
    n_questions_ci: int = 0
    published: dict | None = None
    cost: Cost = field(default_factory=lambda: Cost("unknown"))
    samples_k: int | None = None  # samples per question, when every seed drew the same k > 1
    pass_interval: Interval | None = None  # pass@k over the questions, with its 95 % interval
    maj_interval: Interval | None = None  # maj@k likewise
    baseline_flag: str | None = None  # set by the test against the constant answer when not significantly above it

    @property
    def accuracy(self) -> float:
        return statistics.fmean(t.metrics["accuracy"] for t in self.trials)

    @property
    def seeds(self) -> list[str]:
        return sorted((t.axes["seed"] for t in self.trials), key=seed_key)

    @property
    def seed_accuracies(self) -> list[float]:
        """Each seed's accuracy, in seed order (the trials are kept sorted by seed)."""
        return [t.metrics["accuracy"] for t in self.trials]

    @property
    def seed_sd(self) -> float | None:
        """Standard deviation of the seeds' accuracies (n − 1 in the denominator); None for one seed."""
        values = self.seed_accuracies
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def level(self) -> str:
        return self.key[4]

    def mean(self, metric: str) -> float | None:
        """Mean of a record metric over the seeds; None when a seed's record lacks it."""
        values = [t.metrics.get(metric) for t in self.trials]
        return None if any(v is None for v in values) else statistics.fmean(values)

    @property
    def truncation_rate(self) -> float | None:
        return self.mean("truncation_rate")

    @property
    def empty_rate(self) -> float | None:
        """Share of generations with no text once special tokens are removed (None for records
        made before empty generations were told from truncated ones)."""
        return self.mean("empty_rate")

    @property
    def teacher_truncated_share(self) -> float | None:
        """Share of the teacher's replies cut at max_tokens (generated cells only)."""
        shares = [((t.cell or {}).get("annotation") or {}).get("truncated_share") for t in self.trials]
        known = [v for v in shares if v is not None]
        return max(known) if known else None

    @property
    def truncated(self) -> bool:
        return (self.truncation_rate or 0.0) > TRUNCATION_FLAG

    def flags(self) -> list[str]:
        """Why this cell's number is weak, in words; [] when nothing is."""
        out = []
        rate, ceiling, teacher = self.truncation_rate, self.mean("target_ceiling"), self.teacher_truncated_share
        if rate is None:
            out.append("truncation unknown")
        elif rate > TRUNCATION_FLAG:
            out.append(f"{100 * rate:.1f} % of generations cut at max_new_tokens")
        empty = self.empty_rate
        if empty is not None and empty > TRUNCATION_FLAG:
            out.append(f"{100 * empty:.1f} % of generations empty")
        think_cut = self.mean("think_unfinished_rate")
        if think_cut is not None and think_cut > TRUNCATION_FLAG:
            out.append(f"{100 * think_cut:.1f} % of generations ended inside their think block (no answer)")
        failures = self.mean("extraction_failure_rate")
        if failures is not None and failures > TRUNCATION_FLAG:
            out.append(f"no answer extracted from {100 * failures:.1f} %")
        if ceiling is not None and ceiling < CEILING_FLAG:
            out.append(f"target ceiling {100 * ceiling:.1f} %")
        if teacher is not None and teacher > TRUNCATION_FLAG:
            out.append(f"{100 * teacher:.1f} % of teacher replies cut at max_tokens")
        if self.baseline_flag:
            out.append(self.baseline_flag)
        return out


def seed_key(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def level_key(level: str) -> tuple:
    """Numbered levels in order, then the level-less column."""
    return (0, int(level), "") if level.isdigit() else (1, 0, level)


def level_label(level: str) -> str:
    return f"L{level}" if level else "no level"


def sorted_levels(cells: list[Cell]) -> list[str]:
    return sorted({c.level for c in cells}, key=level_key)


def by_row(cells: list[Cell]) -> dict[tuple, dict[str, Cell]]:
    rows: dict[tuple, dict[str, Cell]] = defaultdict(dict)
    for cell in cells:
        rows[cell.key[:4]][cell.level] = cell
    return dict(sorted(rows.items()))


def score_matrix(trials: list[Trial], scores=lambda t: t.scores) -> tuple[list[str], np.ndarray]:
    """(question ids, (n_seeds, n_questions) scores with NaN where a seed lacks a question);
    ``scores`` picks each trial's question_id -> score mapping (default: mean correctness)."""
    per_trial = [scores(t) for t in trials]
    ids = sorted(set().union(*per_trial))
    index = {q: i for i, q in enumerate(ids)}
    matrix = np.full((len(trials), len(ids)), np.nan)
    for row, values in enumerate(per_trial):
        matrix[row, [index[q] for q in values]] = list(values.values())
    return ids, matrix


def cell_cost(trials: list[Trial]) -> Cost:
    """Teacher cost from the annotation summary (each distinct annotation cell counted once)."""
    cells = {(t.cell or {}).get("hash", t.trial_hash): t.cell for t in trials}
    sources = {(c or {}).get("source") for c in cells.values()}
    annotations = [c.get("annotation") for c in cells.values() if c and c.get("source") == "generated"]
    if sources == {"replay"}:
        cost = Cost("replayed")
    elif sources == {"generated"} and annotations and all(annotations):
        cost = Cost("generated", usd=sum(float(a.get("cost_usd") or 0.0) for a in annotations),
                    tokens_in=sum(int(a.get("tokens_in") or 0) for a in annotations),
                    tokens_out=sum(int(a.get("tokens_out") or 0) for a in annotations))
    else:
        cost = Cost("unknown")
    cost.train_seconds = _sum_known(t.metrics.get("train_seconds") for t in trials)
    cost.eval_seconds = _sum_known(t.metrics.get("eval_seconds") for t in trials)
    cost.train_worker_seconds = _sum_known(_times(t.metrics.get("train_seconds"), t.num_workers) for t in trials)
    cost.eval_actor_seconds = _sum_known(_times(t.metrics.get("eval_seconds"), t.num_actors) for t in trials)
    return cost


def _times(seconds: float | None, count: int | None) -> float | None:
    return None if seconds is None else float(seconds) * (count or 1)


def _sum_known(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values)) if values else None


def accuracy_per_usd(cell: Cell) -> float | None:
    """Accuracy points (%) per teacher dollar, where the cell's teacher cost is known and > 0."""
    usd = cell.cost.usd
    return 100 * cell.accuracy / usd if usd else None


def build_cells(trials: list[Trial], published: list[dict], n_boot: int, seed: int) -> list[Cell]:
    """Group trials into cells; bootstrap each cell's CI, attach its cost and published value."""
    grouped: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in trials:
        grouped[trial.key].append(trial)
    lookup = published_lookup(published)
    cells = []
    for key in sorted(grouped, key=cell_sort_key):
        members = sorted(grouped[key], key=lambda t: seed_key(t.axes["seed"]))
        cell = Cell(key, members, published=lookup.get(published_key(key)), cost=cell_cost(members))
        with_scores = [t for t in members if t.scores]
        if with_scores:
            ids, matrix = score_matrix(with_scores)
            cell.interval = accuracy_interval(matrix, n_boot, cell_rng(seed, "cell", *key))
            cell.n_questions_ci = len(ids)
        _add_sample_intervals(cell, n_boot, seed)
        cells.append(cell)
    return cells


def _add_sample_intervals(cell: Cell, n_boot: int, seed: int) -> None:
    """pass@k and maj@k with intervals, when every seed of the cell drew the same k > 1 samples."""
    ks = {t.samples.k if t.samples else None for t in cell.trials}
    if len(ks) != 1 or None in ks:
        return
    cell.samples_k = ks.pop()
    for name, pick in (("pass", lambda t: t.samples.pass_at_k), ("maj", lambda t: t.samples.maj_at_k)):
        _, matrix = score_matrix(cell.trials, pick)
        setattr(cell, f"{name}_interval", accuracy_interval(matrix, n_boot, cell_rng(seed, name, *cell.key)))


def cell_sort_key(key: tuple) -> tuple:
    return (*key[:4], level_key(key[4]))


# =========================================================================== paired tests


LEVELS_FAMILY = "levels"  # neighbouring levels of a row, and each padded cell against its two levels
SOURCES_FAMILY = "sources"  # each source without levels (human, answer-only) against every level
ALL_LEVELS_FAMILY = "all_levels"  # every pair of numbered levels of a row
BASELINE_FAMILY = "baseline"  # every cell against its dataset's constant answer
TEACHERS_FAMILY = "teachers"  # every pair of teachers at one numbered level (dataset, format, student fixed)
FORMATS_FAMILY = "formats"  # every pair of formats at one level (dataset, teacher, student fixed)


@dataclass
class Comparison:
    """A paired test of cell ``b`` against cell ``a`` (Δ = b − a) in one Holm family."""

    row: tuple[str, ...]  # a's (dataset, teacher, format, student)
    a: Cell
    b: Cell
    test: PairedTest
    n_seeds_paired: int
    paired_on: str
    family: str = LEVELS_FAMILY

    @property
    def label(self) -> str:
        """'L1 → L2' within a row; 'chatgpt L3 → human' across teachers; 'cot L3 → bsm L3' across formats."""
        if self.a.key[2] != self.b.key[2]:
            return f"{self.a.key[2]} {level_label(self.a.level)} → {self.b.key[2]} {level_label(self.b.level)}"
        if self.a.key[1] == self.b.key[1]:
            return f"{level_label(self.a.level)} → {level_label(self.b.level)}"
        return f"{_source_label(self.a)} → {_source_label(self.b)}"


def _source_label(cell: Cell) -> str:
    return cell.key[1] + (f" {level_label(cell.level)}" if cell.level else "")


def paired_scores(a: Cell, b: Cell) -> tuple[np.ndarray, np.ndarray, int, str] | None:
    """Per-question scores of both cells on their shared questions, each averaged over seeds.

    With seeds in common, only those seeds are used, so each question pairs (question, seed)
    units; otherwise each side averages all its seeds. None when nothing can be paired.
    """
    ta = {t.axes["seed"]: t for t in a.trials if t.scores}
    tb = {t.axes["seed"]: t for t in b.trials if t.scores}
    common = sorted(set(ta) & set(tb), key=seed_key)
    if common:
        ta, tb, paired_on = {s: ta[s] for s in common}, {s: tb[s] for s in common}, "question_id+seed"
    else:
        paired_on = "question_id"
    chosen = [*ta.values(), *tb.values()]
    if not ta or not tb:
        return None
    questions = sorted(set.intersection(*(set(t.scores) for t in chosen)))
    if not questions:
        return None

    def mean_scores(side: dict[str, Trial]) -> np.ndarray:
        return np.mean([[t.scores[q] for q in questions] for t in side.values()], axis=0)

    return mean_scores(ta), mean_scores(tb), len(common), paired_on


PADDED_LEVEL = re.compile(r"^(\d+)\+pad(\d+)$")  # "1+pad5": level 1 padded to level 5's length


def neighbour_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests between consecutive numbered levels present in each table row, and of
    each padded cell ("1+pad5") against its own level and the level it was padded to (the length
    ablation); their p-values Holm-adjusted over all of them (one family: the report's paired table)."""
    rows: dict[tuple, dict[str, Cell]] = defaultdict(dict)
    for cell in cells:
        rows[cell.key[:4]][cell.level] = cell
    pairs = []
    for row in sorted(rows):
        ordered = sorted((c for c in rows[row].values() if c.level.isdigit()), key=lambda c: level_key(c.level))
        pairs += [(row, a, b) for a, b in zip(ordered, ordered[1:])]
        for level, padded in sorted(rows[row].items()):
            match = PADDED_LEVEL.match(level)
            pairs += [(row, rows[row][plain], padded) for plain in (match.groups() if match else ())
                      if plain in rows[row]]
    return _tested(pairs, LEVELS_FAMILY)


def all_level_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests between every pair of numbered levels of each table row (L1 → L3 as well as
    L1 → L2), Holm-adjusted over all of them: a family of its own, apart from the neighbouring levels'."""
    pairs = []
    for row, by in by_row(cells).items():
        ordered = sorted((c for c in by.values() if c.level.isdigit()), key=lambda c: level_key(c.level))
        pairs += [(row, a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
    return _tested(pairs, ALL_LEVELS_FAMILY)


def source_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests of each source without levels (human, answer-only) against every numbered
    level of the other teachers and against each other source without levels, within one
    (dataset, format, student); Holm-adjusted over all of them (one family, apart from the levels')."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.key[0], *cell.key[2:4])].append(cell)
    pairs = []
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda c: cell_sort_key(c.key))
        levelless = [c for c in members if c.level == ""]
        numbered = [c for c in members if c.level.isdigit()]
        pairs += [(level.key[:4], level, source) for source in levelless for level in numbered
                  if level.key[1] != source.key[1]]
        pairs += [(a.key[:4], a, b) for i, a in enumerate(levelless) for b in levelless[i + 1:]]
    return _tested(pairs, SOURCES_FAMILY)


def teacher_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests between every pair of teachers with the same numbered level, dataset, format
    and student (the paper's teacher comparison), Holm-adjusted over all of them (one family)."""
    return _tested(_pairs_differing_in(cells, axis=1), TEACHERS_FAMILY)


def format_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests between every pair of formats with the same level, dataset, teacher and
    student, CoT first (the paper's format comparison), Holm-adjusted over all of them (one family)."""
    return _tested(_pairs_differing_in(cells, axis=2), FORMATS_FAMILY)


def paired_tests(cells: list[Cell]) -> list[Comparison]:
    """Every paired comparison of cells the report runs, family by family (the tests against the
    constant answer apart: `raydistill.report.baselines.baseline_tests`). `raydistill plan` counts
    the same comparisons before the run."""
    return (neighbour_tests(cells) + all_level_tests(cells) + source_tests(cells) + teacher_tests(cells)
            + format_tests(cells))


def _pairs_differing_in(cells: list[Cell], axis: int) -> list[tuple[tuple, Cell, Cell]]:
    """(row of a, a, b) for every two numbered-level cells whose keys differ only at ``axis``."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.level.isdigit():
            groups[cell.key[:axis] + cell.key[axis + 1:]].append(cell)
    pairs = []
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda c: (c.key[2] != "cot", cell_sort_key(c.key)))
        pairs += [(a.key[:4], a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    return pairs


def _tested(pairs: list[tuple[tuple, Cell, Cell]], family: str) -> list[Comparison]:
    """The paired test of each (row, a, b) that shares questions, Holm-adjusted over them."""
    comparisons = []
    for row, a, b in pairs:
        paired = paired_scores(a, b)
        if paired is None:
            continue
        sa, sb, n_seeds, paired_on = paired
        comparisons.append(Comparison(row, a, b, paired_test(sa, sb), n_seeds, paired_on, family))
    for comparison, adjusted in zip(comparisons, stats.holm_adjust([c.test.p_value for c in comparisons])):
        comparison.test.p_holm = adjusted
    return comparisons
