"""MLflow's own UI on a sweep's store, read from the page headless Chromium renders.

The store is written by the sweep's tracking functions (a parent run, a nested run per trial
record, the parent closed); `mlflow ui` serves it; the runs table and the compare view that the
sweep prints (`tracking.ui_addresses`) are loaded in Debian's Chromium over the DevTools protocol.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from browser import Browser, find_chromium
from raydistill import tracking
from raydistill.records import TrialRecord
from raydistill.spec import sweep_from_dict

# level -> (accuracy, trial minutes): each trial run must show its own span, not the logging moment
TRIALS = {"1": (0.25, 10), "3": (0.5, 20), "6": (0.75, 30)}


def _sweep_store(tmp_path: Path):
    spec = sweep_from_dict({"name": "ui", "output_dir": str(tmp_path), "datasets": ["svamp"],
                            "teachers": ["chatgpt"], "levels": [int(level) for level in TRIALS],
                            "students": ["tiny-llama"]})
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "sweep.yaml").write_text("name: ui\n")
    parent = tracking.start_sweep_run(spec, spec.run_dir / "sweep.yaml")
    predictions = tmp_path / "predictions.parquet"
    predictions.write_bytes(b"PAR1")
    records = []
    for i, (level, (accuracy, minutes)) in enumerate(TRIALS.items()):
        started = 1_790_000_000.0 + 3600 * i
        records.append(TrialRecord.model_validate({
            "trial_hash": str(i) * 64, "eval_hash": "e" * 64, "started_at": started,
            "finished_at": started + 60 * minutes,
            "axes": {"dataset": "svamp", "teacher": "chatgpt", "level": level, "format": "cot",
                     "student": "tiny-llama", "seed": 100},
            "cell": {"hash": "c" * 16, "source": "replay"}, "train_spec": {"epochs": 1},
            "eval_spec": {"max_new_tokens": 8}, "grader": "paper", "eval_protocol": "paper",
            "metrics": {"accuracy": accuracy, "n_test": 4}, "predictions_path": str(predictions),
            "train_history": [{"step": 1, "loss": 2.0, "lr": 1e-3}]}))
        tracking.log_trial(parent, records[-1])
    tracking.finish_sweep_run(parent, records, {})
    return spec, records


def _serve(tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on a port it picks itself (--port 0), read back from its log."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", "0", "--workers", "1"],
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        time.sleep(0.5)
    _stop(proc)
    raise AssertionError(f"mlflow ui did not start: {log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_mlflow_ui_shows_the_trials_with_their_axes_spans_and_accuracy(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make test` installs it "
                    "where it runs as root): MLflow's UI is not checked in a browser here")
    spec, records = _sweep_store(tmp_path)
    names = [f"tiny-llama L{level} chatgpt cot svamp seed100" for level in TRIALS]

    # What the pages must show, in the store: axes and settings are params, hashes are tags only.
    client = mlflow.MlflowClient(spec.tracking_uri)
    for run in client.search_runs([client.get_experiment_by_name("ui").experiment_id]):
        assert not [v for v in run.data.params.values() if re.fullmatch(r"[0-9a-f]{16,}", v)], run.data.params

    server, base = _serve(spec.tracking_uri, tmp_path / "mlflow-ui.log")
    browser = Browser(chromium)
    try:
        pages = tracking.ui_addresses(spec.tracking_uri, "ui", [r.trial_hash for r in records], base=base)
        # The runs table: opened on training runs (not GenAI traces), one row per trial named by its
        # axes, sorted by accuracy, each with its trial's own duration.
        runs = browser.text(pages["runs"], [*names, "30.0min"])
        assert "Run Name" in runs and "Sort: accuracy" in runs, runs
        assert [runs.index(name) for name in reversed(names)] == sorted(runs.index(name) for name in names), runs
        assert all(f"{minutes:.1f}min" in runs for _, minutes in TRIALS.values()), runs
        # The compare view: the three trials, their axes as parameters, their accuracy; the
        # parallel-coordinates plot offers the level (the one axis that differs), never a hash.
        compare = browser.text(pages["compare"], ["Comparing 3 Runs", *names, "Metrics"])
        assert "Comparing 3 Runs from 1 Experiment" in compare, compare
        plot_axes = compare.split("Parameters:", 1)[1].split("Clear All", 1)[0]
        assert plot_axes.split() == ["level", "Metrics:", "accuracy"], plot_axes
        params = compare.split("\nParameters\n", 1)[1].split("\nMetrics\n", 1)[0]
        assert re.search(r"^level\t1\t3\t6$", params, re.M) and re.search(r"^student(\ttiny-llama){3}$", params, re.M)
        assert re.search(r"^teacher(\tchatgpt){3}$", params, re.M) and "hash" not in params, params
        metrics = compare.split("\nMetrics\n", 1)[1].split("\nArtifacts\n", 1)[0]
        assert "accuracy" in metrics and all(str(a) in metrics.split() for a, _ in TRIALS.values()), metrics
        assert "raydistill.eval_hash" in compare.split("\nTags\n", 1)[1]  # hashes stay in the tags
    finally:
        browser.close()
        _stop(server)
