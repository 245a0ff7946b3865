"""Report stage: trial records -> tables in the paper's layout with confidence intervals, exact
paired tests between neighbouring granularity levels, of the length ablation, of the sources
without levels against the levels, of teachers and of formats at one level (Holm-adjusted), the
seeds' spread, the weak numbers flagged
(truncated generations, extraction failures, target ceilings, cut teacher replies), the paper's
published numbers side by side, cost per cell, and accuracy-vs-granularity plots.

    raydistill report outputs/granularity [--n-boot 2000] [--seed 0]

Files written into the run folder (docs/report.md explains each):

    results.md            every table below, in Markdown
    results.csv           one row per cell (dataset, teacher, format, student, level), seeds aggregated
    results_table.csv     the paper's layout: one row per (dataset, teacher, format, student),
                          one column group per level
    paired_tests.csv      exact paired tests with the difference's 95 % interval, Holm-adjusted per
                          family: neighbouring levels and the length ablation; all pairs of levels;
                          sources without levels against the levels; teachers at one level;
                          formats at one level; every cell against the constant answer
    baselines.csv         per dataset the constant answer and chance
    trials.csv            one row per trial (per seed), the records' metrics
    accuracy_vs_level.png one panel per (dataset, student); plots/ holds one PNG per panel

How intervals and tests are computed: `raydistill.report.intervals` and docs/report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydistill import files
from raydistill.records import TrialRecord
from raydistill.report.baselines import baseline_tests, build_baselines
from raydistill.report.cells import build_cells, paired_tests
from raydistill.report.intervals import DEFAULT_N_BOOT, DEFAULT_SEED
from raydistill.report.markdown import markdown_report
from raydistill.report.plots import plot_accuracy_vs_level
from raydistill.report.published import PUBLISHED_CSV, load_published
from raydistill.report.records import ReportError, Trial, load_records, to_trial
from raydistill.report.tables import (
    BASELINE_COLUMNS,
    CELL_COLUMNS,
    PAIRED_COLUMNS,
    baseline_table_rows,
    TRIAL_COLUMNS,
    cell_rows,
    paired_rows,
    table_rows,
    trial_rows,
    write_csv,
)


def write_report(records: list[TrialRecord], run_dir: Path, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
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
    baselines = build_baselines(cells)
    comparisons = paired_tests(cells) + baseline_tests(cells, baselines)
    notes = _notes(trials, published, published_path)

    paths = {"markdown": run_dir / "results.md", "csv": run_dir / "results.csv",
             "table_csv": run_dir / "results_table.csv", "paired_csv": run_dir / "paired_tests.csv",
             "trials_csv": run_dir / "trials.csv", "baselines_csv": run_dir / "baselines.csv"}
    files.write_text(paths["markdown"], markdown_report(cells, comparisons, published, n_boot, seed, notes, baselines))
    write_csv(paths["baselines_csv"], BASELINE_COLUMNS, baseline_table_rows(baselines))
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
