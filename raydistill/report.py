"""Report stage: trial records -> results table (Markdown + CSV) and accuracy-vs-granularity plot.

    raydistill report outputs/granularity
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULT_COLUMNS = ["dataset", "teacher", "format", "student", "level", "seed", "accuracy", "n_test",
                  "extraction_failure_rate", "mean_generated_tokens", "train_steps", "final_train_loss",
                  "train_seconds", "eval_seconds"]


def load_records(run_dir: Path) -> list[dict]:
    paths = sorted((run_dir / "trials").glob("*/record.json"))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no finished trials (no trials/*/record.json); run the sweep first")
    return [json.loads(p.read_text()) for p in paths]


def flat_rows(records: list[dict]) -> list[dict]:
    rows = [{**r["axes"], **r["metrics"]} for r in records]
    return sorted(rows, key=lambda r: (r["dataset"], r["teacher"], r["format"], r["student"],
                                       _level_key(r["level"]), int(r["seed"])))


def _level_key(level: str) -> int:
    return int(level) if level else 0


def accuracy_grid(rows: list[dict]) -> tuple[list[str], dict[tuple, dict[str, float]]]:
    """Mean accuracy (over seeds) per (dataset, teacher, format, student) row and level column."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["dataset"], r["teacher"], r["format"], r["student"])][r["level"]].append(r["accuracy"])
    levels = sorted({r["level"] for r in rows}, key=_level_key)
    grid = {key: {lvl: statistics.fmean(v) for lvl, v in by_level.items()} for key, by_level in cells.items()}
    return levels, grid


def markdown_table(rows: list[dict]) -> str:
    """The paper's layout: one row per (dataset, teacher, format, student), one column per level."""
    levels, grid = accuracy_grid(rows)
    headers = ["dataset", "teacher", "format", "student"] + [f"L{lvl}" if lvl else "no level" for lvl in levels]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key in sorted(grid):
        values = [f"{100 * grid[key][lvl]:.1f}" if lvl in grid[key] else "" for lvl in levels]
        lines.append("| " + " | ".join(list(key) + values) + " |")
    n_test = sorted({r["n_test"] for r in rows})
    lines.append("")
    lines.append(f"Accuracy (%) on {', '.join(map(str, n_test))} test questions; mean over seeds.")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_level(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, grid = accuracy_grid([r for r in rows if r["level"]])
    panels = sorted({key[:3] for key in grid})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in sorted(k for k in grid if k[:3] == panel):
            xs = [int(lvl) for lvl in levels if lvl in grid[key]]
            ax.plot(xs, [100 * grid[key][str(x)] for x in xs], marker="o", label=key[3])
        ax.set_title("/".join(panel))
        ax.set_xlabel("granularity level")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(range(1, 7))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], run_dir: Path) -> dict[str, Path]:
    rows = flat_rows(records)
    paths = {"csv": run_dir / "results.csv", "markdown": run_dir / "results.md",
             "plot": run_dir / "accuracy_vs_level.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(markdown_table(rows))
    plot_accuracy_vs_level(rows, paths["plot"])
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a sweep's folder, e.g. outputs/granularity")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    paths = write_report(load_records(run_dir), run_dir)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind:<9}: {path}")
    return 0
