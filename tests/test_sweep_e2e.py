"""End to end: a tiny granularity sweep through Tune -> Train (DeepSpeed) -> eval -> MLflow -> report.

Real local Ray cluster, real DeepSpeed over gloo, real MLflow on sqlite, real Parquet, training
checkpoints on a local S3 endpoint; the student is a tiny random Llama built on the spot.
"""


from pathlib import Path

import mlflow
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from raydistill import answers
from raydistill.schemas import PREDICTION_SCHEMA
from raydistill.spec import sweep_from_dict
from raydistill.sweep import run_sweep

pytestmark = pytest.mark.slow

TEST_LIMIT = 12


def _tiny_sweep(tmp_path, checkpoint_storage):
    return sweep_from_dict({
        "name": "tiny", "output_dir": str(tmp_path), "checkpoint_storage": checkpoint_storage,
        "datasets": ["svamp"], "teachers": ["chatgpt"],
        "levels": [1, 6], "students": ["tiny-llama"], "train_limit": 32, "test_limit": TEST_LIMIT,
        "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 2,
                  "zero_stage": 3, "cutoff_len": 256, "learning_rate": 3e-3},
        "eval": {"engine": "hf", "max_new_tokens": 16, "batch_size": 8, "num_actors": 1},
    })


def test_tiny_sweep_end_to_end(tmp_path, model_cache, s3_storage, ray_local):
    """Checkpoints go to a bucket on a local S3 endpoint; everything else under output_dir."""
    spec = _tiny_sweep(tmp_path, s3_storage)
    records = run_sweep(spec)
    assert sorted(r["axes"]["level"] for r in records) == ["1", "6"]

    bucket, prefix = pyarrow.fs.FileSystem.from_uri(s3_storage)
    for record in records:
        # Training: checkpoints in the bucket, the final model copied into the trial's folder.
        model = Path(record["model_path"])
        assert model.parent == spec.run_dir / "trials" / record["trial_hash"] / "model"
        stored = bucket.get_file_info(f"{prefix}/train-{record['trial_hash']}/{model.name}/config.json")
        assert stored.type == pyarrow.fs.FileType.File
        assert not (spec.run_dir / "ray" / f"train-{record['trial_hash']}").exists()
        m = record["metrics"]
        # Training: DeepSpeed ran the expected optimizer steps and the loss went down.
        assert m["train_examples"] == 32 and m["train_steps"] == 2 * 32 // 8
        losses = [p["loss"] for p in record["train_history"]]
        assert len(losses) == m["train_steps"] and losses[-1] < losses[0]
        # Evaluation: one graded row per test question, grades recomputable from the generations.
        table = pq.read_table(record["predictions_path"])
        assert table.schema.equals(PREDICTION_SCHEMA)
        rows = table.to_pylist()
        assert len(rows) == TEST_LIMIT == m["n_test"]
        assert len({r["question_id"] for r in rows}) == TEST_LIMIT
        assert all(r["cell_hash"] == record["trial_hash"] for r in rows)
        assert all(r["correct"] == answers.is_correct("svamp", r["generation"], r["gold"]) for r in rows)
        assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / TEST_LIMIT)
        assert 0 < m["mean_generated_tokens"] <= 16

    # MLflow: a parent run for the sweep (config + report), a nested run per trial with axes as
    # params and tags, accuracy as metric, predictions as artifact.
    client = mlflow.MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`raydistill.sweep` = 'tiny'")
    assert {"sweep.yaml", "report"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "results.md" in {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(runs) == 2
    assert all(run.data.tags["axis.teacher"] == "chatgpt" and run.data.tags["cell.source"] == "replay" for run in runs)
    by_level = {run.data.params["level"]: run for run in runs}
    for record in records:
        run = by_level[record["axes"]["level"]]
        assert run.data.params["student"] == "tiny-llama" and run.data.params["teacher"] == "chatgpt"
        assert run.data.metrics["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == record["metrics"]["train_steps"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions.parquet", "trial.json"} <= artifacts

    # Report: the table has the student's row with both levels, the plot exists.
    table_md = (spec.run_dir / "results.md").read_text()
    row = next(line for line in table_md.splitlines() if "tiny-llama" in line)
    for record in sorted(records, key=lambda r: r["axes"]["level"]):
        assert f"{100 * record['metrics']['accuracy']:.1f}" in row
    assert (spec.run_dir / "accuracy_vs_level.png").stat().st_size > 1000
    assert len((spec.run_dir / "results.csv").read_text().splitlines()) == 3

    # A rerun reuses the finished trials: no training, same records, no duplicate MLflow runs.
    stamps = {p: p.stat().st_mtime_ns for p in (spec.run_dir / "trials").glob("*/record.json")}
    again = run_sweep(spec)
    assert {r["trial_hash"] for r in again} == {r["trial_hash"] for r in records}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(client.search_runs([experiment.experiment_id])) == 3  # the parent and two trials
