"""Report stage: trial records -> tables in the paper's layout with confidence intervals, exact
paired tests between neighbouring granularity levels (Holm-adjusted), the weak numbers flagged
(truncated generations, extraction failures, target ceilings, cut teacher replies), the paper's
published numbers side by side, cost per cell, and accuracy-vs-granularity plots.

    raydistill report outputs/granularity [--n-boot 2000] [--seed 0]

Files written into the run folder (docs/report.md explains each):

    results.md            every table below, in Markdown
    results.csv           one row per cell (dataset, teacher, format, student, level), seeds aggregated
    results_table.csv     the paper's layout: one row per (dataset, teacher, format, student),
                          one column group per level
    paired_tests.csv      exact paired tests between neighbouring levels, Holm-adjusted
    trials.csv            one row per trial (per seed), the records' metrics
    accuracy_vs_level.png one panel per (dataset, student); plots/ holds one PNG per panel

Statistics (docs/report.md): a cell's accuracy is the mean over seeds of each trial's accuracy.
With one seed and one sample per question its 95 % interval is the Wilson score interval (never
degenerate at 0 or n correct); with several seeds or samples it is a percentile bootstrap over
test questions (each replicate draws questions with replacement and averages the seeds'
accuracies on them), replaced by the Wilson interval over the questions where the bootstrap has
zero width. Neighbouring levels are compared with an exact two-sided sign test on the per-question
differences (the exact McNemar test for one seed), p-values Holm-adjusted over the table, next to
the smallest difference the question count can show at all. Random numbers come from a fixed
seed mixed with the cell's name, so a report is reproducible and a cell's CI does not change when
other cells are added.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raydistill import files, stats
from raydistill.resources import package_data

ROW_AXES = ("dataset", "teacher", "format", "student")
CELL_AXES = ROW_AXES + ("level",)
PUBLISHED_CSV = package_data("paper", "published_results.csv")
DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
ALPHA = 0.05
TRUNCATION_FLAG = 0.05  # a cell with more truncated generations than this is marked
CEILING_FLAG = 0.95  # a cell whose targets grade below this against their own answers is listed
TRUNCATED_MARK = "†"

TRIAL_COLUMNS = ["trial_hash", "dataset", "teacher", "format", "student", "level", "seed", "accuracy", "n_test",
                 "extraction_failure_rate", "truncation_rate", "target_ceiling", "mean_generated_tokens",
                 "max_new_tokens", "train_steps", "final_train_loss", "train_seconds", "eval_seconds", "num_workers",
                 "num_actors", "cell_source", "eval_protocol", "grader", "raydistill_version"]
CELL_COLUMNS = [*CELL_AXES, "accuracy", "ci_low", "ci_high", "ci_method", "n_seeds", "seeds", "n_test",
                "n_questions_ci", "truncation_rate", "extraction_failure_rate", "target_ceiling",
                "teacher_truncated_share", "flags", "mean_generated_tokens", "max_new_tokens", "published_accuracy",
                "published_kind", "teacher_source", "teacher_cost_usd", "teacher_tokens_in", "teacher_tokens_out",
                "train_seconds", "eval_seconds", "train_worker_seconds", "eval_actor_seconds",
                "accuracy_pct_per_usd"]
PAIRED_COLUMNS = [*ROW_AXES, "level_a", "level_b", "accuracy_a", "accuracy_b", "diff", "n_b_better",
                  "n_a_better", "p_value", "p_holm", "min_detectable_diff", "n_questions", "n_seeds_paired",
                  "paired_on"]


class ReportError(RuntimeError):
    """Records or predictions that cannot be reported; the message names the file."""


# =========================================================================== statistics


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval and how the interval was computed."""

    estimate: float
    low: float
    high: float
    method: str = "bootstrap"  # "wilson" | "bootstrap" | "bootstrap+wilson" (Wilson where the bootstrap had zero width)


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


def cell_rng(seed: int, *key: str) -> np.random.Generator:
    """A generator fixed by the report seed and a cell's name (stable across Python runs)."""
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(key).encode())])


def bootstrap_weights(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items) counts: how often each item is drawn in each resample with replacement."""
    draws = rng.integers(0, n_items, size=(n_boot, n_items))
    flat = (draws + n_items * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_items).reshape(n_boot, n_items)


def bootstrap_accuracy(scores: np.ndarray, n_boot: int = DEFAULT_N_BOOT, rng: np.random.Generator | None = None,
                       alpha: float = ALPHA) -> Interval:
    """Mean over seeds of per-seed accuracy, with a percentile bootstrap CI resampling questions.

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
    replicates = np.nanmean(per_seed, axis=1) if np.isnan(per_seed).any() else per_seed.mean(1)
    low, high = np.nanpercentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(estimate, float(low), float(high))


def wilson_accuracy(scores: np.ndarray, alpha: float = ALPHA) -> Interval:
    """Accuracy of 0/1 question scores with its Wilson score interval."""
    scores = np.asarray(scores, dtype=float)
    correct, n = int(round(scores.sum())), int(scores.size)
    low, high = stats.wilson_interval(correct, n, alpha)
    return Interval(correct / n, low, high, "wilson")


def accuracy_interval(scores: np.ndarray, n_boot: int = DEFAULT_N_BOOT, rng: np.random.Generator | None = None,
                      alpha: float = ALPHA) -> Interval:
    """A cell's accuracy and 95 % interval from its (n_seeds, n_questions) score matrix.

    One seed whose scores are all 0 or 1: the Wilson interval. Otherwise the percentile bootstrap
    over questions (`bootstrap_accuracy`); where it has zero width (every question scored alike),
    the Wilson interval over the questions at the same accuracy, so an interval never claims
    certainty.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    present = scores[~np.isnan(scores)]
    if scores.shape[0] == 1 and np.isin(present, (0.0, 1.0)).all():
        return wilson_accuracy(present, alpha)
    boot = bootstrap_accuracy(scores, n_boot, rng, alpha)
    if boot.high > boot.low:
        return boot
    n = int((~np.isnan(scores)).any(axis=0).sum())
    low, high = stats.wilson_interval(int(round(boot.estimate * n)), n, alpha)
    return Interval(boot.estimate, low, high, "bootstrap+wilson")


def paired_test(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> PairedTest:
    """Accuracy difference b - a over the same questions with an exact two-sided sign test on the
    per-question differences: the exact McNemar test on the discordant questions for 0/1 scores
    (5 discordant questions all one way: p = 0.0625). Seeds averaged per question keep their sign."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired scores need two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    test = stats.sign_test(b - a)
    return PairedTest(float((b - a).mean()), test.n_pos, test.n_neg, test.p_value, int(a.size),
                      stats.min_detectable_difference(int(a.size), alpha))


# =========================================================================== records -> trials


@dataclass
class Trial:
    """One finished trial: its axes, metrics, compute shape, annotation cell and question scores."""

    axes: dict[str, str]
    metrics: dict
    trial_hash: str
    num_workers: int | None
    num_actors: int | None
    cell: dict | None
    scores: dict[str, float] | None = None  # question_id -> mean correctness; None: predictions missing
    record: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(self.axes[a] for a in CELL_AXES)


def load_records(run_dir: Path) -> list[dict]:
    """The finished trials of the run folder's current plan (``trials.json``, written by the sweep):
    a trial whose identity changed since (an edited data or prompt file, another setting) keeps its
    old folder under ``trials/`` but is not reported. Without a plan file, every
    ``trials/*/record.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder; pass the folder a sweep wrote (its run_dir)")
    paths = sorted((run_dir / "trials").glob("*/record.json"))
    plan = run_dir / "trials.json"
    if plan.is_file():
        try:
            current = {entry["trial_hash"] for entry in json.loads(plan.read_text())}
        except (ValueError, TypeError, KeyError) as err:
            raise ReportError(f"{plan}: unreadable plan ({err}); rerun the sweep to write it again") from err
        paths = [p for p in paths if p.parent.name in current]
    if not paths:
        raise ReportError(f"{run_dir}: no finished trials (no trials/*/record.json); run the sweep first")
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not valid JSON ({err}); delete the trial folder to rerun it") from err
    return records


def question_scores(path: Path) -> dict[str, float]:
    """question_id -> mean of ``correct`` over its prediction rows (one row per sample)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["question_id", "correct"])
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ReportError(f"{path}: cannot read predictions ({err}); rerun the trial's evaluation") from err
    ids = np.asarray(table.column("question_id").to_pylist(), dtype=object)
    correct = np.asarray(table.column("correct").fill_null(False).to_numpy(zero_copy_only=False), dtype=float)
    unique, inverse = np.unique(ids.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=correct, minlength=unique.size)
    counts = np.bincount(inverse, minlength=unique.size)
    return dict(zip(unique.tolist(), (sums / counts).tolist()))


def _predictions_path(record: dict, run_dir: Path) -> Path | None:
    """The record's predictions file, or the trial folder's copy when the run folder moved."""
    candidates = [Path(record["predictions_path"])] if record.get("predictions_path") else []
    candidates.append(run_dir / "trials" / record["trial_hash"] / "predictions.parquet")
    return next((p for p in candidates if p.is_file()), None)


def to_trial(record: dict, run_dir: Path) -> Trial:
    """A record as a Trial, with its per-question scores when the predictions file exists."""
    missing = [k for k in ("trial_hash", "axes", "metrics") if k not in record]
    if "metrics" in record and "accuracy" not in record["metrics"]:
        missing.append("metrics.accuracy")
    if missing:
        where = run_dir / "trials" / str(record.get("trial_hash", "?")) / "record.json"
        raise ReportError(f"{where}: record lacks {', '.join(missing)}; delete the trial folder to rerun it")
    axes = {a: str(record["axes"].get(a, "")) for a in (*CELL_AXES, "seed")}
    path = _predictions_path(record, run_dir)
    return Trial(
        axes=axes,
        metrics=record["metrics"],
        trial_hash=record["trial_hash"],
        num_workers=(record.get("train_spec") or {}).get("num_workers"),
        num_actors=(record.get("eval_spec") or {}).get("num_actors"),
        cell=record.get("cell"),
        scores=question_scores(path) if path else None,
        record=record,
    )


# =========================================================================== cells


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

    @property
    def accuracy(self) -> float:
        return statistics.fmean(t.metrics["accuracy"] for t in self.trials)

    @property
    def seeds(self) -> list[str]:
        return sorted((t.axes["seed"] for t in self.trials), key=_seed_key)

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
        failures = self.mean("extraction_failure_rate")
        if failures is not None and failures > TRUNCATION_FLAG:
            out.append(f"no answer extracted from {100 * failures:.1f} %")
        if ceiling is not None and ceiling < CEILING_FLAG:
            out.append(f"target ceiling {100 * ceiling:.1f} %")
        if teacher is not None and teacher > TRUNCATION_FLAG:
            out.append(f"{100 * teacher:.1f} % of teacher replies cut at max_tokens")
        return out


def _seed_key(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _level_key(level: str) -> tuple:
    """Numbered levels in order, then the level-less column."""
    return (0, int(level), "") if level.isdigit() else (1, 0, level)


def level_label(level: str) -> str:
    return f"L{level}" if level else "no level"


def score_matrix(trials: list[Trial]) -> tuple[list[str], np.ndarray]:
    """(question ids, (n_seeds, n_questions) scores with NaN where a seed lacks a question)."""
    ids = sorted(set().union(*(t.scores for t in trials)))
    index = {q: i for i, q in enumerate(ids)}
    matrix = np.full((len(trials), len(ids)), np.nan)
    for row, trial in enumerate(trials):
        matrix[row, [index[q] for q in trial.scores]] = list(trial.scores.values())
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
    for key in sorted(grouped, key=_cell_sort_key):
        members = sorted(grouped[key], key=lambda t: _seed_key(t.axes["seed"]))
        cell = Cell(key, members, published=lookup.get(_published_key(key)), cost=cell_cost(members))
        with_scores = [t for t in members if t.scores]
        if with_scores:
            ids, matrix = score_matrix(with_scores)
            cell.interval = accuracy_interval(matrix, n_boot, cell_rng(seed, "cell", *key))
            cell.n_questions_ci = len(ids)
        cells.append(cell)
    return cells


def _cell_sort_key(key: tuple) -> tuple:
    return (*key[:4], _level_key(key[4]))


# =========================================================================== paired tests


@dataclass
class Comparison:
    """A paired test between two neighbouring levels of one table row."""

    row: tuple[str, ...]
    a: Cell
    b: Cell
    test: PairedTest
    n_seeds_paired: int
    paired_on: str



def paired_scores(a: Cell, b: Cell) -> tuple[np.ndarray, np.ndarray, int, str] | None:
    """Per-question scores of both cells on their shared questions, each averaged over seeds.

    With seeds in common, only those seeds are used, so each question pairs (question, seed)
    units; otherwise each side averages all its seeds. None when nothing can be paired.
    """
    ta = {t.axes["seed"]: t for t in a.trials if t.scores}
    tb = {t.axes["seed"]: t for t in b.trials if t.scores}
    common = sorted(set(ta) & set(tb), key=_seed_key)
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


def neighbour_tests(cells: list[Cell]) -> list[Comparison]:
    """Exact paired tests between consecutive numbered levels present in each table row, their
    p-values Holm-adjusted over all of them (one family: the report's paired table)."""
    rows: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.level.isdigit():
            rows[cell.key[:4]].append(cell)
    comparisons = []
    for row in sorted(rows):
        ordered = sorted(rows[row], key=lambda c: _level_key(c.level))
        for a, b in zip(ordered, ordered[1:]):
            paired = paired_scores(a, b)
            if paired is None:
                continue
            sa, sb, n_seeds, paired_on = paired
            comparisons.append(Comparison(row, a, b, paired_test(sa, sb), n_seeds, paired_on))
    for comparison, adjusted in zip(comparisons, stats.holm_adjust([c.test.p_value for c in comparisons])):
        comparison.test.p_holm = adjusted
    return comparisons


# =========================================================================== published numbers


def load_published(path: Path = PUBLISHED_CSV) -> list[dict]:
    """Rows of the published-numbers CSV (``#`` lines are its column documentation)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.lstrip().startswith("#")))
    for row in rows:
        try:
            row["accuracy_pct"] = float(row["accuracy_pct"])
        except (KeyError, ValueError) as err:
            raise ReportError(f"{path}: row {row} lacks a numeric accuracy_pct; fix the file") from err
    return rows


def _published_key(cell_key: tuple) -> tuple:
    dataset, teacher, _format, student, level = cell_key
    return dataset, teacher, student, level


def published_lookup(published: list[dict]) -> dict[tuple, dict]:
    """(dataset, teacher, student, level) -> published row; a "level" row beats a "best_level" row."""
    rank = {"level": 0, "best_level": 1}
    lookup: dict[tuple, dict] = {}
    for row in published:
        if row.get("kind") not in rank or not row.get("student") or not row.get("teacher"):
            continue
        key = (row["dataset"], row["teacher"], row["student"], row.get("level", ""))
        if key not in lookup or rank[row["kind"]] < rank[lookup[key]["kind"]]:
            lookup[key] = row
    return lookup


# =========================================================================== formatting


def _pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def cell_text(cell: Cell) -> str:
    """'52.1 [48.0, 56.2] ×3' (+ ' †' when truncated, ' · paper 53.42'): mean over seeds, 95 %
    interval, seed count."""
    text = f"{100 * cell.accuracy:.1f}"
    if cell.interval:
        text += f" [{_pct(cell.interval.low)}, {_pct(cell.interval.high)}]"
    text += f" ×{len(cell.trials)}"
    if cell.truncated:
        text += f" {TRUNCATED_MARK}"
    if cell.published:
        text += f" · paper {cell.published['accuracy_pct']:.2f}"
    return text


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def _levels(cells: list[Cell]) -> list[str]:
    return sorted({c.level for c in cells}, key=_level_key)


def _by_row(cells: list[Cell]) -> dict[tuple, dict[str, Cell]]:
    rows: dict[tuple, dict[str, Cell]] = defaultdict(dict)
    for cell in cells:
        rows[cell.key[:4]][cell.level] = cell
    return dict(sorted(rows.items()))


def accuracy_section(cells: list[Cell], n_boot: int) -> list[str]:
    levels = _levels(cells)
    headers = [*ROW_AXES, *(level_label(lvl) for lvl in levels)]
    rows = [[*row, *(cell_text(by[lvl]) if lvl in by else "" for lvl in levels)]
            for row, by in _by_row(cells).items()]
    n_test = sorted({int(t.metrics.get("n_test", 0)) for c in cells for t in c.trials})
    methods = sorted({c.interval.method for c in cells if c.interval})
    truncated = [c for c in cells if c.truncated]
    lines = ["## Accuracy by granularity level", "", *_md_table(headers, rows), "",
             f"Accuracy (%) on {', '.join(map(str, n_test))} test questions: mean over seeds, "
             f"[95 % interval: {_methods_text(methods, n_boot)}], ×seeds; "
             "'paper' is the published accuracy for the same dataset, teacher, student and level."]
    if truncated:
        lines.append(f"{TRUNCATED_MARK} more than {100 * TRUNCATION_FLAG:.0f} % of the cell's generations hit "
                     f"max_new_tokens, so its accuracy is bounded by the cut, not only by the student "
                     f"({len(truncated)} of {len(cells)} cells; see 'Weak numbers').")
    return lines + [""]


def _methods_text(methods: list[str], n_boot: int) -> str:
    words = {"wilson": "Wilson score interval (one seed)",
             "bootstrap": f"percentile bootstrap over questions, {n_boot} resamples (several seeds or samples)",
             "bootstrap+wilson": "Wilson over the questions where the bootstrap had zero width"}
    return "; ".join(words[m] for m in methods) or "none (no predictions)"


def paired_section(comparisons: list[Comparison]) -> list[str]:
    lines = ["## Neighbouring levels: exact paired tests", ""]
    if not comparisons:
        return lines + ["No table row has two numbered levels with predictions to pair.", ""]
    headers = [*ROW_AXES, "comparison", "Δ accuracy (pp)", "better / worse", "p", "p (Holm)",
               "smallest detectable Δ (pp)", "questions", "paired on"]
    rows = [[*c.row, f"{level_label(c.a.level)} → {level_label(c.b.level)}", f"{100 * c.test.diff:+.1f}",
             f"{c.test.n_b_better} / {c.test.n_a_better}", _p_text(c.test.p_value), _p_text(c.test.p_holm),
             _detectable_text(c.test.min_detectable), c.test.n_questions, c.paired_on] for c in comparisons]
    return lines + _md_table(headers, rows) + [
        "", "Δ = accuracy of the higher level minus the lower one on the questions both answered. "
        "'better / worse' counts the questions the higher level scores above / below the lower one "
        "(the discordant questions); p is the exact two-sided sign test on them (the exact McNemar test "
        f"for one seed), Holm-adjusted over the {len(comparisons)} comparisons of this table. With n "
        f"questions no difference below {stats.min_discordant_for_significance(ALPHA)}/n can reach "
        f"p ≤ {ALPHA}: the 'smallest detectable Δ' column.", ""]


def _detectable_text(value: float) -> str:
    return "none possible" if math.isinf(value) else f"{100 * value:.1f}"


def quality_section(cells: list[Cell]) -> list[str]:
    """Per cell: what can make its number weak, and the cells flagged."""
    headers = [*ROW_AXES, "level", "truncated", "no answer", "target ceiling", "teacher cut", "mean tokens",
               "max new tokens", "interval"]
    rows = [[*c.key[:4], level_label(c.level), _share_text(c.truncation_rate),
             _share_text(c.mean("extraction_failure_rate")), _share_text(c.mean("target_ceiling")),
             _share_text(c.teacher_truncated_share), _number_text(c.mean("mean_generated_tokens")),
             _number_text(c.mean("max_new_tokens")), c.interval.method if c.interval else ""] for c in cells]
    flagged = [c for c in cells if c.flags()]
    lines = ["## Weak numbers", "", *_md_table(headers, rows), "",
             "truncated: share of generations that hit max_new_tokens; no answer: share with no "
             "extractable answer; target ceiling: share of the cell's training targets graded correct "
             "against their own answers (a student that copied its targets would score this); teacher cut: "
             "share of the teacher's replies cut at max_tokens (generated cells).", ""]
    if not flagged:
        return lines + ["No cell is flagged.", ""]
    return lines + ["Flagged cells:", ""] + [
        f"- {'/'.join(c.key[:4])} {level_label(c.level)}: {'; '.join(c.flags())}" for c in flagged] + [""]


def _share_text(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _number_text(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _p_text(p: float | None) -> str:
    if p is None:
        return ""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def published_section(cells: list[Cell], published: list[dict]) -> list[str]:
    lines = ["## Published numbers side by side", ""]
    matched = [c for c in cells if c.published]
    if not matched:
        held = sorted({(r["dataset"], r["teacher"]) for r in published if r.get("teacher")})
        what = "; ".join(f"{d}/{t}" for d, t in held) or "none held"
        return lines + [f"No cell matches a published number (the paper's numbers cover {what}, "
                        f"students {', '.join(sorted({r['student'] for r in published if r.get('student')}))}).", ""]
    headers = ["dataset", "teacher", "format", "student", "level", "ours (%)", "95 % CI", "paper (%)",
               "paper row", "ours − paper (pp)"]
    rows = []
    for c in matched:
        ci = f"[{_pct(c.interval.low)}, {_pct(c.interval.high)}]" if c.interval else ""
        paper = c.published["accuracy_pct"]
        rows.append([*c.key[:4], level_label(c.level), f"{100 * c.accuracy:.1f}", ci, f"{paper:.2f}",
                     c.published["kind"], f"{100 * c.accuracy - paper:+.1f}"])
    return lines + _md_table(headers, rows) + [""]


def cost_section(cells: list[Cell]) -> list[str]:
    headers = [*ROW_AXES, "level", "teacher cost", "teacher tokens in/out", "train s (× workers)",
               "eval s (× actors)", "accuracy % per $"]
    rows = [[*c.key[:4], level_label(c.level), _usd_text(c.cost), _tokens_text(c.cost),
             _seconds_text(c.cost.train_seconds, c.cost.train_worker_seconds),
             _seconds_text(c.cost.eval_seconds, c.cost.eval_actor_seconds),
             "" if accuracy_per_usd(c) is None else f"{accuracy_per_usd(c):.1f}"] for c in cells]
    return ["## Cost per cell", "", *_md_table(headers, rows), "",
            "Teacher cost is the annotation cell's summary (shared by every student trained on it); "
            "'replayed' = released annotations, cost unknown. Compute seconds are summed over seeds; "
            "the parenthesised figure multiplies by Ray Train workers / eval actors.", ""]


def _usd_text(cost: Cost) -> str:
    return f"${cost.usd:.2f}" if cost.source == "generated" else cost.source


def _tokens_text(cost: Cost) -> str:
    return f"{cost.tokens_in:,} / {cost.tokens_out:,}" if cost.source == "generated" else ""


def _seconds_text(seconds: float | None, scaled: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.1f}" + (f" ({scaled:.1f})" if scaled is not None and scaled != seconds else "")


def ablation_section(published: list[dict]) -> list[str]:
    rows = [[r["dataset"], level_label(r.get("level", "")), r.get("variant", ""), f"{r['accuracy_pct']:.2f}",
             r.get("mean_seq_len", "")] for r in published if r.get("kind") == "ablation"]
    if not rows:
        return []
    headers = ["dataset", "level", "variant", "paper accuracy (%)", "mean sequence length"]
    return ["## Paper: granularity vs length ablation (for reference)", "", *_md_table(headers, rows), ""]


def markdown_report(cells: list[Cell], comparisons: list[Comparison], published: list[dict],
                    n_boot: int, seed: int, notes: list[str]) -> str:
    lines = ["# Results", ""]
    lines += accuracy_section(cells, n_boot)
    lines += paired_section(comparisons)
    lines += quality_section(cells)
    lines += published_section(cells, published)
    lines += cost_section(cells)
    lines += ablation_section(published)
    lines += [f"Bootstrap (where used): {n_boot} resamples, seed {seed}; see docs/report.md.", *notes]
    return "\n".join(lines).rstrip() + "\n"


# =========================================================================== CSV


def trial_rows(trials: list[Trial]) -> list[dict]:
    rows = [{**t.axes, **t.metrics, "trial_hash": t.trial_hash, "num_workers": t.num_workers,
             "num_actors": t.num_actors, "cell_source": (t.cell or {}).get("source", ""),
             **{k: t.record.get(k, "") for k in ("eval_protocol", "grader", "raydistill_version")}}
            for t in trials]
    return sorted(rows, key=lambda r: (_cell_sort_key(tuple(r[a] for a in CELL_AXES)), _seed_key(r["seed"])))


def cell_rows(cells: list[Cell]) -> list[dict]:
    """One row per cell; accuracies as fractions (published_accuracy too)."""
    rows = []
    for c in cells:
        rows.append({
            **dict(zip(CELL_AXES, c.key)),
            "accuracy": c.accuracy,
            "ci_low": c.interval.low if c.interval else None,
            "ci_high": c.interval.high if c.interval else None,
            "ci_method": c.interval.method if c.interval else "",
            "n_seeds": len(c.trials),
            "seeds": " ".join(c.seeds),
            "n_test": statistics.fmean(t.metrics.get("n_test", 0) for t in c.trials),
            "n_questions_ci": c.n_questions_ci,
            "truncation_rate": c.truncation_rate,
            "extraction_failure_rate": _mean_metric(c, "extraction_failure_rate"),
            "target_ceiling": c.mean("target_ceiling"),
            "teacher_truncated_share": c.teacher_truncated_share,
            "flags": "; ".join(c.flags()),
            "mean_generated_tokens": _mean_metric(c, "mean_generated_tokens"),
            "max_new_tokens": _mean_metric(c, "max_new_tokens"),
            "published_accuracy": c.published["accuracy_pct"] / 100 if c.published else None,
            "published_kind": c.published["kind"] if c.published else "",
            "teacher_source": c.cost.source,
            "teacher_cost_usd": c.cost.usd,
            "teacher_tokens_in": c.cost.tokens_in,
            "teacher_tokens_out": c.cost.tokens_out,
            "train_seconds": c.cost.train_seconds,
            "eval_seconds": c.cost.eval_seconds,
            "train_worker_seconds": c.cost.train_worker_seconds,
            "eval_actor_seconds": c.cost.eval_actor_seconds,
            "accuracy_pct_per_usd": accuracy_per_usd(c),
        })
    return rows


def _mean_metric(cell: Cell, name: str) -> float | None:
    values = [t.metrics[name] for t in cell.trials if t.metrics.get(name) is not None]
    return statistics.fmean(values) if values else None


def table_rows(cells: list[Cell]) -> tuple[list[str], list[dict]]:
    """The paper's layout as CSV: per level, accuracy % (1 decimal), CI bounds, seeds, paper value."""
    levels = _levels(cells)
    columns = list(ROW_AXES)
    for lvl in levels:
        name = level_label(lvl).replace(" ", "_")
        columns += [name, f"{name}_ci_low", f"{name}_ci_high", f"{name}_n_seeds", f"{name}_paper"]
    rows = []
    for row, by in _by_row(cells).items():
        out = dict(zip(ROW_AXES, row))
        for lvl, c in by.items():
            name = level_label(lvl).replace(" ", "_")
            out[name] = f"{100 * c.accuracy:.1f}" + (TRUNCATED_MARK if c.truncated else "")
            out[f"{name}_ci_low"] = _pct(c.interval.low) if c.interval else ""
            out[f"{name}_ci_high"] = _pct(c.interval.high) if c.interval else ""
            out[f"{name}_n_seeds"] = len(c.trials)
            out[f"{name}_paper"] = f"{c.published['accuracy_pct']:.2f}" if c.published else ""
        rows.append(out)
    return columns, rows


def paired_rows(comparisons: list[Comparison]) -> list[dict]:
    return [{**dict(zip(ROW_AXES, c.row)), "level_a": c.a.level, "level_b": c.b.level,
             "accuracy_a": c.a.accuracy, "accuracy_b": c.b.accuracy, "diff": c.test.diff,
             "n_b_better": c.test.n_b_better, "n_a_better": c.test.n_a_better, "p_value": c.test.p_value,
             "p_holm": c.test.p_holm, "min_detectable_diff": c.test.min_detectable,
             "n_questions": c.test.n_questions, "n_seeds_paired": c.n_seeds_paired, "paired_on": c.paired_on}
            for c in comparisons]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with files.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# =========================================================================== plots


def _panels(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    panels: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        panels[(cell.key[0], cell.key[3])].append(cell)
    return dict(sorted(panels.items()))


def draw_panel(ax, panel: tuple[str, str], cells: list[Cell]) -> None:
    """Accuracy vs level per (teacher, format) with CI error bars; level-less cells as dashed lines;
    published numbers as black crosses; cells with more than 5 % truncated generations as hollow
    red-edged markers labelled with the mark."""
    lines: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        lines[(cell.key[1], cell.key[2])].append(cell)
    for index, ((teacher, fmt), members) in enumerate(sorted(lines.items())):
        label, color = f"{teacher}/{fmt}", f"C{index % 10}"
        numbered = sorted((c for c in members if c.level.isdigit()), key=lambda c: int(c.level))
        if numbered:
            xs = [int(c.level) for c in numbered]
            ys = np.array([100 * c.accuracy for c in numbered])
            lows = np.array([100 * c.interval.low if c.interval else y for c, y in zip(numbered, ys)])
            highs = np.array([100 * c.interval.high if c.interval else y for c, y in zip(numbered, ys)])
            ax.errorbar(xs, ys, yerr=[ys - lows, highs - ys], marker="o", capsize=3, color=color, label=label)
            cut = [(x, y) for x, y, c in zip(xs, ys, numbered) if c.truncated]
            if cut:
                ax.scatter(*zip(*cut), s=90, facecolors="white", edgecolors="red", linewidths=1.5, zorder=4,
                           label=f"{TRUNCATED_MARK} > {100 * TRUNCATION_FLAG:.0f} % truncated")
                for x, y in cut:
                    ax.annotate(TRUNCATED_MARK, (x, y), textcoords="offset points", xytext=(6, 4), color="red")
        for c in members:
            if not c.level.isdigit():
                ax.axhline(100 * c.accuracy, linestyle="--", linewidth=1, color=color, label=f"{label} (no level)")
    paper = [(int(c.level), c.published["accuracy_pct"]) for c in cells if c.published and c.level.isdigit()]
    if paper:
        ax.scatter(*zip(*paper), marker="x", color="black", zorder=3, label="paper")
    ax.set_title(f"{panel[0]} / {panel[1]}")
    ax.set_xlabel("granularity level")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(range(1, 7))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # the truncation marker once, however many lines carry it
    ax.legend(unique.values(), unique.keys(), fontsize=7)


def plot_accuracy_vs_level(cells: list[Cell], path: Path, panel_dir: Path | None = None) -> list[Path]:
    """One figure with a panel per (dataset, student) at ``path``; one PNG per panel in panel_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(cells)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (panel, members) in zip(axes.flat, panels.items()):
        draw_panel(ax, panel, members)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    written = []
    if panel_dir is not None:
        panel_dir.mkdir(parents=True, exist_ok=True)
        for panel, members in panels.items():
            fig, ax = plt.subplots(figsize=(5, 3.8))
            draw_panel(ax, panel, members)
            fig.tight_layout()
            out = panel_dir / f"accuracy_vs_level_{_slug(panel[0])}_{_slug(panel[1])}.png"
            with files.atomic_path(out) as tmp:
                fig.savefig(tmp, dpi=120, format="png")
            plt.close(fig)
            written.append(out)
    return written


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


# =========================================================================== entry points


def write_report(records: list[dict], run_dir: Path, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                 published_path: Path = PUBLISHED_CSV, plots: bool = True) -> dict[str, Path]:
    """Write every table (and, with ``plots``, every plot) into ``run_dir``; returns kind -> path."""
    run_dir = Path(run_dir)
    if not records:
        raise ReportError(f"{run_dir}: no trial records to report; run the sweep first")
    if n_boot < 1:
        raise ReportError(f"n_boot must be at least 1, got {n_boot}")
    trials = [to_trial(r, run_dir) for r in records]
    published = load_published(published_path)
    cells = build_cells(trials, published, n_boot, seed)
    comparisons = neighbour_tests(cells)
    notes = _notes(trials, published, published_path)

    paths = {"markdown": run_dir / "results.md", "csv": run_dir / "results.csv",
             "table_csv": run_dir / "results_table.csv", "paired_csv": run_dir / "paired_tests.csv",
             "trials_csv": run_dir / "trials.csv"}
    files.write_text(paths["markdown"], markdown_report(cells, comparisons, published, n_boot, seed, notes))
    write_csv(paths["csv"], CELL_COLUMNS, cell_rows(cells))
    write_csv(paths["table_csv"], *table_rows(cells))
    write_csv(paths["paired_csv"], PAIRED_COLUMNS, paired_rows(comparisons))
    write_csv(paths["trials_csv"], TRIAL_COLUMNS, trial_rows(trials))
    if plots:
        paths["plot"] = run_dir / "accuracy_vs_level.png"
        for panel_path in plot_accuracy_vs_level(cells, paths["plot"], run_dir / "plots"):
            paths[f"plot:{panel_path.stem.removeprefix('accuracy_vs_level_')}"] = panel_path
    return paths


def _notes(trials: list[Trial], published: list[dict], published_path: Path) -> list[str]:
    notes = []
    lacking = [t.trial_hash for t in trials if t.scores is None]
    if lacking:
        notes.append(f"\n{len(lacking)} trial(s) have no predictions file, so no CI: {', '.join(lacking[:5])}"
                     + (" ..." if len(lacking) > 5 else ""))
    if not published:
        notes.append(f"\nNo published numbers loaded ({published_path} missing or empty).")
    return notes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a sweep's folder, e.g. outputs/granularity")
    parser.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap RNG seed (default 0)")
    parser.add_argument("--published", type=Path, default=PUBLISHED_CSV,
                        help="CSV of published numbers (default raydistill/data/paper/published_results.csv)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        paths = write_report(load_records(run_dir), run_dir, n_boot=args.n_boot, seed=args.seed,
                             published_path=args.published)
    except ReportError as err:
        print(f"raydistill report: {err}", file=sys.stderr)
        return 1
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        if not kind.startswith("plot:"):
            print(f"{kind:<10}: {path}")
    print(f"{'plots':<10}: {run_dir / 'plots'}")
    return 0
