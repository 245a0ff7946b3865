"""The grid a sweep would run, read the way the sweep reads it: its cells (replayed from the
release, generated and already finished, to generate, missing from the release), its trials and
the test questions per task. Nothing is written or sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from raydistill.spec import CellSpec, SweepSpec, TrialSpec


@dataclass
class PlannedCell:
    cell: CellSpec  # the grid's cell (as `SweepSpec.cells` yields it)
    identified: CellSpec | None  # with its input digests (None: missing)
    status: str  # "replay" | "cached" | "generate" | "missing"
    folder: Path | None = None
    reason: str | None = None  # why a cell is missing
    annotation: object | None = None  # the AnnotationSpec of a generating teacher's cell


@dataclass
class Grid:
    cells: list[PlannedCell]
    trials: list[TrialSpec]  # the trials that would run (cells the release lacks left out)
    test_questions: dict[str, int]  # task -> questions each evaluation reads
    seeds: list[int]
    missing_cells: str  # the sweep's missing_cells setting
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)

    def to_dict(self) -> dict:
        return {
            "trials": len(self.trials),
            "cells": {s: self.count(s) for s in ("replay", "cached", "generate", "missing")},
            "test_questions": self.test_questions,
            "seeds": self.seeds,
            "students": sorted({t.student for t in self.trials}),
            "missing": [{"cell": c.cell.label, "reason": c.reason} for c in self.cells if c.status == "missing"],
            "notes": self.notes,
        }


def plan_grid(spec: SweepSpec) -> Grid:
    """The sweep's cells as `raydistill.sweep.cells.prepare_cells` would find them, without
    writing any: a released cell is identified from the data mirror (missing when the release
    lacks it), a generating teacher's cell is "cached" when its folder holds the finished cell
    of the same hash (`raydistill.annotate.cells.reuse_finished_cell`), else "generate"."""
    from raydistill.annotate.cells import reuse_finished_cell
    from raydistill.datasets import CellNotReleased, DataUnavailable, load_test
    from raydistill.sweep.cells import annotation_spec, cell_dir, identify_cell

    planned = []
    for cell in spec.cells():
        try:
            identified = identify_cell(cell, spec)
        except (CellNotReleased, DataUnavailable) as err:
            planned.append(PlannedCell(cell, None, "missing", reason=" ".join(str(err).split())))
            continue
        folder = cell_dir(spec.cells_dir, identified)
        if cell.generator is None:
            planned.append(PlannedCell(cell, identified, "replay", folder))
            continue
        aspec = annotation_spec(identified, spec)
        status = "cached" if reuse_finished_cell(aspec, folder) is not None else "generate"
        planned.append(PlannedCell(cell, identified, status, folder, annotation=aspec))
    missing = {c.cell for c in planned if c.status == "missing"}
    trials = [t for t in spec.trials() if t.cell not in missing]
    tests = {}
    for task in spec.axis_values("datasets"):
        try:
            n = load_test(task).num_rows
        except DataUnavailable:
            n = 0
        tests[task] = min(n, spec.test_limit) if spec.test_limit else n
    notes = []
    if missing and spec.missing_cells == "error":
        notes.append(f"{len(missing)} released cell(s) are missing and missing_cells is 'error': the sweep "
                     "would stop on the first; set missing_cells: skip to leave them out")
    return Grid(planned, trials, tests, sorted({t.seed for t in trials}), spec.missing_cells, notes)
