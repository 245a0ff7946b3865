"""benchmarks/gpu_smoke.sh on a CPU: it parses, and the `--json` file of `raydistill train` it reads
holds what the command prints (its stdout interleaves Ray's logs on a GPU node), with the train
state the script checks (the run at its last step, finite losses). `raydistill eval --json` is
checked in tests/test_evaluate.py's eval CLI test."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("raydistill")


def test_gpu_smoke_script_parses_and_reads_results_from_json_files():
    bash = shutil.which("bash")
    assert bash, "no bash"
    done = subprocess.run([bash, "-n", str(REPO / "benchmarks" / "gpu_smoke.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = (REPO / "benchmarks" / "gpu_smoke.sh").read_text()
    assert script.count("--json \"$OUT/") == 2 and "splitlines()[-1]" not in script
    assert "losses[-1] < losses[0]" not in script


def _last_json_object(stdout: str) -> dict:
    """The JSON object that ends stdout (train prints it indented over several lines)."""
    start = stdout.rstrip().rfind("\n{")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout)


@pytest.mark.slow
def test_train_writes_the_json_it_prints_to_its_json_file(tmp_path, model_cache):
    import pyarrow.parquet as pq

    from raydistill.datasets import load_train

    data = tmp_path / "svamp8.parquet"
    pq.write_table(load_train("svamp", "chatgpt", level=1).slice(0, 8), data)
    sets = ["epochs=1", "global_batch_size=4", "micro_batch_size=2", "cutoff_len=256"]
    train = subprocess.run([str(CLI), "train", "--student", "tiny-llama", "--data", str(data), "--out",
                            str(tmp_path / "runs"), "--name", "smoke", "--json", str(tmp_path / "train.json"),
                            *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads((tmp_path / "train.json").read_text())
    assert result == _last_json_object(train.stdout)
    state = json.loads((Path(result["model_path"]) / "train_state.json").read_text())
    losses = [p["loss"] for p in state["history"]]
    assert state["final"] and state["step"] == state["steps"] == result["steps"] == len(losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in losses + [result["final_loss"]])

