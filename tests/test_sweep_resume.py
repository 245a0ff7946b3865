"""Sweeps that survive their driver and share annotation cells, with secrets kept out of outputs.

Each test runs the real sweep script (`sweeps/granularity.py`) as a separate process, on a local
Ray cluster of its own, with tiny students and tiny subsets.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from openai_server import ServerProcess
from sweep_console import check_quiet_console

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SENTINEL_KEY = "sk-raydistill-sentinel-7f3a9c"

TINY = {
    "datasets": ["svamp"], "formats": ["cot"], "students": ["tiny-llama"], "seeds": [100],
    "train_limit": 16, "test_limit": 6,
    "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 1,
              "cpus_per_worker": 1, "zero_stage": 2, "cutoff_len": 256, "learning_rate": 3e-3},
    "eval": {"engine": "hf", "max_new_tokens": 8, "batch_size": 8, "num_actors": 1},
}


def _config(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name, "output_dir": str(tmp_path / "outputs"), **fields}))
    return path


def _ray_tmpdir(tmp_path: Path) -> Path:
    """A short private folder for Ray's sessions (its socket paths must stay under 108 bytes)."""
    link = tmp_path / "ray"
    if not link.exists():
        link.symlink_to(tempfile.mkdtemp(prefix="rd-ray-"))
    return link.resolve()


def _start_sweep(config: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": str(_ray_tmpdir(log.parent)), **(env or {})}
    return subprocess.Popen([sys.executable, str(REPO / "sweeps" / "granularity.py"), "--config", str(config)],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run_sweep(config: Path, log: Path, env: dict | None = None, timeout: float = 900) -> None:
    proc = _start_sweep(config, log, env)
    try:
        assert proc.wait(timeout) == 0, log.read_text()[-4000:]
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen, grace: float = 60) -> None:
    """Wait for the driver and the Ray cluster it started to go, then kill what is left. The node's
    dashboard and runtime-env agents outlive their raylet (by more than 50 s here) and do no work
    of the sweep: they are not waited for, only killed with the rest of the driver's process group.
    (The driver's own zombie is reaped first: it kept the group alive for the whole grace.)"""
    deadline = time.time() + grace
    while time.time() < deadline and _cluster_alive(proc):
        time.sleep(0.2)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# How the agents of a node name themselves (process title) or are started (script path).
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/main.py")


def _cluster_alive(proc: subprocess.Popen) -> bool:
    """Whether the driver, or a process of its group other than a zombie or a node agent (the GCS,
    the raylet, Tune's and Train's workers), still runs."""
    if proc.poll() is None:  # also reaps the driver once it has ended
        return True
    for other in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getpgid(other.pid) != proc.pid or other.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except ProcessLookupError:
            continue
        if not any(agent in " ".join(other.info["cmdline"] or ()) for agent in RAY_AGENTS):
            return True
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _actors_started(ray_tmpdir: Path) -> dict[str, int]:
    """How many processes of each actor class the latest Ray session started (Ray names the class
    on a worker log's first `:actor_name:` line)."""
    session = max(ray_tmpdir.glob("ray/session_2*"))
    counts: dict[str, int] = {}
    for log in (session / "logs").glob("worker-*.out"):
        names = [line.split(":", 2)[2] for line in log.read_text(errors="replace").splitlines()
                 if line.startswith(":actor_name:")]
        if names:
            counts[names[0]] = counts.get(names[0], 0) + 1
    return counts


def _records(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/record.json")}


def _trial_runs(tracking_uri: str, sweep: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(sweep)
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`raydistill.sweep` = '{sweep}'")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_killed_driver_rerun_skips_finished_trials(tmp_path, model_cache):
    config = _config(tmp_path, "resume", teachers=["chatgpt"], levels=[1, 6],
                     eval={**TINY["eval"], "shared_engines": True})
    run_dir = tmp_path / "outputs" / "resume"

    # First attempt: SIGKILL the driver as soon as the first trial has finished.
    _kill_sweep_when(config, tmp_path / "first.log", lambda: _records(run_dir))
    finished = _records(run_dir)
    assert len(finished) == 1
    assert not (run_dir / "results.csv").exists()

    # Rerun: the finished trials are not trained or evaluated again, the table is complete.
    _run_sweep(config, tmp_path / "second.log")
    records = _records(run_dir)
    assert len(records) == 2
    assert {p: records[p] for p in finished} == finished
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2
    # runs.log: both launches started, only the rerun ended (the killed one wrote no end line)
    launches = (run_dir / "runs.log").read_text().splitlines()
    assert [line.split()[0] for line in launches] == ["start", "start", "end"], launches
    assert launches[2].endswith(" ok, 2 trials")
    assert [line for line in (run_dir / "results.md").read_text().splitlines() if "tiny-llama" in line]

    # MLflow: one nested run per trial under the sweep's one parent run, none logged twice.
    runs = _trial_runs(f"sqlite:///{run_dir / 'mlflow.db'}", "resume")
    assert sorted(run.data.tags["axis.level"] for run in runs) == ["1", "6"]

    # The console names each trial by its axes, says which one was reused and which ran through
    # which stage, and leaves Tune's table and the Ray workers' log lines out.
    console = (tmp_path / "second.log").read_text()
    [done] = {json.loads(p.read_text())["axes"]["level"] for p in finished}
    [other] = {"1", "6"} - {done}
    assert re.search(rf"\] svamp chatgpt L{done} cot tiny-llama seed 100: done, reused its record, accuracy", console)
    for stage in ("training", "evaluating", "done, accuracy"):
        assert f"] svamp chatgpt L{other} cot tiny-llama seed 100: {stage}" in console
    assert "Trial status:" not in console and "(RayTrainWorker" not in console
    assert "Setting accelerator to CPU" not in console  # DeepSpeed's warning in every worker
    check_quiet_console(console, run_dir)  # raydistill's own lines only; Ray's and Tune's in sweep.log

    # The local cluster runs what the sweep needs only: both trials of the rerun (one at a time)
    # went through one Tune trial process (reuse_actors), the one it evaluated went to the shared
    # HF engine of that slot, and no Train run started a preemption watcher or a queue actor to
    # relay its reports to Tune.
    started = _actors_started(_ray_tmpdir(tmp_path))
    assert started.get("ImplicitFunc") == 1 and started.get("EngineHost") == 1, started
    assert started.get("TrainController") == 1, started
    assert "PreemptionWatcher" not in started and "_QueueActor" not in started, started


def test_generated_cell_shared_by_students_and_secrets_stay_out(tmp_path, model_cache):
    key_sha256 = hashlib.sha256(SENTINEL_KEY.encode()).hexdigest()
    with ServerProcess(tmp_path / "server", policy="fixed", fixed_answer="7", expect_key_sha256=key_sha256) as server:
        teacher = {"model": "openai/local-teacher", "api_base": server.base_url,
                   "api_key_env": "RAYDISTILL_TEST_TEACHER_KEY", "max_tokens": 256,
                   "input_cost_per_token": 2e-6, "output_cost_per_token": 8e-6}
        annotation = {"teachers": {"local": teacher}, "runtime": {"concurrency": 8, "num_actors": 1}}
        env = {"RAYDISTILL_TEST_TEACHER_KEY": SENTINEL_KEY}

        first = _config(tmp_path, "first", teachers=["local"], levels=[2], annotation=annotation)
        _run_sweep(first, tmp_path / "first.log", env)
        sent = server.log_entries()
        assert len(sent) == TINY["train_limit"]
        assert all(entry["auth"] for entry in sent)  # the key from the environment reached the teacher

        # A second student in another sweep over the same output_dir: the cell is reused.
        second = _config(tmp_path, "second", teachers=["local"], levels=[2], annotation=annotation,
                         students=["tiny-llama-alpaca"])
        _run_sweep(second, tmp_path / "second.log", env)
        assert len(server.log_entries()) == len(sent)

    out = tmp_path / "outputs"
    [cell] = {json.loads(p.read_text())["cell"]["hash"] for p in out.glob("*/trials/*/record.json")}
    assert (out / "cells" / cell / "examples.parquet").exists()
    records = [json.loads(p.read_text()) for p in out.glob("*/trials/*/record.json")]
    assert sorted(r["axes"]["student"] for r in records) == ["tiny-llama", "tiny-llama-alpaca"]
    assert all(r["cell"]["source"] == "generated" and r["cell"]["annotation"]["rows"] == 16 for r in records)

    # The sentinel key is in no output file, MLflow param, tag or metric, or log.
    leaks = [p for p in [*out.rglob("*"), *tmp_path.glob("*.log"), *_ray_tmpdir(tmp_path).rglob("*")]
             if p.is_file() and SENTINEL_KEY.encode() in p.read_bytes()]
    assert not leaks
    # The teacher's cost, from the rows it is made of to MLflow and the report, in both sweeps.
    rows = pq.read_table(out / "cells" / cell / "annotations.parquet").to_pylist()
    assert all(r["cost_usd"] == pytest.approx(r["tokens_in"] * 2e-6 + r["tokens_out"] * 8e-6) for r in rows)
    cell_cost = sum(r["cost_usd"] for r in rows)
    assert cell_cost > 0
    for sweep in ("first", "second"):
        tracking_uri = f"sqlite:///{out / sweep / 'mlflow.db'}"
        [run] = _trial_runs(tracking_uri, sweep)
        assert run.data.tags["cell.source"] == "generated"
        assert run.data.metrics["teacher_cost_usd"] == pytest.approx(cell_cost)
        [reported] = list(csv.DictReader((out / sweep / "results.csv").open()))
        assert float(reported["teacher_cost_usd"]) == pytest.approx(cell_cost)
        assert SENTINEL_KEY not in json.dumps([run.data.params, run.data.tags, run.data.metrics])


def test_sweep_killed_in_training_then_in_evaluation_resumes_both(tmp_path, model_cache):
    """SIGKILL the driver once a checkpoint exists, then again once evaluation wrote its first batch:
    each rerun takes up where the last one stopped, and the third finishes the trial."""
    config = _config(tmp_path, "kills", teachers=["chatgpt"], levels=[1], test_limit=16,
                     train={**TINY["train"], "epochs": 10, "checkpoint_every_steps": 4},
                     eval={**TINY["eval"], "batch_size": 1, "max_new_tokens": 16})
    run_dir = tmp_path / "outputs" / "kills"

    # 1. Killed in training, after its first checkpoint (20 steps planned; checkpoints every 4 steps
    #    and at each epoch's end, every 2).
    _kill_sweep_when(config, tmp_path / "first.log", lambda: _latest_checkpoint(run_dir) is not None)
    saved = _latest_checkpoint(run_dir)
    assert not saved.endswith("_final"), "training finished before the kill"
    assert not list(run_dir.glob("trials/*/predictions.parquet.parts"))

    # 2. Rerun, killed once evaluation has written its first batch of predictions.
    _kill_sweep_when(config, tmp_path / "second.log", lambda: _prediction_parts(run_dir))
    assert not _records(run_dir), "the trial finished before the kill"
    # the resumed run's checkpointed steps reached the console, with the run's step count
    assert re.search(r"svamp chatgpt L1 cot tiny-llama seed 100: step \d+/20, loss \d", (tmp_path / "second.log").read_text())
    first_parts = {p: p.stat().st_mtime_ns for p in _prediction_parts(run_dir)}
    answered = sum(pq.read_metadata(p).num_rows for p in first_parts)
    assert _latest_checkpoint(run_dir).endswith("_final")
    [rank0] = run_dir.glob("ray/train-*/workers/rank0.json")
    trained = (rank0.stat().st_mtime_ns, json.loads(rank0.read_text()))

    # 3. Rerun to the end: no training step again, only the missing questions generated.
    _run_sweep(config, tmp_path / "third.log")
    [record_path] = _records(run_dir)
    record = json.loads(record_path.read_text())
    state = json.loads((Path(record["model_path"]) / "train_state.json").read_text())
    assert state["steps"] == 20 and [p["step"] for p in state["history"]] == list(range(1, 21))
    [resumed] = state["resumed_at"]  # the second run started from the checkpoint the first one saved
    assert int(saved.removeprefix("checkpoint_step")) <= resumed < 20 and resumed % 2 == 0
    assert trained[1]["start_step"] == resumed
    assert (rank0.stat().st_mtime_ns, json.loads(rank0.read_text())) == trained  # the third run trained nothing

    parts = {p: p.stat().st_mtime_ns for p in _prediction_parts(run_dir)}
    assert all(parts[p] == t for p, t in first_parts.items())  # finished batches kept as they were
    generated = sum(pq.read_metadata(p).num_rows for p in set(parts) - set(first_parts))
    assert 0 < answered < 16 and generated == 16 - answered
    assert record["metrics"]["n_test"] == 16
    [test] = run_dir.glob("test/svamp-16-*.parquet")
    assert sorted(pq.read_table(record["predictions_path"])["question_id"].to_pylist()) == \
        sorted(pq.read_table(test)["question_id"].to_pylist())


def _kill_sweep_when(config: Path, log: Path, ready, timeout: float = 600) -> None:
    """Start the sweep and SIGKILL its driver as soon as `ready()` is true."""
    proc = _start_sweep(config, log)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, f"nothing to kill for within {timeout:.0f} s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _reap(proc)


def _latest_checkpoint(run_dir: Path) -> str | None:
    """The name of the newest checkpoint Ray Train registered for the sweep's one training run."""
    snapshots = list(run_dir.glob("ray/train-*/checkpoint_manager_snapshot.json"))
    assert len(snapshots) <= 1, f"the trial trained in more than one run: {snapshots}"
    for snapshot in snapshots:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except ValueError:  # being written
            return None
        return latest.get("checkpoint_dir_name")
    return None


def _prediction_parts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("trials/*/predictions.parquet.parts/part-*.parquet"))
