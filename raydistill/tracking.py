"""MLflow tracking: one experiment per sweep, one run per trial, logged from the sweep driver.

Trials only write files to the run directory; this Tune callback turns each finished trial into
an MLflow run (params = the trial's axes and hyper-parameters, metrics, the per-step training
loss, predictions Parquet as an artifact). Runs are keyed by the trial hash, so a resumed sweep
never logs a trial twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # mlflow imports litellm when present

from ray import tune  # noqa: E402

TRIAL_HASH_TAG = "raydistill.trial_hash"


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Create (or reuse) the sweep's experiment; artifacts go to `artifact_root`, not ./mlruns."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(experiment, artifact_location=artifact_root.as_uri())


def log_trial(tracking_uri: str, experiment_id: str, record: dict) -> str:
    """Log one finished trial's record (see `sweep.run_trial`) as an MLflow run; returns its id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    existing = client.search_runs([experiment_id], f"tags.`{TRIAL_HASH_TAG}` = '{record['trial_hash']}'")
    if existing:
        return existing[0].info.run_id
    axes = record["axes"]
    run_name = "-".join(f"{k}={v}" for k, v in axes.items() if v != "")
    tags = {TRIAL_HASH_TAG: record["trial_hash"], **{f"axis.{k}": v for k, v in axes.items()}}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = {**axes, **{f"train.{k}": v for k, v in record["train_spec"].items() if k != "lora"},
              **{f"eval.{k}": v for k, v in record["eval_spec"].items()}}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    for key, value in record["metrics"].items():
        client.log_metric(run_id, key, float(value))
    for point in record.get("train_history", []):
        client.log_metric(run_id, "train_loss", point["loss"], step=point["step"])
        client.log_metric(run_id, "learning_rate", point["lr"], step=point["step"])
        if "tokens_per_s" in point:
            client.log_metric(run_id, "train_tokens_per_s", point["tokens_per_s"], step=point["step"])
    if record.get("train_history"):
        client.log_figure(run_id, loss_curve(record["train_history"]), "train_loss.png")
    client.log_artifact(run_id, record["predictions_path"])
    client.log_text(run_id, json.dumps(record, indent=2, default=str), "trial.json")
    client.set_terminated(run_id)
    return run_id


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
    """Logs each trial to MLflow as soon as it completes."""

    def __init__(self, tracking_uri: str, experiment_id: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        record_path = (trial.last_result or {}).get("record_path")
        if record_path:
            log_trial(self.tracking_uri, self.experiment_id, json.loads(Path(record_path).read_text()))
