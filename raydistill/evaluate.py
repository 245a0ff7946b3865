"""Evaluation stage: batched generation on Ray Data, graded by `raydistill.answers`.

Test questions -> the student's prompt template -> an actor pool of generation engines ->
extracted answer -> predictions Parquet (`PREDICTION_SCHEMA`) + metrics.

    raydistill eval --model tiny-llama --task svamp --limit 20 --out preds.parquet
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import answers
from raydistill.schemas import PREDICTION_SCHEMA
from raydistill.spec import EvalSpec


@dataclass(frozen=True)
class EvalResult:
    task: str
    accuracy: float
    n: int
    extraction_failure_rate: float
    mean_generated_tokens: float
    median_generated_tokens: float
    predictions_path: str


class HFGenerator:
    """Ray Data callable class: greedy batched `generate` with a left-padded HF causal LM."""

    def __init__(self, model_path: str, max_new_tokens: int, stop_strings: list[str], use_gpu: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.stop_strings = stop_strings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        prompts = [str(p) for p in batch["prompt"]]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        with torch.inference_mode():
            output = self.model.generate(
                **encoded, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                stop_strings=self.stop_strings or None, tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:].tolist()
        texts, counts = [], []
        for ids in new_tokens:
            ids = _until_eos(ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            texts.append(cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop_strings))
            counts.append(len(ids))
        batch["generation"] = np.array(texts, dtype=object)
        batch["tokens_generated"] = np.array(counts, dtype=np.int64)
        return batch


def _until_eos(ids: list[int], eos_id: int | None, pad_id: int | None) -> list[int]:
    """Generated ids up to and including the first EOS; trailing padding dropped."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and pad_id is not None and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """Text before the earliest stop string (the paper's evaluator stops generation there)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut].strip()


def build_prompts(test: pa.Table, template, tokenizer) -> list[dict]:
    return [
        {"question_id": r["question_id"], "prompt": template.prompt(r["question"], tokenizer), "gold": r["answer"]}
        for r in test.select(["question_id", "question", "answer"]).to_pylist()
    ]


def grade(task: str, rows: list[dict], cell_hash: str) -> pa.Table:
    """Prediction rows with the extracted answer and correctness, in `PREDICTION_SCHEMA`."""
    graded = [
        {
            "cell_hash": cell_hash,
            "question_id": r["question_id"],
            "prompt": r["prompt"],
            "generation": r["generation"],
            "extracted": answers.extract(task, r["generation"]),
            "gold": r["gold"],
            "correct": answers.is_correct(task, r["generation"], r["gold"]),
            "tokens_generated": int(r["tokens_generated"]),
        }
        for r in rows
    ]
    return pa.Table.from_pylist(graded, schema=PREDICTION_SCHEMA)


def metrics(task: str, predictions: pa.Table, path: str) -> EvalResult:
    rows = predictions.to_pylist()
    tokens = [r["tokens_generated"] for r in rows] or [0]
    n = len(rows)
    return EvalResult(
        task=task,
        accuracy=sum(r["correct"] for r in rows) / n if n else 0.0,
        n=n,
        extraction_failure_rate=sum(r["extracted"] is None for r in rows) / n if n else 0.0,
        mean_generated_tokens=float(statistics.fmean(tokens)),
        median_generated_tokens=float(statistics.median(tokens)),
        predictions_path=path,
    )


def generate(prompts: list[dict], model_path: str, spec: EvalSpec, stop_strings: list[str]) -> list[dict]:
    """Run the prompts through an actor pool of engines on Ray Data; returns rows with generations."""
    import ray

    if spec.engine == "vllm":
        raise NotImplementedError("the vLLM engine is not available yet; use engine: hf")
    dataset = ray.data.from_items(prompts)
    # Similar lengths in one batch waste less compute on padding.
    dataset = dataset.map(lambda r: {**r, "prompt_chars": len(r["prompt"])}).sort("prompt_chars")
    generated = dataset.map_batches(
        HFGenerator,
        fn_constructor_kwargs={"model_path": model_path, "max_new_tokens": spec.max_new_tokens,
                               "stop_strings": stop_strings, "use_gpu": spec.use_gpu},
        batch_size=spec.batch_size,
        concurrency=spec.num_actors,
        num_cpus=spec.cpus_per_actor,
        num_gpus=1 if spec.use_gpu else 0,
    )
    return generated.take_all()


def evaluate(model_path: str, student: str, task: str, test: pa.Table, spec: EvalSpec,
             out_path: str | Path, cell_hash: str = "") -> EvalResult:
    """Generate, grade and write predictions for one model on one test table."""
    from transformers import AutoTokenizer

    from raydistill.students import get_student

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = get_student(student).prompt_template
    template.fix_tokenizer(tokenizer)
    prompts = build_prompts(test, template, tokenizer)
    rows = generate(prompts, model_path, spec, list(template.stop_strings(tokenizer)))
    predictions = grade(task, rows, cell_hash).sort_by("question_id")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(predictions, out_path)
    return metrics(task, predictions, str(out_path))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="student registry name, or an HF folder")
    parser.add_argument("--student", help="template family when --model is a folder (default: --model)")
    parser.add_argument("--task", required=True, choices=answers.TASKS)
    parser.add_argument("--limit", type=int, help="evaluate only the first N test questions")
    parser.add_argument("--out", default="predictions.parquet", help="predictions Parquet path")
    parser.add_argument("--max-new-tokens", type=int, default=EvalSpec().max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=EvalSpec().batch_size)
    parser.add_argument("--num-actors", type=int, default=1)
    args = parser.parse_args(argv)

    import ray

    from raydistill.datasets import load_test
    from raydistill.students import resolve_student

    test = load_test(args.task)
    if args.limit:
        test = test.slice(0, args.limit)
    spec = EvalSpec(engine="hf", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    num_actors=args.num_actors)
    ray.init(ignore_reinit_error=True)
    result = evaluate(str(resolve_student(args.model)), args.student or args.model, args.task, test, spec, args.out)
    print(json.dumps(asdict(result), indent=2))
    return 0
