"""Does this machine's NVIDIA driver run the installed torch's CUDA build? One small kernel says.

    python cluster/gpu_check_driver.py [--wait-s 300]

Run where GPU work will run: `make install-gpu` (after torch goes in), the GPU node types' setup
commands (cluster/aws.yaml, cluster/gcp.yaml) and the KubeRay GPU worker's start
(cluster/kuberay/raycluster.yaml, rayjob.yaml; an image is built without a GPU, so a pod checks
when it starts). It runs ``torch.ones(1, device="cuda") + 1`` and synchronizes, which needs a
driver that supports the build's CUDA version (torch 2.13.0 from PyPI: CUDA 13.0, driver 580 or
newer), not only a CUDA build of torch. Exit 0 with one line on stdout when the kernel ran; exit 1
with one line on stderr otherwise, naming the NVIDIA driver (from nvidia-smi, or "not found") and
the driver the build needs. ``--wait-s`` waits up to that long for nvidia-smi to answer first (a
cloud image may still be loading its driver when the node's setup starts).

Standard library and torch only: it runs before raydistill and its dependencies are installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# The oldest Linux driver that runs a CUDA major version's builds (NVIDIA's minor version
# compatibility: any 12.x build on 525 or newer, any 13.x build on 580 or newer).
DRIVER_FOR_CUDA = {12: 525, 13: 580}
POLL_S = 5.0  # how often --wait-s asks nvidia-smi again


def nvidia_driver() -> str | None:
    """The driver version nvidia-smi reports for the first GPU, or None (no nvidia-smi, no driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def driver_needed(cuda: str) -> str:
    """What a build for CUDA ``cuda`` ("13.0") needs, in words."""
    try:
        driver = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))
    except ValueError:
        driver = None
    return f"CUDA {cuda} needs NVIDIA driver {driver} or newer" if driver else f"CUDA {cuda} needs a driver for it"


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check(wait_s: float = 0.0) -> tuple[bool, str]:
    """(whether a CUDA kernel ran, the one line that says so or why not)."""
    deadline = time.monotonic() + wait_s
    driver = nvidia_driver()
    while driver is None and time.monotonic() < deadline:
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        driver = nvidia_driver()
    found = f"NVIDIA driver {driver or 'not found'} (nvidia-smi)"
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install is a failed check, in one line
        return False, (f"gpu check: torch does not import ({_first_line(e)}); {found}; "
                       "install torch first (make install-gpu)")
    cuda = torch.version.cuda
    if not cuda:
        return False, (f"gpu check: torch {torch.__version__} is a CPU build, no CUDA kernel can run; {found}; "
                       "install the CUDA build (torch from PyPI on Linux x86-64, make install-gpu)")
    try:
        x = torch.ones(1, device="cuda") + 1
        torch.cuda.synchronize()
        value = float(x.item())
        if value != 2.0:
            raise RuntimeError(f"1 + 1 gave {value}")
        name = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - whatever CUDA raises, the answer is one line
        return False, (f"gpu check: torch {torch.__version__} (CUDA {cuda}) cannot run a CUDA kernel "
                       f"({_first_line(e)}); {found}; {driver_needed(cuda)}")
    return True, f"gpu check: torch {torch.__version__} (CUDA {cuda}) ran a kernel on {name}; {found}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-s", type=float, default=0.0,
                        help="wait up to this many seconds for nvidia-smi to answer before the kernel")
    args = parser.parse_args(argv)
    ok, line = check(args.wait_s)
    print(line, file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
