"""Records of a run folder -> trials: the current plan's ``record.json`` files, read with their
per-question scores from the predictions Parquet; `ReportError` for anything that cannot be read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydistill.records import RecordError, TrialRecord
from raydistill.samples import SampleScores, sample_scores

ROW_AXES = ("dataset", "teacher", "format", "student")
CELL_AXES = ROW_AXES + ("level",)


class ReportError(RuntimeError):
    """Records or predictions that cannot be reported; the message names the file."""


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
    record: TrialRecord | None = None
    samples: SampleScores | None = None  # pass@k and maj@k per question, with several samples per question
    gold: dict[str, str] | None = None  # question_id -> gold answer as evaluated; None: predictions missing

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(self.axes[a] for a in CELL_AXES)


def load_records(run_dir: Path) -> list[TrialRecord]:
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
    try:
        return [TrialRecord.read(path) for path in paths]
    except RecordError as err:
        raise ReportError(f"{err}; delete the trial folder to rerun it") from None


def question_scores(path: Path) -> dict[str, float]:
    """question_id -> mean of ``correct`` over its prediction rows (one row per sample)."""
    return _scores(_read_predictions(path))


def _read_predictions(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ReportError(f"{path}: cannot read predictions ({err}); rerun the trial's evaluation") from err
    missing = {"question_id", "correct"} - set(table.column_names)
    if missing:
        raise ReportError(f"{path}: predictions without column(s) {sorted(missing)}; rerun the trial's evaluation")
    return table


def _scores(table) -> dict[str, float]:
    ids = np.asarray(table.column("question_id").to_pylist(), dtype=object)
    correct = np.asarray(table.column("correct").fill_null(False).to_numpy(zero_copy_only=False), dtype=float)
    unique, inverse = np.unique(ids.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=correct, minlength=unique.size)
    counts = np.bincount(inverse, minlength=unique.size)
    return dict(zip(unique.tolist(), (sums / counts).tolist()))


def _gold(table) -> dict[str, str] | None:
    """question_id -> the gold answer of its prediction rows (the first non-empty one)."""
    if "gold" not in table.column_names:
        return None
    gold: dict[str, str] = {}
    for q, g in zip(table.column("question_id").to_pylist(), table.column("gold").to_pylist()):
        if g is not None and str(g) != "":
            gold.setdefault(str(q), str(g))
    return gold


def _samples(table) -> SampleScores | None:
    if "extracted" not in table.column_names:
        return None
    return sample_scores([str(q) for q in table.column("question_id").to_pylist()],
                         table.column("extracted").to_pylist(),
                         [bool(ok) for ok in table.column("correct").fill_null(False).to_pylist()])


def _predictions_path(record: TrialRecord, run_dir: Path) -> Path | None:
    """The record's predictions file, or the trial folder's copy when the run folder moved."""
    candidates = [Path(record.predictions_path)] if record.predictions_path else []
    candidates.append(run_dir / "trials" / record.trial_hash / "predictions.parquet")
    return next((p for p in candidates if p.is_file()), None)


def to_trial(record: TrialRecord, run_dir: Path) -> Trial:
    """A record as a Trial, with its per-question scores when the predictions file exists."""
    axes = {a: str(record.axes.get(a, "")) for a in (*CELL_AXES, "seed")}
    path = _predictions_path(record, run_dir)
    table = _read_predictions(path) if path else None
    return Trial(
        axes=axes,
        metrics=record.metrics.model_dump(exclude_unset=True),
        trial_hash=record.trial_hash,
        num_workers=record.train_spec.get("num_workers"),
        num_actors=record.eval_spec.get("num_actors"),
        cell=record.cell,
        scores=_scores(table) if table is not None else None,
        record=record,
        samples=_samples(table) if table is not None else None,
        gold=_gold(table) if table is not None else None,
    )
