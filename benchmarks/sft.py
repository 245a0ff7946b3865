"""SFT throughput: Ray Train + DeepSpeed vs a plain single-process torch loop, and padding.

Both loops train the same student on the same SVAMP rows with the same micro-batches (1 Ray
worker, so the batch is identical); the first `--warmup` steps of each are left out. Padding is
measured on the whole cell with and without length grouping.

    RAYDISTILL_DATA_DIR=../shared/data python benchmarks/sft.py --out sft.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def _rows(n: int | None):
    from raydistill.datasets import load_train

    table = load_train("svamp", "chatgpt", level=1)
    return table if n is None else table.slice(0, n)


def _tokenized(student: str, model_path: str, rows: list[dict], cutoff: int):
    from transformers import AutoTokenizer

    from raydistill.students import get_student
    from raydistill.train import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = get_student(student).prompt_template
    template.fix_tokenizer(tokenizer)
    examples, _ = tokenize_examples(rows, tokenizer, template, cutoff)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return examples, pad_id


def padding(student: str, model_path: str, spec, cutoff: int) -> dict:
    """Padding fraction over the whole SVAMP cell, grouped by length or not."""
    from raydistill.train import micro_batches, padding_fraction

    examples, _ = _tokenized(student, model_path, _rows(None).to_pylist(), cutoff)
    lengths = [len(e["input_ids"]) for e in examples]
    return {
        "examples": len(lengths),
        "micro_batch_size": spec.micro_batch_size,
        "grouped": padding_fraction(micro_batches(lengths, spec, 0, 1, group_by_length=True), lengths),
        "ungrouped": padding_fraction(micro_batches(lengths, spec, 0, 1, group_by_length=False), lengths),
    }


def plain_torch(student: str, model_path: str, rows: list[dict], spec, warmup: int) -> dict:
    """The reference: one process, torch AdamW, the same micro-batches and accumulation."""
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.train import collate, micro_batches

    torch.manual_seed(spec.seed)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # as a Ray worker (OMP_NUM_THREADS)
    examples, pad_id = _tokenized(student, model_path, rows, spec.cutoff_len)
    batches = micro_batches([len(e["input_ids"]) for e in examples], spec, 0, 1)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    step_seconds, step_tokens, started, tokens = [], [], time.perf_counter(), 0
    for i, indices in enumerate(batches, start=1):
        batch = collate(examples, indices, pad_id)
        (model(**batch).loss / spec.grad_accum_steps).backward()
        tokens += int(batch["attention_mask"].sum())
        if i % spec.grad_accum_steps == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - started)
            step_tokens.append(tokens)
            started, tokens = time.perf_counter(), 0
    return _summary(step_seconds[warmup:], step_tokens[warmup:])


def ray_deepspeed(student: str, model_path: str, data_path: str, spec, warmup: int) -> dict:
    """The same run through `raydistill.train.fit` (Ray Train, 1 worker, DeepSpeed)."""
    import ray

    from raydistill.train import TrainJob, fit

    with tempfile.TemporaryDirectory() as storage:
        job = TrainJob(student=student, model_path=model_path, data_path=data_path, run_name="bench",
                       storage_path=storage, spec=spec.model_dump(mode="json"))
        ray.init(num_cpus=max(1, int(spec.cpus_per_worker)), include_dashboard=False, log_to_driver=False)
        try:
            started = time.perf_counter()
            result = fit(job)
            wall = time.perf_counter() - started
            history = json.loads((Path(result.model_path) / "train_state.json").read_text())["history"]
        finally:
            ray.shutdown()
    points = history[warmup:]
    summary = _summary([p["step_seconds"] for p in points],
                       [p["tokens_per_s"] * p["step_seconds"] for p in points])
    summary["fit_wall_seconds"] = wall
    return summary


def _summary(step_seconds: list[float], step_tokens: list[float]) -> dict:
    return {
        "steps_timed": len(step_seconds),
        "median_step_seconds": statistics.median(step_seconds),
        "tokens_per_s": sum(step_tokens) / sum(step_seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="tiny-llama")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the timing")
    parser.add_argument("--out", default="sft_benchmark.json")
    args = parser.parse_args(argv)

    from raydistill.spec import TrainSpec
    from raydistill.students import resolve_student

    model_path = str(resolve_student(args.student))
    spec = TrainSpec(epochs=1, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                     cutoff_len=args.cutoff, zero_stage=args.zero_stage, num_workers=1, learning_rate=1e-4,
                     cpus_per_worker=1)
    table = _rows(args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "rows.parquet")
        pq.write_table(table, data_path)
        plain = plain_torch(args.student, model_path, table.to_pylist(), spec, args.warmup)
        ray_ds = ray_deepspeed(args.student, model_path, data_path, spec, args.warmup)
    report = {
        "student": args.student,
        "spec": spec.model_dump(mode="json"),
        "examples": args.examples,
        "load_average": os.getloadavg(),
        "plain_torch": plain,
        "ray_train_deepspeed": ray_ds,
        "overhead_step_time": ray_ds["median_step_seconds"] / plain["median_step_seconds"] - 1,
        "padding_fraction": padding(args.student, model_path, spec, args.cutoff),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
