"""The package carries its own data: a wheel built with `pip wheel .` and installed outside the
checkout finds its prompts, upstream pins, the paper's numbers and DeepSpeed configs, and runs
`python -m raydistill` and a sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it was installed into), built from a copy of this checkout's sources
    without the build leftovers (an old `*.egg-info` file list would hide a missing package-data rule)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "outputs", "mlruns", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out / "dist")],
                   check=True, cwd=out)
    [wheel] = (out / "dist").glob("raydistill-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(out / "site"), str(wheel)], check=True, cwd=out)
    return wheel, out / "site"


def _outside_checkout(site: Path, cwd: Path, *args: str, env: dict | None = None,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python with the installed wheel first on the path, from a folder outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_holds_every_data_file_and_config(wheel_install):
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p for folder in ("raydistill/data", "raydistill/configs") for p in (REPO / folder).rglob("*")
               if p.is_file()]
    assert {"raydistill/data/upstream.json", "raydistill/data/paper/published_results.csv",
            "raydistill/data/prompts/gold_hint.md", "raydistill/configs/deepspeed/zero3.json"} <= \
        {p.relative_to(REPO).as_posix() for p in shipped}
    missing = [p.relative_to(REPO).as_posix() for p in shipped if p.relative_to(REPO).as_posix() not in names]
    assert not missing


def test_installed_wheel_reads_its_own_data_outside_the_checkout(wheel_install, tmp_path):
    _, site = wheel_install
    probe = """
import json, raydistill
from raydistill import prompts, report, train
from raydistill.datasets import mirror as datasets  # _manifest lives in raydistill.datasets.mirror
print(json.dumps({
    "module": raydistill.__file__,
    "system": prompts.system_message("svamp", 3, "cot"),
    "exemplar": prompts.exemplar("svamp").question,
    "published_rows": len(report.load_published()),
    "pinned_files": len(datasets._manifest()["files"]),
    "deepspeed": sorted(p.name for p in train.DEEPSPEED_CONFIG_DIR.glob("*.json")),
}))
"""
    done = _outside_checkout(site, tmp_path, "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = json.loads(done.stdout.splitlines()[-1])
    assert Path(installed["module"]).is_relative_to(site)  # the wheel's copy, not the checkout's

    from raydistill import prompts, report, train
    from raydistill.datasets import mirror as datasets  # _manifest lives in raydistill.datasets.mirror

    assert installed == {
        "module": installed["module"],
        "system": prompts.system_message("svamp", 3, "cot"),
        "exemplar": prompts.exemplar("svamp").question,
        "published_rows": len(report.load_published()),
        "pinned_files": len(datasets._manifest()["files"]),
        "deepspeed": sorted(p.name for p in train.DEEPSPEED_CONFIG_DIR.glob("*.json")),
    }
    assert installed["published_rows"] > 0 and installed["pinned_files"] > 0 and installed["deepspeed"]


def test_python_dash_m_lists_the_subcommands_and_lists_data(wheel_install, tmp_path):
    from raydistill.cli import COMMANDS

    _, site = wheel_install
    usage = _outside_checkout(site, tmp_path, "-m", "raydistill", "--help")
    assert usage.returncode == 0, usage.stderr
    assert [line.split()[0] for line in usage.stdout.splitlines() if line.startswith("  ")] == list(COMMANDS)
    listing = _outside_checkout(site, tmp_path, "-m", "raydistill", "data", "list")
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert "svamp" in listing.stdout and "distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json" in listing.stdout


@pytest.mark.slow
def test_installed_wheel_runs_a_sweep_outside_the_checkout(wheel_install, tmp_path, model_cache):
    _, site = wheel_install
    config = tmp_path / "wheel.yaml"
    config.write_text(yaml.safe_dump({
        "name": "wheel", "output_dir": str(tmp_path / "outputs"), "datasets": ["svamp"], "formats": ["cot"],
        "teachers": ["chatgpt"], "levels": [1], "students": ["tiny-llama"], "seeds": [100],
        "train_limit": 8, "test_limit": 4,
        "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 1,
                  "cpus_per_worker": 1, "zero_stage": 2, "cutoff_len": 128},
        "eval": {"engine": "hf", "max_new_tokens": 8, "batch_size": 4, "num_actors": 1},
    }))
    ray_tmp = tempfile.mkdtemp(prefix="rd-ray-")  # Ray's socket paths must stay short
    done = _outside_checkout(site, tmp_path, "-m", "raydistill", "sweep", "--config", str(config),
                             env={"RAY_TMPDIR": ray_tmp, "RAYDISTILL_RAY_NUM_CPUS": "2"}, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [record] = (tmp_path / "outputs" / "wheel" / "trials").glob("*/record.json")
    assert json.loads(record.read_text())["metrics"]["n_test"] == 4
    # the paper's numbers, read from the installed package, reach the report
    assert "## Paper: granularity vs length ablation" in (tmp_path / "outputs" / "wheel" / "results.md").read_text()
