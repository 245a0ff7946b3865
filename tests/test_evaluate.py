"""Evaluation: batched Ray Data engine vs one prompt per call, resume, grading of every task."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydistill.datasets import load_test
from raydistill.evaluate import (EngineError, EngineTimeout, HFEngine, build_prompts, choose_engine, engine_bundles,
                                 engine_nodes, evaluate, grade, load_tokenizer, merged_model, metrics, parts_dir,
                                 release_engine_placements, vllm_available, vllm_engine_kwargs, vllm_max_model_len,
                                 vllm_on_engine_nodes, vllm_processor)
from raydistill.spec import EvalSpec
from raydistill.tasks import TASK_NAMES
from raydistill.students import build_tiny_llama, get_template, resolve_student

SPEC = EvalSpec(engine="hf", max_new_tokens=24, batch_size=4).for_task("svamp")


@pytest.fixture(scope="module")
def tiny(model_cache) -> str:
    return str(resolve_student("tiny-llama"))


@pytest.fixture(scope="module")
def ray_module():
    """One local Ray cluster for this module's Ray Data tests."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"]}})
    yield ray
    ray.shutdown()


def test_batched_ray_engine_matches_one_prompt_per_call(tiny, ray_module, tmp_path):
    test = load_test("svamp").slice(0, 8)
    result = evaluate(tiny, "tiny-llama", "svamp", test, SPEC, tmp_path / "p.parquet", progress=False)
    batched = {r["question_id"]: r for r in pq.read_table(result.predictions_path).to_pylist()}

    template = get_template("chat")
    engine = HFEngine(tiny, "chat", SPEC.model_dump(), list(template.stop_strings(load_tokenizer(tiny, "chat"))))
    for row in build_prompts(test, template, engine.tokenizer):
        single = engine({"prompt": [row["prompt"]]})  # the paper's pattern: one prompt per call
        got = batched[row["question_id"]]
        assert got["prompt"] == row["prompt"]
        assert got["generation"] == single["generation"][0]
        assert got["tokens_generated"] == single["tokens_generated"][0]
    assert result.n == 8 and 0 < result.mean_generated_tokens <= SPEC.max_new_tokens


def test_shared_engines_outlive_an_evaluation_and_give_the_same_predictions(tiny, ray_module, tmp_path):
    """Two models evaluated one after the other in one trial slot of a sweep's shared HF engines:
    one process serves both (it loads the second model's weights), and each model's predictions are
    those of its own per-evaluation actors. Another slot's evaluation gets a host of its own, so
    trials evaluating at the same time are not queued behind one host."""
    from raydistill.evaluate.shared import NAMESPACE, host_names, stop_engine_hosts

    test = load_test("svamp").slice(0, 6)
    alpaca = str(resolve_student("tiny-llama-alpaca"))
    shared = SPEC.model_copy(update={"shared_engines": True})

    def host_pid(group: str) -> int:
        [name] = host_names(shared, group)
        return ray_module.get(ray_module.get_actor(name, namespace=NAMESPACE).pid.remote())

    own, on_host, pids = {}, {}, []
    for student, model in (("tiny-llama", tiny), ("tiny-llama-alpaca", alpaca)):
        result = evaluate(model, student, "svamp", test, SPEC, tmp_path / f"{student}-own.parquet", progress=False)
        own[student] = pq.read_table(result.predictions_path).to_pylist()
        result = evaluate(model, student, "svamp", test, shared, tmp_path / f"{student}-shared.parquet",
                          progress=False, engine_group="g", engine_slot="s1")
        on_host[student] = pq.read_table(result.predictions_path).to_pylist()
        pids.append(host_pid("g-s1"))
        assert result.timings["generation"] > 0 and result.timings["model_load_eval"] > 0
    assert pids[0] == pids[1]  # the same process, the second model loaded into it
    assert own["tiny-llama"] != own["tiny-llama-alpaca"]  # two models, two sets of generations
    for student in own:
        assert [r["generation"] for r in on_host[student]] == [r["generation"] for r in own[student]]
        assert on_host[student] == own[student]

    other_slot = evaluate(tiny, "tiny-llama", "svamp", test, shared, tmp_path / "other-slot.parquet", progress=False,
                          engine_group="g", engine_slot="s2")
    assert host_pid("g-s2") not in pids
    assert pq.read_table(other_slot.predictions_path).to_pylist() == own["tiny-llama"]
    # a slot's hosts stop alone (an evaluation past its timeout), the sweep's all at its end
    assert stop_engine_hosts("g-s1") == 1 and stop_engine_hosts("g") == 1 and stop_engine_hosts("g") == 0


def test_a_shared_hf_engine_merges_lora_adapters_into_the_base_it_keeps(tiny, ray_module, tmp_path):
    """LoRA trials on a sweep's shared HF engine: the host loads the base once and merges each
    adapter into a copy of it in memory (no merged folder written), and each adapter's predictions
    are those of per-evaluation actors on the adapter merged on disk (`merged_model`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.evaluate.shared import NAMESPACE, host_names, stop_engine_hosts
    from raydistill.students import default_cache_dir

    test = load_test("svamp").slice(0, 6)
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                                    LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / f"adapter-{seed}")
        adapters.append(str(tmp_path / f"adapter-{seed}"))
    merged_dir = default_cache_dir() / "merged"
    merged_before = set(merged_dir.iterdir()) if merged_dir.is_dir() else set()
    shared = SPEC.model_copy(update={"shared_engines": True})
    on_host = [pq.read_table(evaluate(a, "tiny-llama", "svamp", test, shared, tmp_path / f"{i}-shared.parquet",
                                      progress=False, engine_group="lora").predictions_path).to_pylist()
               for i, a in enumerate(adapters)]
    assert (set(merged_dir.iterdir()) if merged_dir.is_dir() else set()) == merged_before  # merged in memory
    [name] = host_names(shared, "lora")
    assert ray_module.get(ray_module.get_actor(name, namespace=NAMESPACE).bases_loaded.remote()) == 1
    own = [pq.read_table(evaluate(a, "tiny-llama", "svamp", test, SPEC, tmp_path / f"{i}-own.parquet",
                                  progress=False).predictions_path).to_pylist() for i, a in enumerate(adapters)]
    base = pq.read_table(evaluate(tiny, "tiny-llama", "svamp", test, SPEC, tmp_path / "base.parquet",
                                  progress=False).predictions_path).to_pylist()
    generations = [[r["generation"] for r in rows] for rows in (base, *own)]
    assert len({tuple(g) for g in generations}) == 3  # each adapter changes the generations
    assert on_host == own
    assert stop_engine_hosts("lora") == 1


def test_a_lora_adapter_is_merged_again_when_its_base_is_written_again(tiny, tmp_path):
    """An adapter whose base folder is written again (the base trained again) is another model: a
    shared HF host merges it into the new base instead of keeping the old merge, and `merged_model`
    builds a new merged folder instead of returning the old one."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.evaluate.shared import EngineHost

    base = Path(shutil.copytree(tiny, tmp_path / "base"))
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    rows = [{"prompt": p, "question_id": str(i)} for i, p in enumerate(["1 + 1 =", "Tom has 3 apples and"])]
    spec = SPEC.model_dump(mode="json")

    def generations(host):
        return [r["generation"] for r in host.generate(adapter, "chat", spec, [], rows)]

    host = EngineHost()
    before, merged_before = generations(host), merged_model(adapter)
    retrained = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for param in retrained.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    time.sleep(0.01)
    retrained.save_pretrained(base)  # the base written again, the adapter's files untouched

    assert merged_model(adapter) != merged_before
    after = generations(host)
    assert host.bases_loaded() == 2  # merged into the new base
    assert after == generations(EngineHost()) and after != before


def test_a_shared_engine_loads_a_model_folder_again_when_its_files_are_written_again(tiny, tmp_path):
    """What a shared host compares (`raydistill.evaluate.shared.weights_version`): a copy of a model
    is another folder with the same files; rewriting that folder's weights, its config or its
    tokenizer (a trial trained again) makes it a new version, which a host that had it loaded loads
    again (vLLM: a new engine, since the config and tokenizer fix an engine too)."""
    import json
    import shutil

    from raydistill.evaluate.shared import weights_version

    other = Path(shutil.copytree(tiny, tmp_path / "other"))
    before = weights_version(str(other))
    assert before[0] != weights_version(tiny)[0] and before[1:] == weights_version(tiny)[1:]
    assert {name for name, *_ in before[1:]} >= {"config.json", "tokenizer.json", next(other.glob("*.safetensors")).name}
    seen = {before}
    weights = next(other.glob("*.safetensors"))
    config = json.loads((other / "config.json").read_text())
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 10 ** 6, "content": "<extra>"})
    for rewrite in (lambda: weights.write_bytes(weights.read_bytes()),  # the same bytes, written again
                    lambda: (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 9})),
                    lambda: (other / "tokenizer.json").write_text(json.dumps(tokenizer))):
        time.sleep(0.01)
        rewrite()
        assert weights_version(str(other)) not in seen
        seen.add(weights_version(str(other)))


def test_a_shared_vllm_engine_tells_new_weights_from_a_new_model_shape(tiny, tmp_path):
    """What a shared vLLM host reloads in place and what needs a new engine
    (`raydistill.evaluate.shared.engine_shape`): two folders with the same config and tokenizer are
    one shape whatever their weights; another architecture, tokenizer or generation config (its EOS
    ids end requests) is another shape."""
    import json
    import shutil

    from raydistill.evaluate.shared import engine_shape

    other = Path(shutil.copytree(tiny, tmp_path / "other"))
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(4))  # other weights
    assert engine_shape(str(other)) == engine_shape(tiny)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert engine_shape(str(other)) != engine_shape(tiny)
    (other / "config.json").write_text(json.dumps(config))
    assert engine_shape(str(other)) == engine_shape(tiny)
    generation = (other / "generation_config.json").read_text()
    (other / "generation_config.json").write_text(json.dumps({**json.loads(generation), "eos_token_id": 7}))
    assert engine_shape(str(other)) != engine_shape(tiny)
    (other / "generation_config.json").write_text(generation)
    assert engine_shape(str(other)) == engine_shape(tiny)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 10 ** 6, "content": "<extra>"})
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert engine_shape(str(other)) != engine_shape(tiny)


def test_a_hung_engine_fails_the_evaluation_after_timeout_s(tiny, ray_module, tmp_path):
    """An evaluation that cannot finish in time (40 questions x 1,500 new tokens in batches of 2: the
    tiny Llama's 8 x 1,500 took 15 s on one CPU here) fails soon after ``timeout_s`` with a message
    naming the engine, the timeout and the field, and leaves no actor behind (Ray Data's detached
    bookkeeping actors are the cluster's): every CPU is free again."""
    from ray._private.state import actors

    def alive() -> set[str]:
        return {i for i, a in actors().items() if a["State"] == "ALIVE" and not a["IsDetached"]}

    before = alive()
    spec = EvalSpec(engine="hf", max_new_tokens=1500, batch_size=2, timeout_s=15)
    started = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"hf engine did not finish .* 40 prompts within eval\.timeout_s = 15 s"):
        evaluate(tiny, "tiny-llama", "svamp", load_test("svamp").slice(0, 40), spec, tmp_path / "p.parquet",
                 progress=False)
    assert 15 <= time.monotonic() - started < 45
    total = ray_module.cluster_resources()["CPU"]
    gone_by = time.monotonic() + 30
    while alive() - before or ray_module.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < gone_by, (alive() - before, ray_module.available_resources())
        time.sleep(0.5)


@pytest.fixture(scope="module")
def smollm2_engine_inputs(model_cache):
    """SmolLM2-135M-Instruct (it writes text, unlike the random tiny Llama) and 6 GSM8K prompts.
    "." is added to the stop strings so that the generations end at different lengths."""
    path = str(resolve_student("smollm2-135m"))
    tokenizer = load_tokenizer(path, "chat")
    stops = [*get_template("chat").stop_strings(tokenizer), "."]
    prompts = [r["prompt"] for r in build_prompts(load_test("gsm8k").slice(0, 6), get_template("chat"), tokenizer)]
    return path, stops, prompts


def test_greedy_rounds_give_the_tokens_of_one_generate_call(smollm2_engine_inputs):
    path, stops, prompts = smollm2_engine_inputs
    engine = HFEngine(path, "chat", EvalSpec(engine="hf", max_new_tokens=32).for_task("gsm8k").model_dump(), stops)
    one_call = engine.generate_ids(prompts, round_tokens=0)
    lengths = sorted(len(ids) for ids in one_call)
    assert lengths[0] + 4 < lengths[-1] <= 32  # rows end rounds apart: the batch shrinks between rounds
    assert engine.generate_ids(prompts, round_tokens=4) == one_call


def test_sampling_in_rounds_returns_n_samples_per_prompt(smollm2_engine_inputs):
    path, stops, prompts = smollm2_engine_inputs
    spec = EvalSpec(engine="hf", max_new_tokens=24, do_sample=True, n_samples=2, seed=3).for_task("gsm8k")
    engine = HFEngine(path, "chat", spec.model_dump(), stops)
    samples = engine.generate_ids(prompts, round_tokens=4)
    assert len(samples) == 12 and all(0 < len(ids) <= 24 for ids in samples)
    assert any(samples[2 * i] != samples[2 * i + 1] for i in range(6))  # two draws per prompt
    assert engine.generate_ids(prompts, round_tokens=4) == samples  # the seed fixes them


def test_resume_generates_only_missing_questions(tiny, ray_module, tmp_path):
    out = tmp_path / "p.parquet"
    test = load_test("gsm8k").slice(0, 6)
    evaluate(tiny, "tiny-llama", "gsm8k", test.slice(0, 4), SPEC, out, progress=False)
    first = {f: f.stat().st_mtime_ns for f in parts_dir(out).iterdir()}

    # With a timeout the generation streams from an actor of its own; the evaluation's identity is the same.
    result = evaluate(tiny, "tiny-llama", "gsm8k", test, SPEC.model_copy(update={"timeout_s": 600}), out,
                      progress=False)
    second = {f: f.stat().st_mtime_ns for f in parts_dir(out).iterdir()}
    assert all(second[f] == t for f, t in first.items())  # finished batches are kept as they were
    new_rows = sum(pq.read_metadata(f).num_rows for f in set(second) - set(first))
    assert new_rows == 2 and result.n == 6
    assert sorted(pq.read_table(out)["question_id"].to_pylist()) == sorted(test["question_id"].to_pylist())

    evaluate(tiny, "tiny-llama", "gsm8k", test, SPEC, out, progress=False)
    assert set(parts_dir(out).iterdir()) == set(second)  # nothing left to generate


def test_pass_at_k_and_majority_vote_from_fixed_predictions():
    """Three samples per question; pass@3 and maj@3 by hand. q1: 1 of 3 correct, the majority
    ("7", twice) wrong; q2: 2 of 3 correct, majority right; q3: no answer extracted at all; q4: a
    1-1 tie between a right and a wrong answer (the first seen, right, wins) and one sample without
    an answer."""
    rows = [("q1", "5", True), ("q1", "7", False), ("q1", "7", False),
            ("q2", "3", True), ("q2", "3", True), ("q2", "4", False),
            ("q3", None, False), ("q3", None, False), ("q3", None, False),
            ("q4", "2", True), ("q4", None, False), ("q4", "9", False)]
    graded = [{"question_id": q, "prompt": "p", "generation": "g", "gold": "x", "extracted": e, "correct": ok,
               "tokens_generated": 3, "truncated": False, "empty": False, "eval_hash": "h"} for q, e, ok in rows]
    from raydistill.schemas import PREDICTION_SCHEMA
    import pyarrow as pa

    result = metrics("svamp", pa.Table.from_pylist(graded, schema=PREDICTION_SCHEMA), "-")
    assert result.samples_per_question == 3
    assert result.accuracy == pytest.approx(4 / 12)  # pass@1 over every sample
    assert result.pass_at_k == pytest.approx((1 + 1 + 0 + 1) / 4)  # pass@3 with n = k = 3: any correct
    assert result.maj_at_k == pytest.approx((0 + 1 + 0 + 1) / 4)
    one_sample = metrics("svamp", pa.Table.from_pylist(graded[::3], schema=PREDICTION_SCHEMA), "-")
    assert (one_sample.samples_per_question, one_sample.pass_at_k, one_sample.maj_at_k) == (1, None, None)


def test_sampled_evaluation_reports_pass_at_k_over_its_samples(tiny, ray_module, tmp_path):
    from raydistill.stats import pass_at_k

    spec = EvalSpec(engine="hf", max_new_tokens=8, batch_size=4, do_sample=True, temperature=1.0,
                    n_samples=3, seed=7).for_task("svamp")
    out = tmp_path / "p.parquet"
    result = evaluate(tiny, "tiny-llama", "svamp", load_test("svamp").slice(0, 4), spec, out, progress=False)
    table = pq.read_table(out).to_pylist()
    assert len(table) == 12 and result.samples_per_question == 3
    per_question = {}
    for row in table:
        per_question.setdefault(row["question_id"], []).append(bool(row["correct"]))
    assert result.pass_at_k == pytest.approx(sum(pass_at_k(3, sum(v), 3) for v in per_question.values()) / 4)
    assert result.maj_at_k is not None and result.pass_at_k >= result.accuracy


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_builds_prompts_and_grades_gold(task, tiny):
    test = load_test(task).slice(0, 20)
    tokenizer = load_tokenizer(tiny, "chat")
    rows = build_prompts(test, get_template("chat"), tokenizer)
    assert len(rows) == 20 and all(r["prompt"].count(q) == 1 for r, q in zip(rows, test["question"].to_pylist()))
    for r in rows:
        r.update(generation=f"The answer is {r['gold']}", tokens_generated=5, truncated=False, empty=False)
    result = metrics(task, grade(task, rows, "h"), "-")
    assert (result.accuracy, result.extraction_failure_rate, result.truncation_rate) == (1.0, 0.0, 0.0)


def test_beam_search_returns_n_samples_per_question(tiny):
    spec = EvalSpec(engine="hf", max_new_tokens=8, num_beams=3, n_samples=2).for_task("gsm8k")
    engine = HFEngine(tiny, "chat", spec.model_dump(), [])
    out = engine({"prompt": ["1 + 1 =", "What is 2 + 3?"], "question_id": ["a", "b"]})
    assert list(out["question_id"]) == ["a", "a", "b", "b"]
    assert all(0 <= n <= 8 for n in out["tokens_generated"])


def test_lora_adapter_is_merged_into_its_base(tiny, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_model(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.inference_mode():
        expected = peft_model.eval()(ids).logits
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)  # the adapter changes outputs
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed")
def test_vllm_engine_without_vllm_names_the_engine_node_and_how_to_install(ray_module):
    import ray

    ip = ray.util.get_node_ip_address()
    spec = EvalSpec(engine="vllm").for_task("svamp")
    assert vllm_on_engine_nodes(spec) == {ip: False}  # asked on the node, by a task pinned there
    with pytest.raises(EngineError, match=f"{re.escape(ip)}.*pip install"):
        choose_engine(spec)
    assert choose_engine(EvalSpec(engine="auto").for_task("svamp")) == "hf"
    assert choose_engine(EvalSpec(engine="auto").for_task("csqa")) == "hf"  # beam search: no probe needed


def test_engine_choice_follows_the_engine_nodes_not_this_process():
    """The decision is made from what the engine nodes report (`vllm_on_engine_nodes`), whatever this
    process has installed; with some engine nodes lacking vLLM, auto stays on HF and vllm refuses."""
    greedy = EvalSpec(engine="auto").for_task("gsm8k")
    assert choose_engine(greedy, vllm_nodes={"10.0.0.2": True}) == "vllm"
    assert choose_engine(greedy, vllm_nodes={"10.0.0.2": True, "10.0.0.3": False}) == "hf"
    assert choose_engine(greedy, vllm_nodes={}) == "hf"
    with pytest.raises(EngineError, match="10.0.0.3"):
        choose_engine(EvalSpec(engine="vllm").for_task("gsm8k"), vllm_nodes={"10.0.0.2": True, "10.0.0.3": False})
    with pytest.raises(EngineError, match="beam search"):
        choose_engine(EvalSpec(engine="vllm").for_task("csqa"), vllm_nodes={"10.0.0.2": True})
    sampled = EvalSpec(engine="auto", do_sample=True, n_samples=4).for_task("gsm8k")
    assert choose_engine(sampled, vllm_nodes={"10.0.0.2": True}) == "vllm"  # n samples: n requests


def test_vllm_requests_are_one_row_per_sample_seeded_apart_and_come_back_as_whole_questions(tiny):
    """ray.data.llm keeps one output per request, so n samples are n request rows, sample i seeded
    seed + i (sample 0 is the one-sample request); however the engines' output is cut into batches,
    what reaches a prediction part is whole questions in sample order, and a question left short is an
    error, never a part with fewer samples (which a resumed evaluation would count as done)."""
    from raydistill.evaluate.vllm_engine import replicate_samples, vllm_pre, whole_questions

    spec = EvalSpec(engine="vllm", do_sample=True, n_samples=3, seed=7).for_task("svamp")
    rows = replicate_samples([{"question_id": "a", "prompt": "1 + 1 =", "gold": "2"},
                              {"question_id": "b", "prompt": "2 + 2 =", "gold": "4"}], 3)
    assert [(r["question_id"], r["sample"]) for r in rows] == [(q, i) for q in "ab" for i in range(3)]
    requests = [vllm_pre(r, tiny, "chat", spec.model_dump(mode="json"), ["\n\n"]) for r in rows]
    assert [r["sampling_params"]["seed"] for r in requests] == [7, 8, 9, 7, 8, 9]
    assert {r["sampling_params"]["temperature"] for r in requests} == {spec.temperature}
    one = EvalSpec(engine="vllm").for_task("svamp").model_dump(mode="json")
    assert vllm_pre({**rows[0], "sample": 0}, tiny, "chat", one, [])["sampling_params"]["seed"] == 0

    out = [{**r, "generation": f"{r['question_id']}{r['sample']}"} for r in rows]
    scattered = [[out[5], out[0]], [out[2]], [out[4], out[1], out[3]]]  # engines finish out of order
    regrouped = list(whole_questions(iter(scattered), 3))
    assert [[r["generation"] for r in batch] for batch in regrouped] == [["a0", "a1", "a2", "b0", "b1", "b2"]]
    assert all("sample" not in r for batch in regrouped for r in batch)
    with pytest.raises(RuntimeError, match="fewer than 3 samples for 1 question"):
        list(whole_questions(iter([out[:3], out[3:5]]), 3))


def test_engine_probe_gives_up_when_no_node_can_hold_an_engine(ray_module):
    spec = EvalSpec(engine="vllm", cpus_per_actor=64).for_task("svamp")  # a 2-CPU cluster
    assert engine_nodes(spec) == []
    with pytest.raises(EngineError, match=r"no node .*'CPU': 64.* answered within 3 s"):
        vllm_on_engine_nodes(spec, timeout_s=3)


def test_vllm_settings_reach_the_engine_config(ray_module):
    """max_model_len from the longest prompt and max_new_tokens (not the model's 131,072 for
    Llama-3.2), eager mode, CPUs per engine and the GPU: in the ray.data.llm engine stage, built
    here without vLLM installed."""
    spec = EvalSpec(engine="vllm", use_gpu=True, cpus_per_actor=4, resources_per_actor={"gpu_node": 1}).for_task("math")
    assert spec.max_new_tokens == 1024
    context = vllm_max_model_len(spec, longest_prompt_tokens=700, model_max_len=131072)
    assert context == 1792  # 700 + 1024, rounded up to 256
    assert vllm_max_model_len(spec, 700, model_max_len=1024) == 1024
    assert vllm_max_model_len(spec.model_copy(update={"max_model_len": 4096}), 700, 131072) == 4096
    processor = vllm_processor("/models/llama-3.2-3b", "llama3", spec, ["</s>"], context)
    stage = processor.get_stage_by_name("vLLMEngineStage")
    engine = stage.fn_constructor_kwargs["engine_kwargs"]
    assert (engine["max_model_len"], engine["dtype"], engine["enforce_eager"]) == (1792, "bfloat16", False)
    actor = stage.map_batches_kwargs  # the engine actor's resources, from its one-bundle placement group
    assert (actor["num_cpus"], actor["num_gpus"], actor["resources"]) == (4.0, 1.0, {"gpu_node": 1.0})
    eager = vllm_engine_kwargs(spec.model_copy(update={"enforce_eager": True}), context)
    assert eager["enforce_eager"] is True
    cpu = vllm_engine_kwargs(EvalSpec(engine="vllm").for_task("math"), context)
    assert (cpu["dtype"], cpu["enforce_eager"]) == ("float32", True)


def test_vllm_engine_options_reach_the_engine_and_its_placement(ray_module):
    """The throughput options in the engine arguments, and a tensor-parallel engine's placement group:
    one bundle (CPUs, a GPU, the custom resources) per shard, the engine actor itself holding no GPU
    (vLLM's Ray executor runs the shards). Built here without vLLM; the placement group is created as
    Ray Data would for an engine actor (it stays pending on this GPU-less cluster), and the release
    after the evaluation removes it."""
    spec = EvalSpec(engine="vllm", use_gpu=True, cpus_per_actor=2, resources_per_actor={"gpu_node": 1},
                    tensor_parallel_size=2, gpu_memory_utilization=0.7, enable_prefix_caching=False,
                    max_num_seqs=32, timeout_s=600).for_task("gsm8k")
    bundle = {"CPU": 2.0, "GPU": 1, "gpu_node": 1}
    assert engine_bundles(spec) == [bundle, bundle]
    processor = vllm_processor("/models/llama-3.2-3b", "llama3", spec, ["</s>"], 2048, placement_key="eval-1")
    stage = processor.get_stage_by_name("vLLMEngineStage")
    engine = stage.fn_constructor_kwargs["engine_kwargs"]
    assert {k: engine[k] for k in ("tensor_parallel_size", "gpu_memory_utilization", "enable_prefix_caching",
                                   "max_num_seqs", "distributed_executor_backend")} == \
           {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.7, "enable_prefix_caching": False,
            "max_num_seqs": 32, "distributed_executor_backend": "ray"}
    actor = stage.map_batches_kwargs
    assert actor["num_gpus"] == 0
    strategy = actor["ray_remote_args_fn"]()["scheduling_strategy"]
    group = strategy.placement_group
    assert group.bundle_specs == [bundle, bundle] and strategy.placement_group_capture_child_tasks
    assert ray_module.util.placement_group_table(group)["strategy"] == "PACK"
    release_engine_placements("eval-1")
    assert ray_module.util.placement_group_table(group)["state"] == "REMOVED"

    defaults = vllm_engine_kwargs(EvalSpec(engine="vllm").for_task("gsm8k"), 2048)  # vLLM's own defaults
    assert (defaults["tensor_parallel_size"], defaults["gpu_memory_utilization"]) == (1, 0.9)
    assert "enable_prefix_caching" not in defaults and "max_num_seqs" not in defaults


def test_eval_cli_never_hands_one_models_predictions_to_another(tmp_path, model_cache):
    """Two different models whose folders share a name write to the same predictions file: the
    second must generate every question itself (parts are keyed by the evaluation's identity),
    and its generations must be its own."""
    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    build_tiny_llama(first, seed=0)
    build_tiny_llama(second, seed=1)
    out = tmp_path / "predictions"
    cli = Path(sys.executable).parent / "raydistill"

    def run(model: Path) -> dict:
        json_file = model.parent / "eval.json"  # --json: what it prints, also in a file (benchmarks/gpu_smoke.sh)
        done = subprocess.run([str(cli), "eval", "--model", str(model), "--task", "svamp", "--limit", "4",
                               "--max-new-tokens", "8", "--out-dir", str(out), "--json", str(json_file)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        printed = json.loads(done.stdout.strip().splitlines()[-1])
        assert json.loads(json_file.read_text()) == [printed]
        return printed

    a, b = run(first), run(second)
    assert a["predictions_path"] == b["predictions_path"] == str(out / "model" / "svamp.parquet")
    assert a["eval_hash"] != b["eval_hash"] and a["protocol"].startswith("paper") and b["grader"] == "paper"
    parts = pq.read_table(parts_dir(b["predictions_path"]))
    assert parts["eval_hash"].to_pylist().count(b["eval_hash"]) == 4  # all four generated anew
    rows = pq.read_table(b["predictions_path"]).to_pylist()
    assert {r["eval_hash"] for r in rows} == {b["eval_hash"]} and len(rows) == 4
    spec = EvalSpec(engine="hf", max_new_tokens=8).for_task("svamp")
    engine = HFEngine(str(second), "chat", spec.model_dump(),
                      [*spec.stop_strings, *get_template("chat").stop_strings(load_tokenizer(str(second), "chat"))])
    for row in rows:
        assert row["generation"] == engine({"prompt": [row["prompt"]]})["generation"][0]


def test_every_end_of_text_token_ends_a_generation_and_special_tokens_alone_are_empty(tiny, tmp_path):
    """A student that writes its answer, then <|endoftext|> (an end-of-text token that is not its
    template's EOS), then more text: the generation ends at <|endoftext|>. One that emits only
    special tokens until the budget runs out is empty, not truncated."""
    from raydistill.evaluate.hf_engine import END_OF_TEXT_TOKENS, end_token_ids, is_empty, is_truncated
    from scripted_model import build_scripted_model

    # 400 newlines (what a runaway student wrote) are empty too, and not truncated
    assert is_empty("\n" * 400) and not is_empty("\n7") and not is_truncated(400, 400, False, is_empty("\n" * 400))

    tokenizer = load_tokenizer(tiny, "chat")
    answer, after = tokenizer.tokenize("The answer is 7"), tokenizer.tokenize("8")
    ends = build_scripted_model(tmp_path / "ends", Path(tiny), [*answer, "<|endoftext|>", *after, "</s>"],
                                special_tokens=("<|endoftext|>",))
    silent = build_scripted_model(tmp_path / "silent", Path(tiny), ["<s>"])
    spec = EvalSpec(engine="hf", max_new_tokens=12, batch_size=2).for_task("svamp")
    prompt = get_template("chat").prompt("How many?", tokenizer)

    engine = HFEngine(str(ends), "chat", spec.model_dump(), [])
    endoftext = engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert "<|endoftext|>" in END_OF_TEXT_TOKENS and endoftext in end_token_ids(engine.tokenizer)
    assert endoftext != engine.tokenizer.eos_token_id and endoftext not in [engine.model.generation_config.eos_token_id]
    out = engine({"prompt": [prompt, prompt]})
    assert list(out["generation"]) == ["The answer is 7"] * 2  # not "The answer is 78"
    assert list(out["tokens_generated"]) == [len(answer)] * 2
    assert not any(out["empty"]) and not any(out["truncated"])

    out = HFEngine(str(silent), "chat", spec.model_dump(), [])({"prompt": [prompt]})
    assert out["generation"][0] == "" and out["tokens_generated"][0] == 12  # twelve <s>, none of them an end
    assert out["empty"][0] and not out["truncated"][0]
    rows = [{"question_id": "q", "prompt": prompt, "gold": "7", **{k: v[0] for k, v in out.items()
                                                                   if k in ("generation", "tokens_generated", "truncated", "empty")}}]
    result = metrics("svamp", grade("svamp", rows, "h"), "-")
    assert result.empty_rate == 1.0 and result.truncation_rate == 0.0

    # vLLM is given the same end ids (SamplingParams.stop_token_ids) and its output rows are counted
    # and flagged as the HF engine's are.
    from raydistill.evaluate.vllm_engine import vllm_post, vllm_pre

    request = vllm_pre({"question_id": "q", "prompt": prompt, "gold": "7", "sample": 0}, str(ends), "chat",
                       spec.model_dump(mode="json"), [])
    assert set(request["sampling_params"]["stop_token_ids"]) == engine.end_ids
    ids = engine.tokenizer.convert_tokens_to_ids([*answer, "<|endoftext|>"])
    row = vllm_post({**request, "generated_tokens": ids, "generated_text": "The answer is 7"}, str(ends), "chat", [], 12)
    assert row["tokens_generated"] == len(answer) and not row["empty"] and not row["truncated"]
    silent_ids = engine.tokenizer.convert_tokens_to_ids(["<s>"] * 12)
    row = vllm_post({**request, "generated_tokens": silent_ids, "generated_text": ""}, str(ends), "chat", [], 12)
    assert row["tokens_generated"] == 12 and row["empty"] and not row["truncated"]


def test_a_thinking_evaluation_grades_after_the_think_block_and_never_inside_an_unfinished_one(tiny):
    """eval.think: the answer comes from the text after </think>; a generation that ended inside its
    think block has no answer, even where its trace says "The answer is" with the gold in it."""
    from raydistill.answers import split_think

    assert split_think("<think>2 + 5 = 7</think> The answer is 7") == \
        split_think("2 + 5 = 7</think> The answer is 7")  # the open marker may be in the prompt
    assert split_think("The answer is 7").think is None and not split_think("The answer is 7").unfinished
    tokenizer = load_tokenizer(tiny, "chat")
    rows = [{"question_id": q, "prompt": "p", "gold": "7", "tokens_generated": 40, "truncated": t, "empty": False,
             "generation": g} for q, g, t in [
                ("finished", "<think>First, 2 + 5 = 7. The answer is 9 would be wrong.</think>\nThe answer is 7", False),
                ("cut", "<think>2 + 5 = 7, so the answer is 7 and", True),
                ("plain", "The answer is 7", False),
                ("wrong", "<think>2 + 5</think> The answer is 8", False)]]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    graded = {r["question_id"]: r for r in grade("svamp", rows, "h", think_markers=("<think>", "</think>"),
                                                   count_tokens=count).to_pylist()}
    assert (graded["finished"]["extracted"], graded["finished"]["correct"]) == ("7", True)
    assert graded["cut"]["think_unfinished"] and graded["cut"]["extracted"] is None and not graded["cut"]["correct"]
    assert (graded["plain"]["correct"], graded["plain"]["think_tokens"]) == (True, 0)
    assert graded["wrong"]["extracted"] == "8" and not graded["wrong"]["correct"]
    assert graded["finished"]["think_tokens"] == count("First, 2 + 5 = 7. The answer is 9 would be wrong.")
    result = metrics("svamp", grade("svamp", rows, "h", think_markers=("<think>", "</think>"), count_tokens=count), "-")
    assert result.think_unfinished_rate == 0.25 and result.accuracy == 0.5
    assert result.mean_think_tokens + result.mean_answer_tokens == 40
    # Without eval.think the paper's grader reads the whole text: the cut trace counts as right.
    plain = {r["question_id"]: r for r in grade("svamp", rows, "h").to_pylist()}
    assert plain["cut"]["correct"] and plain["cut"]["think_unfinished"] is None
    assert metrics("svamp", grade("svamp", rows, "h"), "-").think_unfinished_rate is None
