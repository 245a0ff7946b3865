"""Running a sweep: prepare cells and test sets, run every trial under Ray Tune, track in MLflow, report.

`run_sweep` decides whether every trial fits its GPUs (`raydistill.sweep.fit`) before Ray starts,
writes the plan (`PLAN_FILE`), checks the evaluation engines before any training, and runs the
trials with `TRIAL_DRIVER_RESOURCES` each. Every launch appends its start and end to `RUNS_LOG`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from raydistill import files
from raydistill.records import TrialRecord
from raydistill.evaluate.shared import stop_engine_hosts
from raydistill.spec import CellSpec, SpecError, SweepSpec, TrialSpec, content_hash, storage_problem
from raydistill.sweep.cells import digests_of_test_set, identify_trial, prepare_cells, prepare_test
from raydistill.sweep.cluster import init_ray
from raydistill.sweep.console import SweepConsole, trial_label, trial_name
from raydistill.sweep.fit import Sizes, check_fit
from raydistill.sweep.trial import run_trial

log = logging.getLogger("raydistill.sweep")


PLAN_FILE = "trials.json"  # the sweep's current trials; the report leaves out records of earlier plans
class SweepStopped(RuntimeError):
    """The sweep was stopped (Ctrl-C, `ray job stop`) before every trial finished; a rerun resumes."""


RUNS_LOG = "runs.log"  # one `start` and one `end` line per launch of the sweep (none for a killed one)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def launch_logged(run_dir: Path) -> Iterator[dict]:
    """Append ``start <UTC> host pid`` to the run's `RUNS_LOG`, then ``end <UTC> <outcome>``: the
    trials' count on success, else the exception's type and first line. A killed driver writes no
    end line, so the log's wall times are never guessed. The caller fills ``outcome["trials"]``."""
    path = run_dir / RUNS_LOG

    def append(line: str) -> None:
        with path.open("a") as f:
            f.write(line + "\n")

    append(f"start {_now()} host {socket.gethostname()} pid {os.getpid()}")
    outcome: dict = {}
    try:
        yield outcome
    except BaseException as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        append(f"end {_now()} {type(err).__name__}{': ' + first if first else ''}")
        raise
    append(f"end {_now()} ok, {outcome.get('trials', 0)} trials")

# A trial driver only waits on its Train workers and Ray Data actors, so it takes no CPU; Tune
# cannot place a trial that asks for nothing, hence one byte of memory. `max_concurrent_trials`
# bounds how many trials run at once.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


def run_sweep(spec: SweepSpec, verbose: bool = False) -> list[TrialRecord]:
    """Run every trial of the sweep (skipping finished ones) and return their records.

    The console shows one line per trial event (`raydistill.sweep.console`); ``verbose`` adds
    Tune's status table and every Ray worker's log lines.

    Stages: annotation cells (once per cell, shared by students) -> Tune trials (SFT + eval per
    student, cell and seed) -> MLflow (a parent run for the sweep, a nested run per trial) ->
    report.
    """
    problem = storage_problem(spec.checkpoint_storage) if spec.checkpoint_storage else None
    if problem:  # before any annotation is paid for
        raise SpecError(f"sweep {spec.name}: checkpoint_storage {spec.checkpoint_storage!r}: {problem}")
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with launch_logged(run_dir) as outcome:
        records = _run(spec, run_dir, verbose)
        outcome["trials"] = len(records)
    return records


def _run(spec: SweepSpec, run_dir: Path, verbose: bool) -> list[TrialRecord]:
    """`run_sweep`'s work, logged as one launch."""
    from ray import tune

    from raydistill.report import write_report
    from raydistill.students import resolve_student, weights_digest
    from raydistill.tracking import MLflowTrialLogger, finish_sweep_run, start_sweep_run

    files.write_text(run_dir / "sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    cells, missing = prepare_cells(spec, verbose)
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
    # before any trial (and any GPU node): refuse what cannot fit, or adjust it (docs/cluster.md)
    planned, fits = check_fit(planned, [trial_label(t) for t in planned], Sizes(model_paths, cells, test_paths),
                              run_dir)
    students = {student: weights_digest(path) for student, path in model_paths.items()}
    trials = [identify_trial(t, CellSpec.model_validate(cells[t.cell]["spec"]), students[t.student],
                             tests[t.cell.dataset]) for t in planned]
    files.write_json(run_dir / PLAN_FILE, [{"trial_hash": t.trial_hash, **t.axes()} for t in trials], indent=1)

    init_ray(verbose)
    check_engines(trials)
    parent = start_sweep_run(spec, run_dir / "sweep.yaml")
    payloads = {
        t.trial_hash: {"trial": t.model_dump(mode="json"), "run_dir": str(run_dir), "cell": cells[p],
                       "checkpoint_storage": spec.checkpoint_storage or str(run_dir / "ray"),
                       "test_path": str(test_paths[t.cell.dataset]), "model_path": model_paths[t.student],
                       "fit": fit}
        for p, t, fit in zip((t.cell for t in planned), trials, fits)
    }
    submitted_at = time.time()  # a trial's wait for a slot (timings["queued"]) counts from here
    group = engine_group(run_dir)
    for payload in payloads.values():
        payload.update(submitted_at=submitted_at, engine_group=group)
    names = {t.trial_hash: trial_name(t) for t in trials}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, payloads=payloads), TRIAL_DRIVER_RESOURCES),
        param_space={"trial_hash": tune.grid_search(list(payloads))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent_trials,
            # A finished trial's driver process runs the next trial: its imports (torch,
            # transformers, Ray Train) and process start are paid once per slot, not per trial.
            reuse_actors=True,
            trial_name_creator=lambda trial: names[trial.config["trial_hash"]],
            trial_dirname_creator=lambda trial: names[trial.config["trial_hash"]],
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(run_dir / "ray"),
            callbacks=[MLflowTrialLogger(parent),
                       SweepConsole({t.trial_hash: trial_label(t) for t in trials}, len(trials))],
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=None if verbose else 0,  # Tune's status table only with --verbose
        ),
    )
    try:
        results = tuner.fit()
    finally:
        stop_engine_hosts(group)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(trials)} trials failed; first error: {errors[0]}")
    finished = [r for r in results if "record_path" in (r.metrics or {})]
    if len(finished) < len(trials):  # Tune returns no result for a trial it never started
        raise SweepStopped(f"sweep {spec.name}: stopped with {len(trials) - len(finished)} of {len(trials)} trials "
                           "unfinished; "
                           f"run the same command again to resume (finished trials and checkpoints are kept in "
                           f"{run_dir})")
    records = [TrialRecord.read(r.metrics["record_path"]) for r in finished]
    report = write_report(records, run_dir)
    finish_sweep_run(parent, records, report)
    return records


def engine_group(run_dir: Path) -> str:
    """The name of a sweep's shared evaluation engines (eval.shared_engines): one per run folder."""
    return "sweep-" + content_hash(str(run_dir.resolve()))[:12]


def check_engines(trials: list[TrialSpec]) -> None:
    """Fail before any training when ``eval.engine: vllm`` names nodes that are up but cannot import
    vLLM (`raydistill.evaluate.choose_engine`). Nodes an autoscaler has not started yet are asked
    when the trial evaluates."""
    from raydistill.evaluate import EngineError, choose_engine, engine_nodes

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

