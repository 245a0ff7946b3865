"""One sweep trial: the Ray Tune trainable `run_trial` (Ray Train SFT -> Ray Data evaluation -> trial record).

A trial whose record already exists is not recomputed; a damaged record is set aside and the
trial runs again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

import raydistill
from raydistill.datasets import target_ceiling
from raydistill.records import ACTOR_STAGES, CPU_STAGES, RecordError, TrainState, TrialRecord
from raydistill.spec import TrialSpec
from raydistill.evaluate.shared import host_cpus
from raydistill.sweep.console import report_stage

log = logging.getLogger("raydistill.sweep")


def run_trial(config: dict, payloads: dict[str, dict]) -> dict:
    """Tune trainable: fine-tune the student on the cell, evaluate, write the trial record.

    ``config["trial_hash"]`` picks the trial's payload (its spec, cell, paths) from ``payloads``.
    """
    from ray import tune

    payload = payloads[config["trial_hash"]]
    started_at = time.time()
    trial = TrialSpec.model_validate(payload["trial"])
    trial_dir = Path(payload["run_dir"]) / "trials" / trial.trial_hash
    record_path = trial_dir / "record.json"
    record = read_record(record_path)
    reused = record is not None
    if not reused:
        record = _train_and_evaluate(trial, payload, trial_dir)
        record.timings["queued"] = max(0.0, started_at - payload.get("submitted_at", started_at))
        record.started_at, record.finished_at = started_at, time.time()
        record.write(record_path)
    result = {**record.metrics.model_dump(), "record_path": str(record_path), "reused": reused,
              **{f"time_{stage}_s": record.timings[stage] for stage in ("wall", "useful") if stage in record.timings}}
    tune.report(result)
    return result


def read_record(path: Path) -> TrialRecord | None:
    """A finished trial's record, or None when the trial must run.

    A damaged record (cut short, not JSON, no metrics) is moved aside as `record.json.corrupt`
    and the trial runs again; its checkpoints and prediction parts are reused.
    """
    if not path.exists():
        return None
    try:
        return TrialRecord.read(path)
    except RecordError as err:
        problem = str(err).removeprefix(f"{path}: ")
    log.warning("%s is damaged (%s): moved to %s.corrupt, the trial runs again", path, problem, path.name)
    path.replace(path.with_name(path.name + ".corrupt"))
    return None


def _train_and_evaluate(trial: TrialSpec, payload: dict, trial_dir: Path) -> TrialRecord:
    from raydistill.evaluate import evaluate
    from raydistill.train import TRAIN_STATE_FILE, TrainJob

    job = TrainJob(student=trial.student, model_path=payload["model_path"], data_path=payload["cell"]["train_path"],
                   run_name=f"train-{trial.trial_hash}", storage_path=payload["checkpoint_storage"],
                   spec=trial.train)
    started = time.perf_counter()
    report_stage("training")
    trained = fit_reporting_steps(job, trial_dir)
    report_stage("evaluating")
    test = pq.read_table(payload["test_path"])
    eval_started = time.perf_counter()
    result = outside_trial_placement_group(
        evaluate, trained.model_path, trial.student, trial.cell.dataset, test, trial.eval,
        trial_dir / "predictions.parquet", trial.grader, engine_group=payload["engine_group"],
        engine_slot=trial_slot(), num_cpus=host_cpus(trial.eval))
    eval_seconds = time.perf_counter() - eval_started
    record_started = time.perf_counter()
    state = TrainState.read(Path(trained.model_path) / TRAIN_STATE_FILE)
    ceiling = target_ceiling(trial.cell.dataset, pq.read_table(payload["cell"]["train_path"]), trial.grader)
    timings = trial_timings(trained.timings, result.timings, eval_seconds, time.perf_counter() - record_started,
                            time.perf_counter() - started)
    return TrialRecord.parse({
        "trial_hash": trial.trial_hash,
        "eval_hash": result.eval_hash,
        "raydistill_version": raydistill.__version__,
        "axes": trial.axes(),
        "cell": payload["cell"],
        "inputs": trial.inputs,
        "train_spec": trial.train.model_dump(mode="json"),
        "eval_spec": trial.eval.model_dump(mode="json"),
        "eval_protocol": trial.eval.protocol_note(trial.cell.dataset, trial.eval_overrides),
        # the sweep's memory decision (raydistill.sweep.fit): estimates, adjusted micro-batch, generate sub-batch
        "fit": payload.get("fit"),
        "grader": trial.grader.label(),
        "engine": result.engine,
        "model_path": trained.model_path,
        "predictions_path": result.predictions_path,
        "train_history": state.history,
        # what ran: precision, gradient checkpointing, attention, DeepSpeed's accelerator and optimizer
        "train_setup": state.model_dump(include={"precision", "gradient_checkpointing", "attn_implementation",
                                                 "world_size", "deepspeed"}),
        "metrics": {
            "accuracy": result.accuracy,
            "n_test": result.n,
            "extraction_failure_rate": result.extraction_failure_rate,
            "truncation_rate": result.truncation_rate,
            "empty_rate": result.empty_rate,
            "think_unfinished_rate": result.think_unfinished_rate,
            "mean_think_tokens": result.mean_think_tokens,
            "mean_answer_tokens": result.mean_answer_tokens,
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
            "samples_per_question": result.samples_per_question,
            "pass_at_k": result.pass_at_k,
            "maj_at_k": result.maj_at_k,
        },
        "timings": timings,
    }, f"trial {trial.trial_hash}")


PROGRESS_POLL_S = 2.0  # how often a training trial looks for new checkpoint steps to report


def fit_reporting_steps(job, trial_dir: Path):
    """`fit` the job, telling the console each checkpoint's step and loss as the run reports it.

    The run appends them to a file in the trial folder (`progress_callback`; its controller runs on
    this node) and this thread reports the new lines to Tune while `fit` runs in another. Ray's own
    relay (`TuneReportCallback`) starts a queue actor per trial that Tune polls five times a second.
    """
    import json
    from concurrent.futures import ThreadPoolExecutor, wait

    from ray import tune

    from raydistill.train import fit

    trial_dir.mkdir(parents=True, exist_ok=True)
    progress = trial_dir / "train_progress.jsonl"
    progress.unlink(missing_ok=True)
    reported = 0

    def report_new_lines() -> None:
        nonlocal reported
        text = progress.read_text() if progress.exists() else ""
        lines = text[:text.rfind("\n") + 1].splitlines()  # whole lines: one may be being written
        for line in lines[reported:]:
            tune.report(json.loads(line))
        reported = max(reported, len(lines))

    with ThreadPoolExecutor(1, thread_name_prefix="fit") as pool:
        running = pool.submit(fit, job, progress_file=progress, download_to=trial_dir / "model")
        while not wait([running], timeout=PROGRESS_POLL_S).done:
            report_new_lines()
        report_new_lines()
        return running.result()


def trial_timings(train: dict[str, float], evaluation: dict[str, float], eval_seconds: float, record_seconds: float,
                  wall: float) -> dict[str, float]:
    """The trial's time by stage (`raydistill.records.TIME_STAGES`): training's and evaluation's
    own, the start of the evaluation task (into eval_prepare), the record, and the rest (other)."""
    timings = {**train, **evaluation, "record": record_seconds}
    own_eval = sum(v for k, v in evaluation.items() if k not in ACTOR_STAGES)
    timings["eval_prepare"] = timings.get("eval_prepare", 0.0) + max(0.0, eval_seconds - own_eval)
    timings["other"] = max(0.0, wall - sum(v for k, v in timings.items() if k not in (*ACTOR_STAGES, *CPU_STAGES)))
    timings["wall"] = wall
    if "generation" in timings or "eval_first_batch" not in timings:  # unknown when the engine did not time it
        timings["useful"] = timings.get("optimizer_steps", 0.0) + timings.get("generation", 0.0)
        timings["useful_cpu"] = timings.get("optimizer_cpu", 0.0) + timings.get("generation_cpu", 0.0)
    return timings


def trial_slot() -> str:
    """The trial driver process this trial runs in (a Ray actor), which Tune hands to the next trial
    when this one ends (`reuse_actors`): one of the sweep's ``max_concurrent_trials`` slots."""
    import ray

    return "slot-" + ray.get_runtime_context().get_actor_id()[:12]


def outside_trial_placement_group(fn, *args, num_cpus: float = 0, **kwargs):
    """Call `fn` in a Ray task (of ``num_cpus`` CPUs, default none) that is not captured by the
    trial's placement group.

    Tune runs each trial in a placement group that holds only what the trial driver asked for;
    Ray Data tasks and actors started from inside it would be confined to it and never scheduled.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    escaped = ray.remote(num_cpus=num_cpus, max_retries=0,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(fn)
    return ray.get(escaped.remote(*args, **kwargs))
