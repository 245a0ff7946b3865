"""End to end: a tiny granularity sweep through Tune -> Train (DeepSpeed) -> eval -> MLflow -> report.

Real local Ray cluster, real DeepSpeed over gloo, real MLflow on sqlite, real Parquet, training
checkpoints on a local S3 endpoint; the student is a tiny random Llama built on the spot. After a
no-op rerun, one released file of the data mirror is edited: only the trial built from it reruns.
"""

import csv
import json
import os
from pathlib import Path

import mlflow
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from raydistill import answers, stats
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


def test_tiny_sweep_end_to_end(tmp_path, model_cache, s3_storage, ray_local, monkeypatch):
    """Checkpoints go to a bucket on a local S3 endpoint; everything else under output_dir."""
    spec = _tiny_sweep(tmp_path, s3_storage)
    records = [r.model_dump(mode="json") for r in run_sweep(spec)]
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
        assert all(r["eval_hash"] == record["eval_hash"] for r in rows)
        assert all(r["correct"] == answers.is_correct("svamp", r["generation"], r["gold"]) for r in rows)
        assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / TEST_LIMIT)
        assert 0 < m["mean_generated_tokens"] <= 16
        # Truncation: only a row that used all 16 tokens can be cut (no EOS or stop string before).
        assert not any(r["truncated"] for r in rows if r["tokens_generated"] < 16)
        assert m["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in rows) / TEST_LIMIT)
        # Identity: the protocol, overrides, grader, version, input digests and target ceiling are recorded.
        assert record["eval_spec"]["num_beams"] == 1 and record["eval_spec"]["max_new_tokens"] == 16
        assert "overridden: max_new_tokens" in record["eval_protocol"] and record["grader"] == "paper"
        assert record["raydistill_version"] and len(record["inputs"]["student"]) == 64
        assert record["cell"]["spec"]["inputs"]["distilling-cot/train/SVAMP_only_ans.json"]
        assert 0.9 < m["target_ceiling"] <= 1.0
        # Time breakdown: every stage measured, the trial's own stages add up to its wall time,
        # the optimizer steps are the logged steps' time, and the useful share is theirs + generation.
        t = record["timings"]
        own = ["train_start", "train_data", "model_load", "deepspeed_init", "optimizer_steps", "final_save",
               "train_end", "eval_prepare", "eval_first_batch", "grading", "eval_finish", "record"]
        assert all(t[stage] > 0 for stage in [*own, "model_load_eval", "generation"]), t
        assert sum(t[s] for s in [*own, "checkpoints", "eval_generating", "other"] if s in t) == pytest.approx(t["wall"])
        assert t["optimizer_steps"] == pytest.approx(sum(p["step_seconds"] for p in record["train_history"]))
        assert m["train_seconds"] == pytest.approx(sum(t[s] for s in own[:7] + ["checkpoints"] if s in t))
        assert t["useful"] == pytest.approx(t["optimizer_steps"] + t["generation"]) and t["queued"] >= 0
        # CPU seconds of the same work: measured, at most what the workers' threads could use in that time
        assert 0 < t["optimizer_cpu"] <= t["optimizer_steps"] * os.cpu_count() + 0.05
        assert 0 < t["generation_cpu"] <= t["generation"] * os.cpu_count() + 0.05
        assert t["useful_cpu"] == pytest.approx(t["optimizer_cpu"] + t["generation_cpu"])

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
        assert run.data.metrics["time_useful_s"] == pytest.approx(record["timings"]["useful"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions.parquet", "trial.json"} <= artifacts

    # Report: the table has the student's row with both levels, the plot exists.
    table_md = (spec.run_dir / "results.md").read_text()
    row = next(line for line in table_md.splitlines() if "tiny-llama" in line)
    for record in sorted(records, key=lambda r: r["axes"]["level"]):
        assert f"{100 * record['metrics']['accuracy']:.1f}" in row
        if record["metrics"]["truncation_rate"] > 0.05:  # the random student rarely stops: cells are marked
            assert f"{100 * record['metrics']['accuracy']:.1f} [" in row and "†" in row
    assert (spec.run_dir / "accuracy_vs_level.png").stat().st_size > 1000
    cells = _csv(spec.run_dir / "results.csv")
    assert len(cells) == 2 and all(c["ci_method"] == "wilson" for c in cells)
    # The paired test L1 -> L6 is the exact test on the discordant questions of the two predictions.
    by_level = {r["axes"]["level"]: {p["question_id"]: p["correct"] for p in pq.read_table(r["predictions_path"]).to_pylist()}
                for r in records}
    diffs = [int(by_level["6"][q]) - int(by_level["1"][q]) for q in by_level["1"]]
    (paired,) = [t for t in _csv(spec.run_dir / "paired_tests.csv") if t["family"] == "levels"]
    assert float(paired["p_value"]) == pytest.approx(stats.sign_test(diffs).p_value)
    assert int(paired["n_b_better"]) == diffs.count(1) and int(paired["n_a_better"]) == diffs.count(-1)
    assert float(paired["p_holm"]) == pytest.approx(float(paired["p_value"]))  # one comparison
    assert float(paired["min_detectable_diff"]) == pytest.approx(6 / TEST_LIMIT)
    assert "## Weak numbers" in table_md
    useful = sum(r["timings"]["useful"] for r in records) / sum(r["timings"]["wall"] for r in records)
    assert f"Useful share (optimizer steps + generation, of trial time): {100 * useful:.1f} %" in table_md

    # A rerun reuses the finished trials: no training, same records, no duplicate MLflow runs.
    stamps = {p: p.stat().st_mtime_ns for p in (spec.run_dir / "trials").glob("*/record.json")}
    again = [r.model_dump(mode="json") for r in run_sweep(spec)]
    assert {r["trial_hash"] for r in again} == {r["trial_hash"] for r in records}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(client.search_runs([experiment.experiment_id])) == 3  # the parent and two trials

    # Edit the level-1 file in a copy of the mirror: its cell and trial get new hashes and only
    # that trial runs again; the level-6 trial is reused and the report shows the current plan.
    mirror = _mirror_with_edited_level1(tmp_path / "mirror")
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(mirror))
    third = [r.model_dump(mode="json") for r in run_sweep(spec)]
    old = {r["axes"]["level"]: r for r in records}
    new = {r["axes"]["level"]: r for r in third}
    assert new["6"]["trial_hash"] == old["6"]["trial_hash"]
    assert new["1"]["trial_hash"] != old["1"]["trial_hash"]
    assert new["1"]["cell"]["hash"] != old["1"]["cell"]["hash"]
    stamps_after = {p: p.stat().st_mtime_ns for p in stamps}
    six = spec.run_dir / "trials" / old["6"]["trial_hash"] / "record.json"
    assert stamps_after[six] == stamps[six]  # level 6 not retrained
    assert len(client.search_runs([experiment.experiment_id])) == 4  # one new trial run
    assert {c["trial_hash"] for c in _csv(spec.run_dir / "trials.csv")} == {new["1"]["trial_hash"], new["6"]["trial_hash"]}


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _mirror_with_edited_level1(root: Path) -> Path:
    """A data mirror linking every file of the shared one, but for an edited copy of the SVAMP
    GPT-4o level-1 file (its first rationale gets one more sentence)."""
    source = Path(os.environ["RAYDISTILL_DATA_DIR"])
    edited = "distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json"
    for path in source.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.relative_to(source).as_posix() != edited:
                target.symlink_to(path)
    rows = json.loads((source / edited).read_text())
    rows[0]["output"] = "Let us read it carefully. " + rows[0]["output"]
    (root / edited).write_text(json.dumps(rows))
    return root
