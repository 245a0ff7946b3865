"""Evaluation throughput: one prompt per call (the paper's evaluator) vs the batched Ray Data engines.

Same model, same prompts (the first test questions of a task, in the student's template), same
greedy decoding and CPU budget, same run. Writes one JSON file with questions/s and tokens/s:

(a) one_prompt_per_call - `HFEngine` in this process, one `generate` call per prompt, torch
                          limited to --cpus threads; the model load is NOT timed (favours (a)).
(b) hf_batched_ray      - `raydistill.evaluate.generate_batches`: a Ray Data actor pool
                          (--actors x --cpus/--actors CPUs), batches of --batch-size, decoded in
                          rounds of RAYDISTILL_HF_ROUND_TOKENS (64) new tokens that drop finished
                          rows; timed end to end, actor start and model load included.
(b0) hf_batched_ray_one_generate_call - (b) with one `generate` call per batch (round tokens 0),
                          with --one-call-too: what the rounds save.
(c) vllm_ray            - `ray.data.llm` with vLLM (continuous batching), where vLLM is importable.

Tokens are new tokens before the first EOS/pad, counted the same way by both.

    python benchmarks/eval.py --out outputs/bench/eval.json               # SmolLM2-135M, ~5 minutes
    python benchmarks/eval.py --max-new-tokens 640 --one-call-too --cpus 1 --batch-size 64  # the paper's length
    python benchmarks/eval.py --model tiny-llama --questions 16 --out /tmp/eval.json  # no (c): head_dim 16
    .venv-vllm/bin/python benchmarks/eval.py --out outputs/bench/eval.json             # with (c)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAYDISTILL_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _rates(questions: int, tokens: int, seconds: float) -> dict:
    return {"questions": questions, "tokens": tokens, "seconds": round(seconds, 2),
            "questions_per_s": round(questions / seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


def one_prompt_per_call(model_path: str, template: str, prompts: list[dict], spec, stop: list[str],
                        cpus: int) -> dict:
    import torch

    from raydistill.evaluate import HFEngine

    torch.set_num_threads(cpus)
    engine = HFEngine(model_path, template, spec.model_dump(), stop)
    started, tokens = time.perf_counter(), 0
    for row in prompts:
        tokens += len(engine.generate_ids([row["prompt"]], round_tokens=0)[0])
    return _rates(len(prompts), tokens, time.perf_counter() - started)


def batched_ray(model_path: str, template: str, prompts: list[dict], spec, stop: list[str],
                engine: str = "hf") -> dict:
    from raydistill.evaluate import generate_batches

    started, tokens, rows = time.perf_counter(), 0, 0
    for batch in generate_batches(prompts, model_path, template, spec, stop, engine):
        rows += len(batch)
        tokens += sum(int(r["tokens_generated"]) for r in batch)
    return _rates(rows, tokens, time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="student registry name or HF folder")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--questions", type=int, default=64, help="questions for (b) and (c)")
    parser.add_argument("--single-questions", type=int, default=16, help="first N of them for (a)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPU budget of each variant")
    parser.add_argument("--no-vllm", action="store_true", help="skip (c) even where vLLM is importable")
    parser.add_argument("--one-call-too", action="store_true",
                        help="also run (b0): (b) with one generate call per batch instead of rounds")
    parser.add_argument("--out", default="outputs/bench/eval.json")
    args = parser.parse_args()

    import ray

    from raydistill.datasets import load_test
    from raydistill.evaluate import ROUND_TOKENS, build_prompts, load_tokenizer, vllm_available
    from raydistill.spec import EvalSpec
    from raydistill.students import get_student, get_template, resolve_student

    model_path = str(resolve_student(args.model))
    template = get_student(args.model).template
    tokenizer = load_tokenizer(model_path, template)
    prompts = build_prompts(load_test(args.task).slice(0, args.questions), get_template(template), tokenizer)
    spec = EvalSpec(engine="hf", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    num_actors=args.actors, cpus_per_actor=args.cpus / args.actors).for_task(args.task)
    stop = list(dict.fromkeys([*spec.stop_strings, *get_template(template).stop_strings(tokenizer)]))

    with_vllm = vllm_available() and not args.no_vllm
    if with_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the actors inherit it
        # vLLM pins its OpenMP threads itself (all physical cores by default): the same CPU budget.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.cpus - 1}")
    load_avg_at_start = os.getloadavg()
    results = {"a_one_prompt_per_call": one_prompt_per_call(
        model_path, template, prompts[: args.single_questions], spec, stop, args.cpus)}
    # (c)'s pre/post-processing tasks need a CPU beside the engine's; (b) uses only its actor's.
    ray.init(num_cpus=args.cpus + with_vllm, include_dashboard=False, log_to_driver=False)
    try:
        results["b_hf_batched_ray"] = batched_ray(model_path, template, prompts, spec, stop)
        if with_vllm:
            results["c_vllm_ray"] = batched_ray(model_path, template, prompts,
                                                spec.model_copy(update={"engine": "vllm"}), stop, "vllm")
    finally:
        ray.shutdown()
    if args.one_call_too:  # the actors read the variable when they start: a Ray session of its own
        os.environ["RAYDISTILL_HF_ROUND_TOKENS"] = "0"
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            results["b0_hf_batched_ray_one_generate_call"] = batched_ray(model_path, template, prompts, spec, stop)
        finally:
            ray.shutdown()

    def ratio(x: dict, y: dict) -> dict:
        return {k: round(x[k] / y[k], 2) for k in ("questions_per_s", "tokens_per_s")}

    a, b = results["a_one_prompt_per_call"], results["b_hf_batched_ray"]
    ratios = {"b_over_a": ratio(b, a)}
    if args.one_call_too:
        b0 = results["b0_hf_batched_ray_one_generate_call"]
        ratios.update(b0_over_a=ratio(b0, a), b_over_b0=ratio(b, b0))
    if with_vllm:
        ratios.update(c_over_a=ratio(results["c_vllm_ray"], a), c_over_b=ratio(results["c_vllm_ray"], b))
    import transformers

    versions = {"transformers": transformers.__version__, "ray": ray.__version__}
    if with_vllm:
        from importlib.metadata import version

        versions["vllm-cpu"] = version("vllm-cpu")
    report = {
        "config": {**vars(args), "template": template, "decoding": "greedy", "hf_round_tokens": ROUND_TOKENS,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "versions": versions,
                   "load_avg_at_start": load_avg_at_start, "load_avg_at_end": os.getloadavg()},
        "results": results,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
