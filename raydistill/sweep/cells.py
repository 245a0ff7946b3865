"""Sweep preparation: annotation cells and test sets -> Parquet once, shared by every trial that needs them.

Released cells are replayed from the data mirror; cells of a generating teacher are annotated in
one Ray Data pipeline. `identify_cell` / `identify_trial` fill in the digests of what a cell or
trial is made from, so an edited data or prompt file makes a new one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from raydistill import files
from raydistill.spec import CellSpec, SweepSpec, TrialSpec, content_hash
from raydistill.sweep.cluster import init_ray

log = logging.getLogger("raydistill.sweep")


def cell_dir(cells_dir: Path, cell: CellSpec) -> Path:
    return cells_dir / cell.cell_hash


def annotation_spec(cell: CellSpec, spec: SweepSpec):
    """The `AnnotationSpec` a generating teacher's cell is written with."""
    from raydistill.annotate import AnnotationSpec, PaddingSpec, QuestionsSpec

    stage = spec.annotation
    runtime = stage.runtime
    if runtime.cache_dir is None:
        runtime = runtime.model_copy(update={"cache_dir": str(spec.cells_dir.parent / "request-cache")})
    generator = cell.generator or {}
    return AnnotationSpec(task=cell.dataset, teacher=stage.teachers[cell.teacher], level=cell.level,
                          format=cell.format, policy=generator.get("policy", stage.policy),
                          samples=generator.get("samples", 1), max_per_question=generator.get("max_per_question"),
                          show_gold=stage.show_gold, runtime=runtime,
                          questions=QuestionsSpec(limit=cell.train_limit), prompt_dir=stage.prompt_dir,
                          pad=PaddingSpec(to_level=cell.pad_to_level) if cell.pad_to_level is not None else None)


def identify_cell(cell: CellSpec, spec: SweepSpec) -> CellSpec:
    """The cell with its `inputs` filled: sha256 of every data file it is made from, and for a
    generating teacher the annotation spec's hash (its prompt and exemplar texts included).
    Raises DataUnavailable / CellNotReleased when a released cell's files are not to be had."""
    from raydistill.datasets import digests, train_sources

    if cell.generator is None:
        levels = [cell.level] + ([cell.pad_to_level] if cell.pad_to_level is not None else [])
        inputs = digests([path for level in levels for path in train_sources(cell.dataset, cell.teacher, level,
                                                                             cell.format)])
    else:
        inputs = {"annotation": annotation_spec(cell, spec).cell_hash(),
                  **digests(train_sources(cell.dataset, "answer_only"))}  # the questions and their golds
    return cell.model_copy(update={"inputs": inputs})


def identify_trial(trial: TrialSpec, cell: CellSpec, student_digest: str, test_digests: dict[str, str]) -> TrialSpec:
    """The trial with its identified cell and the digests of its student's weights and test data."""
    return trial.model_copy(update={"cell": cell, "inputs": {"student": student_digest, **test_digests}})


def prepare_cells(spec: SweepSpec, verbose: bool = False) -> tuple[dict[CellSpec, dict], dict[CellSpec, str]]:
    """The annotation stage: every cell of the grid -> training Parquet, computed once.

    Released cells are replayed from the data mirror; cells of a generating teacher are written
    by `raydistill.annotate` in one Ray Data pipeline (CPU actors). Cells live under
    `<output_dir>/cells/<cell hash>/` (the hash of the identified cell, `identify_cell`), so every
    student and every sweep sharing the output_dir reuses them, and an edited data or prompt file
    makes a new cell. Returns ({cell: info}, {missing cell: reason}) keyed by the grid's cells;
    info["spec"] is the identified cell. A cell is missing only with `missing_cells: skip`.
    """
    from raydistill.datasets import CellNotReleased, DataUnavailable

    ready: dict[CellSpec, dict] = {}
    missing: dict[CellSpec, str] = {}
    generated: dict[CellSpec, CellSpec] = {}
    for cell in spec.cells():
        try:
            identified = identify_cell(cell, spec)
            if cell.generator is not None:
                generated[cell] = identified
                continue
            ready[cell] = replay_cell(identified, cell_dir(spec.cells_dir, identified))
        except (CellNotReleased, DataUnavailable) as err:
            if spec.missing_cells == "error":
                raise
            missing[cell] = str(err)
            log.warning("cell %s left out: %s", cell.label, err)
    ready.update(generate_cells(spec, generated, verbose))
    return ready, missing


def replay_cell(cell: CellSpec, folder: Path) -> dict:
    """Training Parquet of a released annotation cell (padded to another level's length for the
    length ablation), written once."""
    path = folder / "train.parquet"
    if not _readable_parquet(path):
        files.write_parquet(released_table(cell), path)
        files.write_json(folder / "cell.json", cell.model_dump(mode="json"))
    return {"hash": cell.cell_hash, "dir": str(folder), "source": "replay", "train_path": str(path),
            "annotation": None, "spec": cell.model_dump(mode="json")}


def released_table(cell: CellSpec):
    """The training rows of a released cell: its level's rationales (padded to another level's
    length for the length ablation), the first ``train_limit`` of them."""
    from raydistill.datasets import load_train, pad_to_length_of

    table = load_train(cell.dataset, cell.teacher, level=cell.level, fmt=cell.format, repair=cell.repair_targets)
    if cell.pad_to_level is not None:
        target = load_train(cell.dataset, cell.teacher, level=cell.pad_to_level, fmt=cell.format,
                            repair=cell.repair_targets)
        table = pad_to_length_of(table, target, cell.label)
    if cell.train_limit is not None:
        table = table.slice(0, cell.train_limit)
    return table


def _readable_parquet(path: Path) -> bool:
    """True when `path` is a whole Parquet file; a damaged one is removed so it is written again."""
    if not path.exists():
        return False
    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError) as err:
        log.warning("%s is damaged (%s): writing it again", path, err)
        path.unlink()
        return False


def generate_cells(spec: SweepSpec, cells: dict[CellSpec, CellSpec], verbose: bool = False) -> dict[CellSpec, dict]:
    """Annotate the cells of generating teachers (one pipeline; the request cache is shared).
    ``cells`` maps each grid cell to its identified cell; ``verbose`` as in `init_ray`."""
    if not cells:
        return {}
    from raydistill.annotate import annotate_cells, summary_table

    jobs = []
    for identified in cells.values():
        folder = cell_dir(spec.cells_dir, identified)
        folder.mkdir(parents=True, exist_ok=True)
        files.write_json(folder / "cell.json", identified.model_dump(mode="json"))
        jobs.append((annotation_spec(identified, spec), folder))
    init_ray(verbose)
    run = annotate_cells(jobs, max_spend_usd=spec.annotation.max_spend_usd, mode=spec.annotation.mode,
                         batch=spec.annotation.batch)
    log.info("annotation stage:\n%s", summary_table(run.cells))
    out = {}
    for (cell, identified), result in zip(cells.items(), run.cells):
        if result.kept == 0:
            raise RuntimeError(
                f"annotation cell {cell.label} kept no training rows ({result.failed} of {result.rows} requests "
                f"failed: {result.errors}); see {result.annotations_path}. Fix the teacher endpoint or policy "
                "and rerun: completed requests are cached and will not be sent again")
        summary = {k: v for k, v in result.to_dict().items()
                   if k not in ("annotations_path", "examples_path", "summary_path", "out_dir")}
        out[cell] = {"hash": identified.cell_hash, "dir": result.out_dir, "source": "generated",
                     "train_path": result.examples_path, "annotation": summary,
                     "spec": identified.model_dump(mode="json")}
    return out


def digests_of_test_set(task: str) -> dict[str, str]:
    """Digests of the files a task's test set is read from."""
    from raydistill.datasets import digests, test_sources

    return digests(test_sources(task))


def prepare_test(task: str, limit: int | None, run_dir: Path) -> Path:
    """The task's test set (its first `limit` questions) as Parquet; the name carries the digest
    of its source files, so an edited test file is read again."""
    from raydistill.datasets import load_test

    path = run_dir / "test" / f"{task}-{limit or 'all'}-{content_hash(digests_of_test_set(task))[:12]}.parquet"
    if not _readable_parquet(path):
        table = load_test(task)
        files.write_parquet(table.slice(0, limit) if limit else table, path)
    return path
