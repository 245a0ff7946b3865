"""Sweep: a Ray Tune grid of trials, one per (student, annotation cell, seed).

    plan      expand the YAML grid into TrialSpecs (`SweepSpec.trials`), each with a content hash
    prepare   annotation cells and test sets -> Parquet once, shared by every trial that needs them
    run       Ray Tune runs `run_trial` (Ray Train SFT -> Ray Data evaluation) for every trial;
              a trial whose record already exists is not recomputed
    track     each finished trial becomes an MLflow run (see `raydistill.tracking`)
    report    results table (Markdown + CSV) and accuracy-vs-granularity plot

    raydistill sweep --config sweeps/granularity.yaml [--set train.epochs=1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

import raydistill
from raydistill import files
from raydistill.datasets import target_ceiling
from raydistill.spec import (CellSpec, SpecError, SweepSpec, TrialSpec, content_hash, load_sweep, parse_overrides,
                             storage_problem)

log = logging.getLogger("raydistill.sweep")

# --------------------------------------------------------------------------- prepare


def cell_dir(cells_dir: Path, cell: CellSpec) -> Path:
    return cells_dir / cell.cell_hash


def annotation_spec(cell: CellSpec, spec: SweepSpec):
    """The `AnnotationSpec` a generating teacher's cell is written with."""
    from raydistill.annotate import AnnotationSpec, QuestionsSpec

    stage = spec.annotation
    runtime = stage.runtime
    if runtime.cache_dir is None:
        runtime = runtime.model_copy(update={"cache_dir": str(spec.cells_dir.parent / "request-cache")})
    return AnnotationSpec(task=cell.dataset, teacher=stage.teachers[cell.teacher], level=cell.level,
                          format=cell.format, policy=stage.policy, show_gold=stage.show_gold, runtime=runtime,
                          questions=QuestionsSpec(limit=cell.train_limit), prompt_dir=stage.prompt_dir)


def identify_cell(cell: CellSpec, spec: SweepSpec) -> CellSpec:
    """The cell with its `inputs` filled: sha256 of every data file it is made from, and for a
    generating teacher the annotation spec's hash (its prompt and exemplar texts included).
    Raises DataUnavailable / CellNotReleased when a released cell's files are not to be had."""
    from raydistill.datasets import digests, train_sources

    if cell.generator is None:
        inputs = digests(train_sources(cell.dataset, cell.teacher, cell.level, cell.format))
    else:
        inputs = {"annotation": annotation_spec(cell, spec).cell_hash(),
                  **digests(train_sources(cell.dataset, "answer_only"))}  # the questions and their golds
    return cell.model_copy(update={"inputs": inputs})


def identify_trial(trial: TrialSpec, cell: CellSpec, student_digest: str, test_digests: dict[str, str]) -> TrialSpec:
    """The trial with its identified cell and the digests of its student's weights and test data."""
    return trial.model_copy(update={"cell": cell, "inputs": {"student": student_digest, **test_digests}})


def prepare_cells(spec: SweepSpec) -> tuple[dict[CellSpec, dict], dict[CellSpec, str]]:
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
    ready.update(generate_cells(spec, generated))
    return ready, missing


def replay_cell(cell: CellSpec, folder: Path) -> dict:
    """Training Parquet of a released annotation cell, written once."""
    from raydistill.datasets import load_train

    path = folder / "train.parquet"
    if not _readable_parquet(path):
        table = load_train(cell.dataset, cell.teacher, level=cell.level, fmt=cell.format, repair=cell.repair_targets)
        if cell.train_limit is not None:
            table = table.slice(0, cell.train_limit)
        files.write_parquet(table, path)
        files.write_json(folder / "cell.json", cell.model_dump(mode="json"))
    return {"hash": cell.cell_hash, "dir": str(folder), "source": "replay", "train_path": str(path),
            "annotation": None, "spec": cell.model_dump(mode="json")}


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


def generate_cells(spec: SweepSpec, cells: dict[CellSpec, CellSpec]) -> dict[CellSpec, dict]:
    """Annotate the cells of generating teachers (one pipeline; the request cache is shared).
    ``cells`` maps each grid cell to its identified cell."""
    if not cells:
        return {}
    from raydistill.annotate import annotate_cells, summary_table

    jobs = []
    for identified in cells.values():
        folder = cell_dir(spec.cells_dir, identified)
        folder.mkdir(parents=True, exist_ok=True)
        files.write_json(folder / "cell.json", identified.model_dump(mode="json"))
        jobs.append((annotation_spec(identified, spec), folder))
    _init_ray()
    run = annotate_cells(jobs)
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


# --------------------------------------------------------------------------- one trial


def run_trial(config: dict) -> dict:
    """Tune trainable: fine-tune the student on the cell, evaluate, write the trial record."""
    from ray import tune

    payload = config["payload"]
    trial = TrialSpec.model_validate(payload["trial"])
    trial_dir = Path(payload["run_dir"]) / "trials" / trial.trial_hash
    record_path = trial_dir / "record.json"
    record = read_record(record_path)
    if record is None:
        record = _train_and_evaluate(trial, payload, trial_dir)
        files.write_json(record_path, record)
    result = {**record["metrics"], "record_path": str(record_path)}
    tune.report(result)
    return result


def read_record(path: Path) -> dict | None:
    """A finished trial's record, or None when the trial must run.

    A damaged record (cut short, not JSON, no metrics) is moved aside as `record.json.corrupt`
    and the trial runs again; its checkpoints and prediction parts are reused.
    """
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            return record
        problem = "no metrics"
    except (OSError, ValueError) as err:
        problem = str(err)
    log.warning("%s is damaged (%s): moved to %s.corrupt, the trial runs again", path, problem, path.name)
    path.replace(path.with_name(path.name + ".corrupt"))
    return None


def _train_and_evaluate(trial: TrialSpec, payload: dict, trial_dir: Path) -> dict:
    from raydistill.evaluate import evaluate
    from raydistill.train import TrainJob, fit

    job = TrainJob(student=trial.student, model_path=payload["model_path"], data_path=payload["cell"]["train_path"],
                   run_name=f"train-{trial.trial_hash}", storage_path=payload["checkpoint_storage"],
                   spec=trial.train.model_dump(mode="json"))
    trained = fit(job, report_to_tune=True, download_to=trial_dir / "model")
    test = pq.read_table(payload["test_path"])
    started = time.perf_counter()
    result = outside_trial_placement_group(
        evaluate, trained.model_path, trial.student, trial.cell.dataset, test, trial.eval,
        trial_dir / "predictions.parquet", trial.grader)
    eval_seconds = time.perf_counter() - started
    state = json.loads((Path(trained.model_path) / "train_state.json").read_text())
    ceiling = target_ceiling(trial.cell.dataset, pq.read_table(payload["cell"]["train_path"]), trial.grader)
    return {
        "trial_hash": trial.trial_hash,
        "eval_hash": result.eval_hash,
        "raydistill_version": raydistill.__version__,
        "axes": trial.axes(),
        "cell": payload["cell"],
        "inputs": trial.inputs,
        "train_spec": trial.train.model_dump(mode="json"),
        "eval_spec": trial.eval.model_dump(mode="json"),
        "eval_protocol": trial.eval.protocol_note(trial.cell.dataset, trial.eval_overrides),
        "grader": trial.grader.label(),
        "engine": result.engine,
        "model_path": trained.model_path,
        "predictions_path": result.predictions_path,
        "train_history": state["history"],
        # what ran: precision, gradient checkpointing, attention, DeepSpeed's accelerator and optimizer
        "train_setup": {k: state.get(k) for k in ("precision", "gradient_checkpointing", "attn_implementation",
                                                 "world_size", "deepspeed")},
        "metrics": {
            "accuracy": result.accuracy,
            "n_test": result.n,
            "extraction_failure_rate": result.extraction_failure_rate,
            "truncation_rate": result.truncation_rate,
            "max_new_tokens": result.max_new_tokens,
            "target_ceiling": ceiling,
            "mean_generated_tokens": result.mean_generated_tokens,
            "train_examples": trained.examples,
            "train_truncated": trained.truncated,
            "train_over_cutoff": trained.over_cutoff,
            "train_padding_fraction": trained.padding_fraction,
            "train_steps": trained.steps,
            "final_train_loss": trained.final_loss,
            "train_seconds": trained.train_seconds,
            "eval_seconds": eval_seconds,
        },
    }


def outside_trial_placement_group(fn, *args, **kwargs):
    """Call `fn` in a zero-CPU Ray task that is not captured by the trial's placement group.

    Tune runs each trial in a placement group that holds only what the trial driver asked for;
    Ray Data tasks and actors started from inside it would be confined to it and never scheduled.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    escaped = ray.remote(num_cpus=0, max_retries=0,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(fn)
    return ray.get(escaped.remote(*args, **kwargs))


# --------------------------------------------------------------------------- the sweep


def _init_ray() -> None:
    """Join the cluster this runs in (`ray job submit`, RAY_ADDRESS) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    # Joins RAY_ADDRESS when set (e.g. inside `ray job submit`), else starts a local cluster of
    # RAYDISTILL_RAY_NUM_CPUS CPUs (default: all of this machine's).
    cpus = os.environ.get("RAYDISTILL_RAY_NUM_CPUS")
    ray.init(num_cpus=int(cpus) if cpus and not os.environ.get("RAY_ADDRESS") else None)


PLAN_FILE = "trials.json"  # the sweep's current trials; the report leaves out records of earlier plans

# A trial driver only waits on its Train workers and Ray Data actors, so it takes no CPU; Tune
# cannot place a trial that asks for nothing, hence one byte of memory. `max_concurrent_trials`
# bounds how many trials run at once.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


def run_sweep(spec: SweepSpec) -> list[dict]:
    """Run every trial of the sweep (skipping finished ones) and return their records.

    Stages: annotation cells (once per cell, shared by students) -> Tune trials (SFT + eval per
    student, cell and seed) -> MLflow (a parent run for the sweep, a nested run per trial) ->
    report.
    """
    from ray import tune

    from raydistill.report import write_report
    from raydistill.students import resolve_student, weights_digest
    from raydistill.tracking import MLflowTrialLogger, finish_sweep_run, start_sweep_run

    problem = storage_problem(spec.checkpoint_storage) if spec.checkpoint_storage else None
    if problem:  # before any annotation is paid for
        raise SpecError(f"sweep {spec.name}: checkpoint_storage {spec.checkpoint_storage!r}: {problem}")
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    cells, missing = prepare_cells(spec)
    _write_missing(missing, run_dir)
    planned = [t for t in spec.trials() if t.cell in cells]
    log.info("sweep %s: %d trials over %d annotation cells (%d left out)", spec.name, len(planned), len(cells),
             len(missing))
    if not planned:
        raise SpecError(f"sweep {spec.name}: no trial left to run; every cell is missing (see {run_dir}/missing_cells.json)")
    datasets = spec.axis_values("datasets")
    test_paths = {task: prepare_test(task, spec.test_limit, run_dir) for task in datasets}
    tests = {task: digests_of_test_set(task) for task in datasets}
    model_paths = {student: str(resolve_student(student)) for student in spec.axis_values("students")}
    students = {student: weights_digest(path) for student, path in model_paths.items()}
    trials = [identify_trial(t, CellSpec.model_validate(cells[t.cell]["spec"]), students[t.student],
                             tests[t.cell.dataset]) for t in planned]
    files.write_json(run_dir / PLAN_FILE, [{"trial_hash": t.trial_hash, **t.axes()} for t in trials], indent=1)

    _init_ray()
    check_engines(trials)
    parent = start_sweep_run(spec, run_dir / "sweep.yaml")
    payloads = [
        {"trial": t.model_dump(mode="json"), "run_dir": str(run_dir), "cell": cells[p],
         "checkpoint_storage": spec.checkpoint_storage or str(run_dir / "ray"),
         "test_path": str(test_paths[t.cell.dataset]), "model_path": model_paths[t.student]}
        for p, t in zip((t.cell for t in planned), trials)
    ]
    tuner = tune.Tuner(
        tune.with_resources(run_trial, TRIAL_DRIVER_RESOURCES),
        param_space={"payload": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent_trials,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(run_dir / "ray"),
            callbacks=[MLflowTrialLogger(parent)],
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(trials)} trials failed; first error: {errors[0]}")
    records = [json.loads(Path(r.metrics["record_path"]).read_text()) for r in results]
    report = write_report(records, run_dir)
    finish_sweep_run(parent, records, report)
    return records


def check_engines(trials: list[TrialSpec]) -> None:
    """Fail before any training when ``eval.engine: vllm`` names nodes that are up but cannot import
    vLLM (`raydistill.engines.choose_engine`). Nodes an autoscaler has not started yet are asked
    when the trial evaluates."""
    from raydistill.engines import EngineError, choose_engine, engine_nodes

    specs = {(t.eval.model_dump_json(), t.cell.dataset): t.eval.for_task(t.cell.dataset) for t in trials
             if t.eval.engine == "vllm"}
    for (_, task), eval_spec in specs.items():
        if engine_nodes(eval_spec):
            try:
                choose_engine(eval_spec)
            except EngineError as err:
                raise SpecError(f"eval for {task}: {err}") from None


def _write_missing(missing: dict[CellSpec, str], run_dir: Path) -> None:
    path = run_dir / "missing_cells.json"
    if missing:
        files.write_json(path, [{"cell": c.label, "reason": r} for c, r in missing.items()])
    elif path.exists():
        path.unlink()


def _trial_name(trial) -> str:
    return "trial-" + TrialSpec.model_validate(trial.config["payload"]["trial"]).trial_hash


def print_summary(spec: SweepSpec) -> None:
    run_dir = spec.run_dir
    print((run_dir / "results.md").read_text())
    print(f"report        : {run_dir / 'results.md'} (CSV: results.csv, results_table.csv, paired_tests.csv)")
    print(f"plot          : {run_dir / 'accuracy_vs_level.png'} (one panel per dataset and student in plots/)")
    print(f"MLflow store  : {spec.tracking_uri}")
    print(f"open the UI   : LITELLM_LOCAL_MODEL_COST_MAP=True mlflow ui --backend-store-uri {spec.tracking_uri} --port 5000")


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message already says what to fix: the sweep CLI prints them in one line."""
    from raydistill.annotate import CacheWriteError, ConfigError
    from raydistill.datasets import CellNotReleased, DataUnavailable, MalformedData
    from raydistill.engines import EngineError
    from raydistill.prompts import PromptError
    from raydistill.students import StudentError
    from raydistill.train import TrainInputError

    return (SpecError, StudentError, DataUnavailable, CellNotReleased, MalformedData, ConfigError, PromptError,
            EngineError, TrainInputError, CacheWriteError)


USER_ERRORS = _user_errors()


def main(argv: list[str], prog: str = "raydistill sweep", default_config: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=default_config is None, default=default_config,
                        help="sweep YAML (see sweeps/*.yaml)" + (f"; default {default_config}" if default_config else ""))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=1 --set levels=[1,6]")
    parser.add_argument("--output-dir", default=os.environ.get("RAYDISTILL_OUTPUT_DIR"),
                        help="parent folder of the sweep's outputs (default: $RAYDISTILL_OUTPUT_DIR, "
                             "else the config's output_dir)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        spec = load_sweep(args.config, overrides)
        run_and_print(spec)
    except USER_ERRORS as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def script_main(script: str) -> int:
    """Entry point of sweeps/<name>.py: runs sweeps/<name>.yaml unless --config names another."""
    path = Path(script).resolve()
    return main(sys.argv[1:], prog=path.name, default_config=str(path.with_suffix(".yaml")))


def run_and_print(spec: SweepSpec) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    records = run_sweep(spec)
    print_summary(spec)
    print(f"wall time     : {time.perf_counter() - started:.0f} s for {len(records)} trials")
    return records

