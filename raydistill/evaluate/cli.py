"""Evaluation stage: batched generation on Ray Data, graded by `raydistill.answers`.

`raydistill eval` (`main`): evaluates one model on one or more tasks' test sets, writes
``<out-dir>/<model>/<task>.parquet`` and prints one JSON line of metrics per task. The first
paragraph of this docstring is the command's description.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from raydistill.answers import GraderOptions
from raydistill.evaluate.models import is_adapter
from raydistill.evaluate.run import evaluate
from raydistill.files import write_json
from raydistill.spec import EvalSpec
from raydistill.tasks import TASK_NAMES


def _spec_from_args(args: argparse.Namespace) -> EvalSpec:
    return EvalSpec(protocol=args.protocol, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                    stop_strings=args.stop_string, engine=args.engine, batch_size=args.batch_size,
                    num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor, use_gpu=args.gpu,
                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                    n_samples=args.n_samples, seed=args.seed, max_model_len=args.max_model_len,
                    enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
                    timeout_s=args.timeout_s)


def model_label(model: str) -> str:
    """The folder name predictions of ``--model`` go under: a registry name, else the folder's name."""
    from raydistill.students import STUDENTS

    return model if model in STUDENTS else Path(model).expanduser().resolve().name


def main(argv: list[str]) -> int:
    defaults = EvalSpec()
    parser = argparse.ArgumentParser(prog="raydistill eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="student registry name, an HF folder (e.g. an SFT output) or a LoRA adapter folder")
    parser.add_argument("--student", help="registry name whose template to use (default: from --model)")
    parser.add_argument("--task", nargs="+", required=True, choices=[*TASK_NAMES, "all"])
    parser.add_argument("--limit", type=int, help="evaluate only the first N test questions")
    parser.add_argument("--out-dir", default="predictions",
                        help="writes <out-dir>/<model>/<task>.parquet (<model>: the registry name or folder name)")
    parser.add_argument("--protocol", choices=["paper", "none"], default=defaults.protocol,
                        help="paper: each task's evaluation setting from the paper (math: greedy, 1024 new tokens; "
                             "commonsense: beam search with 5 beams, 640 new tokens; their stop strings); "
                             "none: greedy, 640 new tokens. --max-new-tokens, --num-beams and --stop-string "
                             "override it")
    parser.add_argument("--max-new-tokens", type=int, help="default: the protocol's")
    parser.add_argument("--num-beams", type=int, help="default: the protocol's")
    parser.add_argument("--stop-string", action="append",
                        help="a string that ends a generation (repeat for several); replaces the protocol's list")
    parser.add_argument("--grader-option", action="append", default=[], choices=list(GraderOptions.model_fields),
                        help="opt-in leniency on top of the paper's grading (docs/grading.md)")
    parser.add_argument("--engine", choices=["auto", "hf", "vllm"], default=defaults.engine)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-actors", type=int, default=defaults.num_actors)
    parser.add_argument("--cpus-per-actor", type=float, default=defaults.cpus_per_actor)
    parser.add_argument("--gpu", action="store_true", help="one GPU per engine actor")
    parser.add_argument("--max-model-len", type=int,
                        help="vLLM: the context each engine reserves KV cache for (default: the longest prompt "
                             "+ max new tokens, rounded up to 256)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM: skip CUDA-graph capture at engine start (default: eager on CPU, graphs on GPU)")
    parser.add_argument("--tensor-parallel-size", type=int, default=defaults.tensor_parallel_size,
                        help="vLLM: GPUs each engine is sharded over (needs --gpu)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                        help="vLLM: the share of each GPU an engine may take for weights and KV cache")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM: reuse the KV cache of shared prompt prefixes (default: vLLM's)")
    parser.add_argument("--max-num-seqs", type=int, help="vLLM: sequences an engine decodes at once (default: vLLM's)")
    parser.add_argument("--timeout-s", type=float,
                        help="fail a task's evaluation whose generation (engine start included) takes longer; "
                             "its engines are stopped (default: no limit)")
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--n-samples", type=int, default=defaults.n_samples,
                        help="generations per question, with --do-sample (or beams on HF); the metrics add pass@k "
                             "and maj@k; on vLLM sample i is a request seeded --seed + i")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", metavar="PATH",
                        help="also write the metrics here, apart from Ray's log lines: a JSON list of the objects "
                             "printed, one per task, rewritten as each task ends")
    args = parser.parse_args(argv)

    import ray
    from pydantic import ValidationError

    from raydistill.datasets import load_test
    from raydistill.students import resolve_student

    try:
        spec = _spec_from_args(args)
    except ValidationError as err:
        parser.error("; ".join(("--" + "-".join(map(str, e["loc"])).replace("_", "-") + ": " if e["loc"] else "")
                               + e["msg"].removeprefix("Value error, ") for e in err.errors()))
    grader = GraderOptions(**{name: True for name in args.grader_option})
    model_path = args.model if is_adapter(args.model) else str(resolve_student(args.model))
    out_dir = Path(args.out_dir) / model_label(args.model)
    tasks = TASK_NAMES if "all" in args.task else list(dict.fromkeys(args.task))
    ray.init(ignore_reinit_error=True)
    records = []
    try:
        for task in tasks:
            test = load_test(task)
            test = test.slice(0, args.limit) if args.limit else test
            result = evaluate(model_path, args.student or args.model, task, test, spec,
                              out_dir / f"{task}.parquet", grader)
            records.append({**asdict(result), "protocol": spec.protocol_note(task), "grader": grader.label()})
            if args.json:
                write_json(args.json, records)
            print(json.dumps(records[-1]), flush=True)
    finally:
        ray.shutdown()
    return 0
