"""MLflow tracking: an experiment per sweep, a parent run for the sweep, a nested run per trial.

Trials only write files to the run directory; the sweep driver logs them. The parent run holds
the sweep's config and, at the end, its report (tables, plots). Each finished trial becomes a
nested run: params and `axis.*` tags for every axis (dataset, teacher, level, format, student,
seed), hyper-parameters, metrics, the per-step training loss, the trial config, the predictions
Parquet and the loss plot as artifacts. Runs are keyed by the sweep name and the trial hash, so a
resumed sweep logs nothing twice; a trial's run that a killed driver left unfinished is deleted
and logged again, whole.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # mlflow imports litellm when present

from ray import tune  # noqa: E402

from raydistill.records import TrialRecord  # noqa: E402

TRIAL_HASH_TAG = "raydistill.trial_hash"
EVAL_HASH_TAG = "raydistill.eval_hash"
SWEEP_TAG = "raydistill.sweep"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class SweepRun:
    """Where a sweep's trials are logged: its experiment and parent run."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Create (or reuse) the sweep's experiment; artifacts go to `artifact_root`, not ./mlruns."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    # The kind tag files the experiment under "Machine learning" (its runs, not GenAI traces) where
    # MLflow's UI reads it; MLflow 3.17's UI takes the kind from the address instead (`ui_addresses`).
    return mlflow.create_experiment(experiment, artifact_location=artifact_root.as_uri(),
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def start_sweep_run(spec, config_path: Path) -> SweepRun:
    """Create (or, on resume, reopen) the sweep's parent run and log its config."""
    import mlflow

    experiment_id = setup_experiment(spec.tracking_uri, spec.name, spec.run_dir / "mlartifacts")
    client = mlflow.MlflowClient(spec.tracking_uri)
    found = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{spec.name}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=spec.name, tags={SWEEP_TAG: spec.name}).info.run_id
        grid = {axis: ",".join(map(str, spec.axis_values(axis)))
                for axis in ("datasets", "teachers", "levels", "formats", "students", "seeds")}
        grid["grader"] = spec.grader.label()
        grid["eval.protocol"] = spec.eval.protocol
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in grid.items()])
    client.log_artifact(run_id, str(config_path))
    return SweepRun(spec.tracking_uri, experiment_id, run_id)


def ui_addresses(tracking_uri: str, sweep: str, trial_hashes: list[str] | None = None,
                 base: str = "http://127.0.0.1:5000") -> dict[str, str]:
    """Addresses in `mlflow ui` (served at ``base``) of a sweep's trial runs: "runs", the runs table
    with every trial in a row of its own (sorted by accuracy), and "compare", MLflow's compare view
    of the trials (``trial_hashes``, default all of the sweep's runs): their axes and settings side
    by side, accuracy, and parallel-coordinates and scatter plots of the axes against the metrics.

    ``workflowType=machine_learning`` opens MLflow 3.17's UI on training runs rather than GenAI
    traces; a sort key other than the start time lists child runs flat instead of folded under
    the sweep's parent run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(sweep).experiment_id
    parents = client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = '{sweep}'")
    runs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'",
                              order_by=["attributes.run_name"]) if parents else []
    wanted = set(trial_hashes) if trial_hashes is not None else None
    ids = [run.info.run_id for run in runs if wanted is None or run.data.tags.get(TRIAL_HASH_TAG) in wanted]
    return {
        "runs": f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning&orderByKey="
                + quote("metrics.`accuracy`") + "&orderByAsc=false",
        "compare": f"{base}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([experiment]))}",
    }


def finish_sweep_run(sweep: SweepRun, records: list[TrialRecord], report: dict[str, Path]) -> None:
    """Attach the report to the parent run and close it."""
    import mlflow

    client = mlflow.MlflowClient(sweep.tracking_uri)
    client.log_metric(sweep.run_id, "trials", len(records))
    for path in report.values():
        if Path(path).is_file():
            client.log_artifact(sweep.run_id, str(path), "report")
    client.set_terminated(sweep.run_id)


def log_trial(sweep: SweepRun, record: TrialRecord) -> str:
    """Log one finished trial's record (see `sweep.run_trial`) as a nested run; returns its id."""
    import mlflow

    client = mlflow.MlflowClient(sweep.tracking_uri)
    existing = client.search_runs([sweep.experiment_id], f"tags.`{TRIAL_HASH_TAG}` = '{record.trial_hash}'")
    finished = [run for run in existing if run.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    for run in existing:  # left half-logged by a driver killed while logging it: log the trial again, whole
        client.delete_run(run.info.run_id)
    axes = record.axes
    cell = record.cell or {}
    level = f"L{axes['level']}" if axes["level"] else "no-level"
    run_name = f"{axes['student']} {level} {axes['teacher']} {axes['format']} {axes['dataset']} seed{axes['seed']}"
    # hashes are tags (identities, not settings to compare runs by); axes and settings are params
    tags = {TRIAL_HASH_TAG: record.trial_hash, PARENT_TAG: sweep.run_id, EVAL_HASH_TAG: record.eval_hash,
            **{f"axis.{k}": v for k, v in axes.items()},
            "cell.hash": cell.get("hash", ""), "cell.source": cell.get("source", "")}
    # the run spans the trial itself (MLflow's duration and time axis), not the moment it was logged
    started, finished = _ms(record.started_at), _ms(record.finished_at)
    run_id = client.create_run(sweep.experiment_id, start_time=started, run_name=run_name, tags=tags).info.run_id
    params = {**axes, **{f"train.{k}": v for k, v in record.train_spec.items()},
              **{f"eval.{k}": v for k, v in record.eval_spec.items()},
              "eval_protocol": record.eval_protocol, "grader": record.grader,
              "raydistill_version": record.raydistill_version}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    metrics = record.metrics.model_dump()
    annotation = cell.get("annotation") or {}
    for key in ("cost_usd", "tokens_in", "tokens_out", "teacher_accuracy", "truncated_share"):
        if annotation.get(key) is not None:
            metrics[f"teacher_{key}"] = annotation[key]
    metrics.update({f"time_{stage}_s": seconds for stage, seconds in record.timings.items()})
    at_ms = finished or int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), at_ms, 0) for k, v in metrics.items()
                                      if v is not None])
    for point in record.train_history:
        client.log_metric(run_id, "train_loss", point["loss"], step=point["step"])
        client.log_metric(run_id, "learning_rate", point["lr"], step=point["step"])
        if "tokens_per_s" in point:
            client.log_metric(run_id, "train_tokens_per_s", point["tokens_per_s"], step=point["step"])
    if record.train_history:
        client.log_figure(run_id, loss_curve(record.train_history), "train_loss.png")
    client.log_artifact(run_id, record.predictions_path)
    client.log_text(run_id, json.dumps(record.model_dump(mode="json"), indent=2), "trial.json")
    client.set_terminated(run_id, end_time=finished)
    return run_id


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def loss_curve(history: list[dict]):
    """Matplotlib figure of the training loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p["step"] for p in history], [p["loss"] for p in history], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    fig.tight_layout()
    plt.close(fig)
    return fig


class MLflowTrialLogger(tune.Callback):
    """Logs each trial to MLflow as a nested run of the sweep as soon as it completes."""

    def __init__(self, sweep: SweepRun):
        self.sweep = sweep

    def on_trial_complete(self, iteration, trials, trial, **info):
        record_path = (trial.last_result or {}).get("record_path")
        if record_path:
            log_trial(self.sweep, TrialRecord.read(record_path))
