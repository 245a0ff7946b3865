"""The CSV files of a report: one row per trial, per cell, per paired test, and the paper's
layout (one row per table row, one column group per level)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from raydistill import files
from raydistill.records import TIME_STAGES
from raydistill.report.cells import (
    Cell,
    Comparison,
    accuracy_per_usd,
    by_row,
    cell_sort_key,
    level_label,
    seed_key,
    sorted_levels,
)
from raydistill.report.baselines import Baseline
from raydistill.report.markdown import TRUNCATED_MARK, pct, reading
from raydistill.report.records import CELL_AXES, ROW_AXES, Trial

TRIAL_COLUMNS = ["trial_hash", "dataset", "teacher", "format", "student", "level", "seed", "accuracy", "n_test",
                 "extraction_failure_rate", "truncation_rate", "empty_rate", "think_unfinished_rate", "mean_think_tokens",
                 "mean_answer_tokens", "target_ceiling",
                 "mean_generated_tokens", "max_new_tokens", "train_steps", "final_train_loss", "train_seconds", "eval_seconds", "num_workers",
                 "num_actors", "cell_source", "eval_protocol", "grader", "raydistill_version",
                 *(f"time_{stage}_s" for stage in TIME_STAGES)]
CELL_COLUMNS = [*CELL_AXES, "accuracy", "ci_low", "ci_high", "ci_method", "n_seeds", "seeds", "seed_accuracies",
                "seed_min", "seed_max", "seed_sd", "n_test",
                "n_questions_ci", "truncation_rate", "empty_rate", "think_unfinished_rate", "mean_think_tokens",
                "mean_answer_tokens", "extraction_failure_rate", "target_ceiling",
                "teacher_truncated_share", "flags", "mean_generated_tokens", "max_new_tokens", "published_accuracy",
                "published_kind", "teacher_source", "teacher_cost_usd", "teacher_tokens_in", "teacher_tokens_out",
                "train_seconds", "eval_seconds", "train_worker_seconds", "eval_actor_seconds",
                "accuracy_pct_per_usd", "samples_per_question", "pass_at_k", "pass_at_k_ci_low", "pass_at_k_ci_high",
                "maj_at_k", "maj_at_k_ci_low", "maj_at_k_ci_high"]
PAIRED_COLUMNS = ["family", *ROW_AXES, "level_a", "teacher_b", "level_b", "accuracy_a", "accuracy_b", "diff",
                  "diff_ci_low", "diff_ci_high", "n_b_better", "n_a_better", "p_value", "p_holm", "reading",
                  "min_detectable_diff", "n_questions", "n_seeds_paired", "paired_on"]
BASELINE_COLUMNS = ["dataset", "baseline", "answer", "accuracy", "n_correct", "n_questions", "basis"]


def trial_rows(trials: list[Trial]) -> list[dict]:
    rows = [{**t.axes, **t.metrics, "trial_hash": t.trial_hash, "num_workers": t.num_workers,
             "num_actors": t.num_actors, "cell_source": (t.cell or {}).get("source", ""),
             **{k: getattr(t.record, k, "") for k in ("eval_protocol", "grader", "raydistill_version")},
             **{f"time_{stage}_s": s for stage, s in (t.record.timings if t.record else {}).items()}}
            for t in trials]
    return sorted(rows, key=lambda r: (cell_sort_key(tuple(r[a] for a in CELL_AXES)), seed_key(r["seed"])))


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
            "seed_accuracies": " ".join(f"{a:.4f}" for a in c.seed_accuracies),
            "seed_min": min(c.seed_accuracies),
            "seed_max": max(c.seed_accuracies),
            "seed_sd": c.seed_sd,
            "n_test": statistics.fmean(t.metrics.get("n_test", 0) for t in c.trials),
            "n_questions_ci": c.n_questions_ci,
            "truncation_rate": c.truncation_rate,
            "empty_rate": c.empty_rate,
            "think_unfinished_rate": c.mean("think_unfinished_rate"),
            "mean_think_tokens": c.mean("mean_think_tokens"),
            "mean_answer_tokens": c.mean("mean_answer_tokens"),
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
            "samples_per_question": c.samples_k,
            **_interval_columns("pass_at_k", c.pass_interval),
            **_interval_columns("maj_at_k", c.maj_interval),
        })
    return rows


def _interval_columns(name: str, interval) -> dict:
    if interval is None:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    return {name: interval.estimate, f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high}


def _mean_metric(cell: Cell, name: str) -> float | None:
    values = [t.metrics[name] for t in cell.trials if t.metrics.get(name) is not None]
    return statistics.fmean(values) if values else None


def table_rows(cells: list[Cell]) -> tuple[list[str], list[dict]]:
    """The paper's layout as CSV: per level, accuracy % (1 decimal), CI bounds, seeds, paper value."""
    levels = sorted_levels(cells)
    columns = list(ROW_AXES)
    for lvl in levels:
        name = level_label(lvl).replace(" ", "_")
        columns += [name, f"{name}_ci_low", f"{name}_ci_high", f"{name}_n_seeds", f"{name}_paper"]
    rows = []
    for row, by in by_row(cells).items():
        out = dict(zip(ROW_AXES, row))
        for lvl, c in by.items():
            name = level_label(lvl).replace(" ", "_")
            out[name] = f"{100 * c.accuracy:.1f}" + (TRUNCATED_MARK if c.truncated else "")
            out[f"{name}_ci_low"] = pct(c.interval.low) if c.interval else ""
            out[f"{name}_ci_high"] = pct(c.interval.high) if c.interval else ""
            out[f"{name}_n_seeds"] = len(c.trials)
            out[f"{name}_paper"] = f"{c.published['accuracy_pct']:.2f}" if c.published else ""
        rows.append(out)
    return columns, rows


def paired_rows(comparisons: list[Comparison]) -> list[dict]:
    return [{"family": c.family, **dict(zip(ROW_AXES, c.row)), "level_a": c.a.level, "teacher_b": c.b.key[1],
             "level_b": c.b.level,
             "accuracy_a": c.a.accuracy, "accuracy_b": c.b.accuracy, "diff": c.test.diff,
             "diff_ci_low": c.test.ci_low, "diff_ci_high": c.test.ci_high,
             "n_b_better": c.test.n_b_better, "n_a_better": c.test.n_a_better, "p_value": c.test.p_value,
             "p_holm": c.test.p_holm, "reading": reading(c), "min_detectable_diff": c.test.min_detectable,
             "n_questions": c.test.n_questions, "n_seeds_paired": c.n_seeds_paired, "paired_on": c.paired_on}
            for c in comparisons]


def baseline_table_rows(baselines: dict[str, Baseline]) -> list[dict]:
    """One row per baseline: the constant answer of each dataset, and chance where it is defined."""
    rows = []
    for b in baselines.values():
        rows.append({"dataset": b.dataset, "baseline": "constant_answer", "answer": b.answer, "accuracy": b.accuracy,
                     "n_correct": b.n_correct, "n_questions": b.n_questions,
                     "basis": "most frequent gold answer of the questions evaluated"})
        rows.append({"dataset": b.dataset, "baseline": "chance", "answer": "", "accuracy": b.chance, "n_correct": "",
                     "n_questions": "", "basis": b.chance_basis})
    return rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with files.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
