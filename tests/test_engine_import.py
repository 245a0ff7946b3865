"""The engine choice with a vLLM that is installed but does not import.

`vllm_available` runs ``import vllm`` (not a look-up of the package), so a broken vLLM counts as
absent: ``eval.engine: auto`` falls back to HF generate and ``engine: vllm`` refuses, naming why the
import failed. The broken vLLM here is a real package named ``vllm`` whose ``__init__`` raises,
first on the PYTHONPATH of a subprocess that runs the real functions on its own local Ray cluster
(whose workers inherit that PYTHONPATH), so it shadows a vLLM the environment may have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

BROKEN_VLLM = '''
import os
with open(os.environ["VLLM_IMPORT_ATTEMPTS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
raise ImportError(f"libcudart.so.13: cannot open shared object file (stand-in broken vLLM, pid {os.getpid()})")
'''

DRIVER = """
import json, os, ray
from raydistill.evaluate import (EngineError, choose_engine, vllm_available, vllm_import_error,
                                 vllm_import_errors_on_engine_nodes)
from raydistill.spec import EvalSpec
here = [vllm_available(), vllm_import_error(), vllm_available(), vllm_import_error()]
attempts_here = open(os.environ["VLLM_IMPORT_ATTEMPTS"]).read().split()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
nodes = vllm_import_errors_on_engine_nodes(EvalSpec(engine="vllm").for_task("svamp"))
auto = choose_engine(EvalSpec(engine="auto").for_task("svamp"))
try:
    choose_engine(EvalSpec(engine="vllm").for_task("svamp"))
    refused = None
except EngineError as err:
    refused = str(err)
ip = ray.util.get_node_ip_address()
ray.shutdown()
print(json.dumps({"pid": os.getpid(), "ip": ip, "here": here, "attempts_here": attempts_here, "nodes": nodes,
                  "auto": auto, "refused": refused}))
"""


def test_a_vllm_that_fails_to_import_is_absent_auto_takes_hf_and_vllm_refuses_with_the_reason(tmp_path):
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(BROKEN_VLLM)
    attempts = tmp_path / "attempts.txt"
    attempts.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tmp_path / "site"), VLLM_IMPORT_ATTEMPTS=str(attempts), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    pid = result["pid"]

    # in this process: the import was tried, failed, and its reason is one line; asked once, kept
    reason = f"ImportError: libcudart.so.13: cannot open shared object file (stand-in broken vLLM, pid {pid})"
    assert result["here"] == [False, reason, False, reason]
    assert result["attempts_here"] == [str(pid)]

    # on the engine node: asked in a Ray worker (another process), which imported the broken package
    (ip, node_reason), = result["nodes"].items()
    assert ip == result["ip"]
    assert node_reason.startswith("ImportError: libcudart.so.13") and f"pid {pid})" not in node_reason
    worker_pids = [p for p in attempts.read_text().split() if p != str(pid)]
    assert worker_pids and f"pid {worker_pids[0]})" in node_reason

    # auto falls back to HF generate; vllm refuses in one line naming the node and the reason
    assert result["auto"] == "hf"
    refused = result["refused"]
    assert refused is not None and "\n" not in refused
    assert f"vLLM does not import on the node(s) {ip}" in refused
    assert node_reason in refused and "pip install" in refused
