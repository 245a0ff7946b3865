"""benchmarks/gpu_check.py, the torch-only GPU check, run as its CPU twin.

It runs the way the GPU machine it is written for runs it: from a copy of only the files it names
(`FILES`), with ray, deepspeed, vllm, raydistill, pyarrow, pydantic and litellm unimportable (a
`sitecustomize` on PYTHONPATH sets them to None in `sys.modules`, in the child process it starts
too), so a check that needs one of them, or a file it does not name, fails here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "transformers", "tokenizers", "peft", "accelerate"}  # beside the standard library


def _bench():
    spec = importlib.util.spec_from_file_location("raydistill_bench_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _guarded_env(tmp: Path) -> dict:
    guard = tmp / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {BENCH.NOT_NEEDED!r}:\n"
        "    sys.modules[_name] = None  # import fails, importlib.util.find_spec says absent\n")
    path = os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CPU twin from a copy of FILES under the guard: (process, JSON from stdout, the --out file's JSON)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    copy = tmp / "copy"
    for relative in BENCH.FILES:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, copy / relative)
    out = tmp / "result.json"
    proc = subprocess.run([sys.executable, str(copy / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(out)], cwd=copy, env=_guarded_env(tmp), capture_output=True, text=True,
                          timeout=1500)
    assert proc.stdout.strip(), f"no JSON on stdout (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc, json.loads(proc.stdout), json.loads(out.read_text())


def test_every_check_runs_and_passes_and_stdout_is_one_json_object(run):
    proc, result, written = run
    failed = {name: check.get("error") for name, check in result["checks"].items() if not check["passed"]}
    assert proc.returncode == 0 and result["passed"] and not failed, (failed, proc.stderr[-4000:])
    assert list(result["checks"]) == list(BENCH.CHECKS)
    assert result == written
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["versions"]["torch"] and result["versions"]["transformers"] and result["versions"]["peft"]
    assert "[gpu_check]" in proc.stderr and "[gpu_check]" not in proc.stdout  # the log went to stderr


def test_the_student_is_a_small_llama_with_sdpa_and_gradient_checkpointing(run):
    build = run[1]["checks"]["build"]
    assert build["attn_implementation"] == "sdpa" and build["gradient_checkpointing"]
    assert build["parameters"] == build["parameters_from_config"] > 1_000_000
    assert 256 <= build["config"]["hidden_size"] <= 512 and build["config"]["vocab_size"] > 256


@pytest.mark.parametrize("kind", ["full_finetune", "lora"])
def test_training_steps_have_finite_falling_losses_and_run_sdpa_in_forward_and_recomputation(run, kind):
    check = run[1]["checks"][kind]
    losses = check["losses"]
    assert len(losses) == check["steps"] and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the same batch every step
    assert check["dtype"] == "float32" and check["attn_implementation"] == "sdpa" and check["gradient_checkpointing"]
    layers = run[1]["checks"]["build"]["config"]["num_hidden_layers"]
    assert check["sdpa_calls_per_step"] == [2 * layers] * check["steps"]
    assert check["tensors_with_gradient"] == check["trainable_tensors"]


def test_full_finetuning_trains_every_weight_and_lora_only_its_adapters(run):
    full, lora = run[1]["checks"]["full_finetune"], run[1]["checks"]["lora"]
    assert full["trainable_parameters"] == full["parameters"]
    assert lora["trainable_names_all_lora"] and lora["base_unchanged"]
    assert 0 < lora["trainable_parameters"] < 0.1 * lora["parameters"]
    assert lora["adapter_tensors_changed"] == lora["adapter_tensors"] == lora["trainable_tensors"] > 0


def test_greedy_and_beam_search_return_the_sequences_and_token_counts_asked_for(run):
    greedy, beam = run[1]["checks"]["generation_greedy"], run[1]["checks"]["generation_beam"]
    prompts = len(BENCH.PROMPTS)
    assert greedy["sequences"] == len(greedy["new_tokens"]) == prompts
    for n, eos in zip(greedy["new_tokens"], greedy["ended_at_eos"]):
        assert n == BENCH.GREEDY_NEW_TOKENS or (eos and 0 < n < BENCH.GREEDY_NEW_TOKENS)
    assert greedy["sdpa_calls"] > 0
    assert beam["num_beams"] == beam["num_return_sequences"] == 5
    assert beam["sequences"] == len(beam["new_tokens"]) == 5 * prompts
    for n, eos in zip(beam["new_tokens"], beam["ended_at_eos"]):
        assert n == BENCH.BEAM_NEW_TOKENS or (eos and 0 < n < BENCH.BEAM_NEW_TOKENS)
    assert beam["distinct_per_prompt"] == [5] * prompts and all(beam["best_first"])
    assert all(math.isfinite(s) for s in beam["scores"])


def test_memory_estimate_is_at_least_the_measured_peak(run):
    cases = run[1]["checks"]["memory"]["cases"]
    assert [(c["micro_batch"], c["seq_len"]) for c in cases] == [tuple(c) for c in BENCH.MEMORY_CASES["cpu"]]
    for case in cases:
        assert case["measured"] is not None, case.get("note")  # Linux: /proc/self/clear_refs
        assert case["weights"] < case["measured"] <= case["estimate"] == case["estimate_total"], case
    assert cases[1]["measured"] > cases[0]["measured"]  # four times the tokens


def test_the_guard_makes_the_packages_the_gpu_machine_lacks_unimportable(tmp_path):
    """Without this the runs above could pass while importing raydistill from this checkout."""
    env = _guarded_env(tmp_path)
    for name in ("raydistill", "ray", "pydantic", "pyarrow"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and "None in sys.modules" in proc.stderr, (name, proc.stderr[-500:])
    ok = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('ray'))"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.stdout.strip() == "None"


def test_its_files_fit_64_mib_and_import_only_torch_transformers_peft_accelerate_tokenizers():
    size = sum((REPO / relative).stat().st_size for relative in BENCH.FILES)
    assert size <= 64 * 2**20
    for relative in BENCH.FILES:
        tree = ast.parse((REPO / relative).read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        outside = names - set(sys.stdlib_module_names) - ALLOWED - {"__future__"}
        assert not outside, f"{relative} imports {sorted(outside)}"
