"""accuracy_vs_level.png: one panel per (dataset, student), accuracy vs granularity level with
intervals, published numbers and truncated cells marked; plots/ holds one PNG per panel."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from raydistill import files
from raydistill.report.cells import PADDED_LEVEL, TRUNCATION_FLAG, Cell, level_label
from raydistill.report.markdown import TRUNCATED_MARK


def _panels(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    panels: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        panels[(cell.key[0], cell.key[3])].append(cell)
    return dict(sorted(panels.items()))


def draw_panel(ax, panel: tuple[str, str], cells: list[Cell]) -> None:
    """Accuracy vs level per (teacher, format) with CI error bars; a padded cell ("1+pad5") as a
    diamond beside its own level; level-less cells as dashed lines; published numbers as black
    crosses. Cells with more than 5 % truncated generations carry the mark: hollow red-edged
    markers (levels and padded cells) or the mark in the line's label (level-less cells)."""
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
            mark_truncated(ax, [(x, y) for x, y, c in zip(xs, ys, numbered) if c.truncated])
        for c in members:
            padded = PADDED_LEVEL.match(c.level)
            if padded:
                x, y = int(padded.group(1)) + 0.15, 100 * c.accuracy
                low, high = (100 * c.interval.low, 100 * c.interval.high) if c.interval else (y, y)
                ax.errorbar([x], [y], yerr=[[y - low], [high - y]], marker="D", linestyle="none", capsize=3,
                            color=color, markerfacecolor="white", label=f"{label} {level_label(c.level)}")
                mark_truncated(ax, [(x, y)] if c.truncated else [])
            elif not c.level.isdigit():
                mark = f" {TRUNCATED_MARK}" if c.truncated else ""
                ax.axhline(100 * c.accuracy, linestyle="--", linewidth=1, color=color,
                           label=f"{label} (no level){mark}")
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


def mark_truncated(ax, points: list[tuple[float, float]]) -> None:
    """Hollow red-edged markers, each labelled with the truncation mark, at ``points``."""
    if not points:
        return
    ax.scatter(*zip(*points), s=90, facecolors="white", edgecolors="red", linewidths=1.5, zorder=4,
               label=f"{TRUNCATED_MARK} > {100 * TRUNCATION_FLAG:.0f} % truncated")
    for x, y in points:
        ax.annotate(TRUNCATED_MARK, (x, y), textcoords="offset points", xytext=(6, 4), color="red")


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
