"""cluster/gpu_check_driver.py, the check that the NVIDIA driver runs the installed torch's CUDA
build (`make install-gpu`, the launcher GPU node types' setup, the KubeRay GPU workers' start).

No GPU here: the real torch of this environment (a CPU build) shows the refusal where no CUDA is,
and stand-in `torch` packages (first on PYTHONPATH) with a stand-in `nvidia-smi` (first on PATH)
show the answer for a CUDA build whose kernel fails on an old driver, runs, or finds no driver.
Every answer is one line and an exit status; cluster/kuberay and the launcher configs calling it
is checked in tests/test_cluster_configs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "cluster" / "gpu_check_driver.py"

FAKE_TORCH = '''
import os

__version__ = "2.13.0+cu130"


class version:
    cuda = "13.0"


class _Tensor:
    def __init__(self, value):
        self.value = value

    def __add__(self, other):
        return _Tensor(self.value + other)

    def item(self):
        return self.value


def ones(n, device=None):
    assert device == "cuda"
    if os.environ["FAKE_CUDA"] == "old-driver":
        raise RuntimeError("CUDA error: CUDA driver version is insufficient for CUDA runtime version\\n"
                           "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\\n")
    if os.environ["FAKE_CUDA"] == "no-driver":
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
                           "and installed a driver")
    return _Tensor(1.0)


class cuda:
    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def get_device_name(index):
        return "NVIDIA L40S"
'''


def _nvidia_smi(bin_dir: Path, driver: str | None, fail_first: int = 0) -> None:
    """A stand-in nvidia-smi: the query prints the driver once per GPU (two GPUs); None: no driver
    loaded (exit 9); fail_first: that many calls fail before it answers (a driver still loading)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    calls = bin_dir / "calls"
    body = f'echo x >> "{calls}"\n'
    if fail_first:
        body += f'[ "$(wc -l < "{calls}")" -le {fail_first} ] && exit 9\n'
    body += f"echo {driver}\necho {driver}\n" if driver else "exit 9\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def _run(tmp_path: Path, *args: str, torch: str | None = None, fake_cuda: str = "") -> subprocess.CompletedProcess:
    """The check as a GPU install runs it, with tmp_path/bin first on PATH and, with ``torch``, a
    stand-in torch package (that __init__ text) first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    env["FAKE_CUDA"] = fake_cuda
    if torch is not None:
        (tmp_path / "site" / "torch").mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / "torch" / "__init__.py").write_text(torch)
        env["PYTHONPATH"] = str(tmp_path / "site")
    return subprocess.run([sys.executable, str(CHECK), *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def _refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu check: "), result.stderr  # no traceback
    return lines[0]


def test_the_real_cpu_torch_is_refused_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.version.cuda:
        pytest.skip("this environment has a CUDA build of torch")
    (tmp_path / "bin").mkdir()
    line = _refused(_run(tmp_path))
    assert f"torch {torch.__version__} is a CPU build" in line
    assert "NVIDIA driver not found (nvidia-smi)" in line


def test_a_cuda_build_on_an_old_driver_names_the_driver_and_the_one_needed(tmp_path):
    _nvidia_smi(tmp_path / "bin", "575.64.05")
    line = _refused(_run(tmp_path, torch=FAKE_TORCH, fake_cuda="old-driver"))
    assert "torch 2.13.0+cu130 (CUDA 13.0) cannot run a CUDA kernel" in line
    assert "CUDA driver version is insufficient" in line
    assert "NVIDIA driver 575.64.05 (nvidia-smi)" in line and "CUDA 13.0 needs NVIDIA driver 580 or newer" in line


def test_no_driver_is_named_as_not_found(tmp_path):
    _nvidia_smi(tmp_path / "bin", None)
    line = _refused(_run(tmp_path, torch=FAKE_TORCH, fake_cuda="no-driver"))
    assert "Found no NVIDIA driver" in line and "NVIDIA driver not found (nvidia-smi)" in line
    assert "580 or newer" in line


def test_a_kernel_that_runs_passes_with_one_line(tmp_path):
    _nvidia_smi(tmp_path / "bin", "595.71.05")
    result = _run(tmp_path, torch=FAKE_TORCH, fake_cuda="ok")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.count("\n") == 1
    assert "ran a kernel on NVIDIA L40S" in result.stdout and "NVIDIA driver 595.71.05" in result.stdout


def test_a_torch_that_does_not_import_is_refused_in_one_line(tmp_path):
    _nvidia_smi(tmp_path / "bin", "580.105.08")
    line = _refused(_run(tmp_path, torch='raise OSError("libcudart.so.13: cannot open shared object file")\n'))
    assert "torch does not import (libcudart.so.13: cannot open shared object file)" in line
    assert "NVIDIA driver 580.105.08" in line


def test_wait_s_waits_for_the_driver_to_load(tmp_path):
    """A node's setup may start before the image has loaded its driver: with --wait-s the check asks
    nvidia-smi again until it answers (or the time is up), then runs the kernel."""
    _nvidia_smi(tmp_path / "bin", "580.105.08", fail_first=1)
    started = time.monotonic()
    result = _run(tmp_path, "--wait-s", "60", torch=FAKE_TORCH, fake_cuda="ok")
    assert result.returncode == 0, result.stderr
    assert "NVIDIA driver 580.105.08" in result.stdout
    assert (tmp_path / "bin" / "calls").read_text().count("x") == 2
    assert time.monotonic() - started < 50

    (tmp_path / "bin" / "calls").unlink()
    _nvidia_smi(tmp_path / "bin", "580.105.08", fail_first=1)
    line = _refused(_run(tmp_path, torch=FAKE_TORCH, fake_cuda="no-driver"))  # no wait: asked once
    assert "NVIDIA driver not found" in line
    assert (tmp_path / "bin" / "calls").read_text().count("x") == 1
