"""The paper's published numbers: the CSV shipped in ``raydistill/data/paper/`` and the lookup
that matches a cell to its published row."""

from __future__ import annotations

import csv
from pathlib import Path

from raydistill.report.records import ReportError
from raydistill.resources import package_data

PUBLISHED_CSV = package_data("paper", "published_results.csv")


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


def published_key(cell_key: tuple) -> tuple:
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
