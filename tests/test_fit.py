"""Does every trial fit? Decided at sweep start (raydistill.sweep.fit), on CPU: the built tiny-llama
student with a declared GPU memory just below (or between) what its trials need, so the refusal, the
micro-batch adjustment and the evaluation split really happen; and the generation memory estimate
against its arithmetic on the paper students' shapes."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoConfig

from raydistill.memory import (GIB, Shape, estimate_generation_memory, estimate_training_memory,
                               largest_generation_batch, vllm_minimum_bytes)
from raydistill.spec import SpecError, sweep_from_dict
from raydistill.sweep.console import trial_label

from test_memory import PAPER_STUDENTS

LABEL = "svamp chatgpt L1 cot tiny-llama seed 100"


def _sweep(tmp_path, train: dict, evaluation: dict | None = None):
    return sweep_from_dict({
        "name": "fit", "output_dir": str(tmp_path), "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1],
        "students": ["tiny-llama"], "train_limit": 16, "test_limit": 6,
        "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 1, "zero_stage": 0,
                  "cutoff_len": 256, **train},
        "eval": {"engine": "hf", "max_new_tokens": 6, "num_beams": 2, "batch_size": 6, **(evaluation or {})},
    })


def _tiny():
    from raydistill.students import resolve_student

    path = str(resolve_student("tiny-llama"))
    return path, AutoConfig.from_pretrained(path)


def _train_estimate(config, micro: int, longest: int) -> int:
    """What the sweep estimates for the tiny trial: fp32 (a CPU spec), ZeRO-0 on one worker, SDPA."""
    return estimate_training_memory(config, micro_batch_size=micro, seq_len=longest, precision="fp32", zero_stage=0,
                                    world_size=1, gradient_checkpointing=False, attn_implementation="sdpa").total()


def _longest(spec) -> int:
    """The cell's longest training sequence, as training tokenizes it."""
    return _sizes(spec)[0]


def _sizes(spec) -> tuple[int, int]:
    """(the cell's longest training sequence, the longest test prompt), as training and the engines
    tokenize them."""
    from raydistill.sweep.cells import prepare_cells, prepare_test
    from raydistill.sweep.fit import Sizes

    cells, _ = prepare_cells(spec)
    path, _ = _tiny()
    sizes = Sizes({"tiny-llama": path}, cells, {"svamp": prepare_test("svamp", spec.test_limit, spec.run_dir)})
    [trial] = spec.trials()
    return sizes.longest_train(trial), sizes.longest_prompt("tiny-llama", "svamp")


def test_a_trial_that_cannot_fit_is_refused_at_sweep_start_in_one_line(tmp_path, model_cache):
    import ray

    from raydistill.sweep import run_sweep

    spec = _sweep(tmp_path, {"gpu_memory_gb": 1.0})
    with pytest.raises(SpecError) as err:
        run_sweep(spec)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"trial {LABEL}: train tiny-llama: micro_batch_size 4 x ")
    _, config = _tiny()
    needed = _train_estimate(config, 4, _longest(spec))
    assert needed > GIB
    assert f"needs about {needed / GIB:.1f} GiB per GPU (params " in line and "overhead 1." in line
    assert "the GPU has 1.0 GiB" in line and "no micro_batch_size fits" in line
    # refused before the plan, before Ray, before any trial
    assert not ray.is_initialized()
    assert not (spec.run_dir / "trials.json").exists() and not (spec.run_dir / "trials").exists()
    [row] = json.loads((spec.run_dir / "fit.json").read_text())
    assert row["trial"] == LABEL and row["train"]["estimate_bytes"] == needed and not row["train"]["fits"]


@pytest.mark.slow
def test_adjusted_micro_batch_and_split_evaluation_run_and_are_recorded(tmp_path, model_cache, ray_local, caplog):
    """The declared memory lies between the estimates at micro-batch 2 and 4: the trial runs at 2
    with twice the accumulation, and its evaluation (2 beams, batch 6) in sub-batches that fit."""
    from raydistill.sweep import run_sweep

    probe = _sweep(tmp_path, {})
    probe.run_dir.mkdir(parents=True)
    longest, prompt = _sizes(probe)
    _, config = _tiny()
    train_gib = (_train_estimate(config, 2, longest) + _train_estimate(config, 4, longest)) / 2 / GIB
    # 2 prompts x 2 beams of the longest prompt + 6 tokens fit, 3 do not
    gen = dict(num_beams=2, prompt_len=prompt, max_new_tokens=6, precision="fp32", attn_implementation="sdpa")
    eval_gib = (estimate_generation_memory(config, batch_size=2, **gen).total() +
                estimate_generation_memory(config, batch_size=3, **gen).total()) / 2 / GIB
    spec = _sweep(tmp_path, {"gpu_memory_gb": train_gib, "fit": "adjust"}, {"gpu_memory_gb": eval_gib})

    with caplog.at_level(logging.INFO, logger="raydistill.sweep"):
        [record] = run_sweep(spec)
    record = record.model_dump(mode="json")
    lines = [r.getMessage() for r in caplog.records if "train.fit adjust" in r.getMessage()]
    assert lines == [f"trial {LABEL}: train.fit adjust: micro_batch_size 4 -> 2, gradient accumulation 2 -> 4 steps "
                     f"(global batch 8); about {_train_estimate(config, 2, longest) / GIB:.1f} GiB per GPU instead of "
                     f"{_train_estimate(config, 4, longest) / GIB:.1f}, train.gpu_memory_gb {train_gib:.1f} GiB"]
    # the trial was identified and ran with the micro-batch that fits; the global batch is the same
    assert record["train_spec"]["micro_batch_size"] == 2 and record["train_spec"]["global_batch_size"] == 8
    assert record["train_spec"]["fit"] == "adjust"
    assert record["fit"]["train"]["adjusted_micro_batch_size"] == 2
    assert record["fit"]["train"]["grad_accum_steps"] == [2, 4]
    assert record["fit"]["train"]["longest_sequence"] == longest
    assert record["metrics"]["train_steps"] == 16 // 8  # one epoch of 16 rows at global batch 8
    plan = json.loads((spec.run_dir / "trials.json").read_text())
    assert [p["trial_hash"] for p in plan] == [record["trial_hash"]]
    # the evaluation: generated in sub-batches that fit, recorded with the trial
    split = record["fit"]["eval"]["hf"]
    assert split["batch"] == 6 and not split["fits"]
    assert split["generate_batch_size"] == 2 and record["fit"]["eval"]["longest_prompt"] == prompt
    assert record["eval_spec"]["generate_batch_size"] == split["generate_batch_size"]
    assert split["adjusted_estimate_bytes"] <= eval_gib * GIB < split["estimate_bytes"]
    assert record["metrics"]["n_test"] == 6


def test_split_generation_gives_the_same_beam_search_predictions(model_cache):
    """HFEngine with generate_batch_size 2 (three generate calls, each left-padded to its own
    longest prompt) against one call over all six prompts: the same tokens, beam search and greedy."""
    from raydistill.evaluate.hf_engine import HFEngine
    from raydistill.spec import EvalSpec

    path, _ = _tiny()
    prompts = ["What is 2 + 3?", "A farmer has 17 sheep and buys 5 more. How many sheep does he have now?",
               "Add 4 and 4.", "Tom reads 12 pages a day for a week; how many pages is that in all, and how many "
               "are left of a 100-page book?", "Is 7 odd?", "Count the apples: 3 red ones and 9 green ones."]
    for beams in (3, 1):
        spec = EvalSpec(engine="hf", protocol="none", num_beams=beams, max_new_tokens=12).for_task("svamp")
        whole = HFEngine(path, "chat", spec.model_dump(mode="json"), [])
        split = HFEngine(path, "chat", spec.model_copy(update={"generate_batch_size": 2}).model_dump(mode="json"), [])
        calls = []
        inner = split.generate_ids.__func__

        def counting(prompts, round_tokens=64, _self=split):
            calls.append(len(prompts))
            return inner(_self, prompts, round_tokens)

        split.generate_ids = counting
        expected = whole.generate_ids(prompts)
        assert split.generate_ids(prompts) == expected
        assert calls == [6, 2, 2, 2]
        assert any(len(ids) > 0 for ids in expected)


def test_generation_estimate_is_its_arithmetic():
    """KV cache, logits, prefill and weights of the paper's commonsense protocol (batch 64 x 5 beams)."""
    llama = PAPER_STUDENTS["llama-3.2-1b"]
    est = estimate_generation_memory(llama, batch_size=64, num_beams=5, prompt_len=300, max_new_tokens=640,
                                     precision="bf16", attn_implementation="sdpa")
    per_token = 2 * 16 * 8 * 64 * 2  # k and v, 16 layers, 8 kv heads of 64, bf16: 32 KiB a token
    kv = per_token * 320 * 940
    assert est.kv_cache == kv + kv // 16  # plus one layer's copy
    assert est.weights == 1_235_814_400 * 2
    assert est.logits == 320 * 128256 * (2 + 12)
    assert est.activations == 320 * 300 * (5 * 2048 + 3 * 8192) * 2
    assert est.overhead == GIB + int(0.1 * (est.kv_cache + est.activations + est.logits))
    assert est.total() == est.weights + est.kv_cache + est.activations + est.logits + est.overhead
    # samples without beams: batch x n sequences; greedy: batch
    sampled = estimate_generation_memory(llama, batch_size=64, num_return_sequences=4, prompt_len=300,
                                         max_new_tokens=640, precision="bf16", attn_implementation="sdpa")
    assert sampled.kv_cache == (per_token * 256 * 940) * 17 // 16
    # BLOOM's eager attention: the prefill scores of every head, in bf16, fp32 and the cast back
    bloom = PAPER_STUDENTS["bloom-3b"]
    eager = estimate_generation_memory(bloom, batch_size=4, num_beams=5, prompt_len=200, max_new_tokens=640,
                                       precision="bf16", attn_implementation="eager")
    shape = Shape.of(bloom)
    assert eager.activations == 20 * 200 * (5 * 2560 + 2 * 10240) * 2 + 20 * 32 * 200**2 * 8
    assert shape.kv_heads == 32 and eager.kv_cache == (2 * 30 * 2560 * 2 * 20 * 840) * 31 // 30


def test_largest_generation_batch_and_the_vllm_minimum():
    bloom = PAPER_STUDENTS["bloom-3b"]
    args = dict(num_beams=5, prompt_len=300, max_new_tokens=640, precision="bf16", attn_implementation="eager")
    a100 = int(39.4 * GIB)
    assert estimate_generation_memory(bloom, batch_size=64, **args).total() > 2 * a100  # 320 sequences: ~90 GiB of KV
    fitting = largest_generation_batch(bloom, capacity_bytes=a100, batch_size=64, **args)
    assert fitting is not None and 1 <= fitting < 64
    assert estimate_generation_memory(bloom, batch_size=fitting, **args).total() <= a100
    assert estimate_generation_memory(bloom, batch_size=fitting + 1, **args).total() > a100
    assert largest_generation_batch(bloom, capacity_bytes=4 * GIB, batch_size=64, **args) is None  # weights: 5.6 GiB
    # vLLM: weights + one max_model_len sequence
    llama = PAPER_STUDENTS["llama-3.2-3b"]
    assert vllm_minimum_bytes(llama, max_model_len=2048, precision="bf16") == (
        3_212_749_824 * 2 + 2 * 28 * 8 * 128 * 2 * 2048)


def test_fit_is_not_in_an_old_trials_identity():
    """`train.fit` at its default and the evaluation's memory settings leave a trial's hash as it
    was: specs written before they existed keep their trials."""
    from raydistill.spec import EvalSpec, TrainSpec

    assert "fit" not in TrainSpec().model_dump() and TrainSpec(fit="adjust").model_dump()["fit"] == "adjust"
    spec = EvalSpec(gpu_memory_gb=39.4, generate_batch_size=8)
    assert "gpu_memory_gb" not in spec.identity() and "generate_batch_size" not in spec.identity()
    assert "generate_batch_size" not in EvalSpec().model_dump()
    trial = _sweep_trial()
    assert trial.trial_hash == trial.model_copy(
        update={"eval": trial.eval.model_copy(update={"generate_batch_size": 2})}).trial_hash


def _sweep_trial():
    spec = sweep_from_dict({"name": "x", "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1],
                            "students": ["tiny-llama"]})
    [trial] = spec.trials()
    assert trial_label(trial) == LABEL
    return trial
