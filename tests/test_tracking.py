"""MLflow logging of trials survives a driver killed in the middle of it (real MLflow, sqlite)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow

from raydistill import tracking
from raydistill.records import TrialRecord

REPO = Path(__file__).resolve().parents[1]


def _record(tmp_path: Path) -> dict:
    predictions = tmp_path / "predictions.parquet"
    predictions.write_bytes(b"PAR1")
    return {
        "trial_hash": "f" * 64, "axes": {"dataset": "svamp", "teacher": "chatgpt", "level": "2", "format": "cot",
                                         "student": "tiny-llama", "seed": 100},
        "cell": {"hash": "c" * 16, "source": "replay"}, "train_spec": {"epochs": 1}, "eval_spec": {"max_new_tokens": 8},
        "metrics": {"accuracy": 0.5, "n_test": 6, "train_seconds": 12.0},
        "train_history": [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "lr": 1e-3}],
        "predictions_path": str(predictions),
    }


# Runs log_trial in a process that SIGKILLs itself on the trial's second MLflow batch: after its
# run exists, before its metrics are in (a driver killed while logging).
DIES_WHILE_LOGGING = textwrap.dedent("""
    import json, os, signal, sys
    import mlflow
    from raydistill import tracking
    from raydistill.records import TrialRecord

    sweep = tracking.SweepRun(*sys.argv[1:4])
    batches = []
    log_batch = mlflow.MlflowClient.log_batch

    def log_batch_then_die(self, *args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return log_batch(self, *args, **kwargs)

    mlflow.MlflowClient.log_batch = log_batch_then_die
    tracking.log_trial(sweep, TrialRecord.read(sys.argv[4]))
""")


def test_a_trial_run_left_by_a_driver_killed_while_logging_is_logged_again_whole(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.setup_experiment(uri, "killed", tmp_path / "mlartifacts")
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(experiment, run_name="killed").info.run_id
    record = _record(tmp_path)
    (tmp_path / "record.json").write_text(json.dumps(record))
    typed = TrialRecord.model_validate(record)

    killed = subprocess.run([sys.executable, "-c", DIES_WHILE_LOGGING, uri, experiment, parent,
                             str(tmp_path / "record.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    query = f"tags.`{tracking.TRIAL_HASH_TAG}` = '{record['trial_hash']}'"
    [half] = client.search_runs([experiment], query)
    assert half.info.status == "RUNNING" and not half.data.metrics  # what the kill left

    run_id = tracking.log_trial(tracking.SweepRun(uri, experiment, parent), typed)
    [run] = client.search_runs([experiment], query)
    assert run.info.run_id == run_id != half.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accuracy"] == 0.5 and run.data.metrics["n_test"] == 6
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [2.0, 1.5]
    assert tracking.log_trial(tracking.SweepRun(uri, experiment, parent), typed) == run_id  # logged once


def test_a_trial_run_spans_the_trial_and_carries_its_hashes_as_tags(tmp_path):
    """MLflow's duration and time axis are the trial's own (not the moment it was logged, long after
    it started), and identities are tags, so the comparison views offer only axes and settings."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.setup_experiment(uri, "times", tmp_path / "mlartifacts")
    parent = mlflow.MlflowClient(uri).create_run(experiment, run_name="times").info.run_id
    started, finished = 1_790_000_000.25, 1_790_000_754.5  # a 754 s trial, logged now
    typed = TrialRecord.model_validate({**_record(tmp_path), "eval_hash": "e" * 64, "started_at": started,
                                        "finished_at": finished})
    run = mlflow.MlflowClient(uri).get_run(tracking.log_trial(tracking.SweepRun(uri, experiment, parent), typed))
    assert (run.info.start_time, run.info.end_time) == (1_790_000_000_250, 1_790_000_754_500)
    assert run.data.tags[tracking.EVAL_HASH_TAG] == "e" * 64 and run.data.tags[tracking.TRIAL_HASH_TAG] == "f" * 64
    assert "eval_hash" not in run.data.params and run.data.params["level"] == "2"
