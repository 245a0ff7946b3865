"""Evaluation stage: batched generation on Ray Data, graded by `raydistill.answers`.

Test questions -> the student's prompt template -> an actor pool of generation engines
(`raydistill.engines`) -> extracted answer -> predictions Parquet (`PREDICTION_SCHEMA`) + metrics.

Decoding follows each task's evaluation protocol from the paper (`raydistill.tasks`; math: greedy,
1,024 new tokens; commonsense: beam search with 5 beams, 640 new tokens) unless the spec overrides
it. Every generation that used up ``max_new_tokens`` is flagged ``truncated``.

Predictions are written batch by batch into ``<out>.parts/`` as they are generated, so a crash
loses only the batches in flight and a rerun generates only the questions not yet predicted.
Parts are keyed by the evaluation's identity (`eval_hash`: model weights, template, task,
decoding settings, engine, grader), and a row is reused only for a question asked with the same
prompt and gold answer, so another model or setting never inherits predictions; ``<out>`` is then
written from the parts, sorted by question id.

    raydistill eval --model tiny-llama --task svamp --limit 20 --out-dir preds
    raydistill eval --model outputs/x/adapter --task all --protocol none --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import answers, files
from raydistill.answers import PAPER_GRADING, GraderOptions
from raydistill.engines import (HFEngine, LoraPlan, choose_engine, load_tokenizer, model_max_len, vllm_lora,
                                vllm_max_model_len, vllm_processor)
from raydistill.schemas import PREDICTION_SCHEMA
from raydistill.spec import EvalSpec, content_hash
from raydistill.tasks import TASK_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    task: str
    accuracy: float
    n: int
    extraction_failure_rate: float
    truncation_rate: float  # share of generations cut by max_new_tokens
    mean_generated_tokens: float
    median_generated_tokens: float
    predictions_path: str
    engine: str = "hf"
    eval_hash: str = ""
    max_new_tokens: int = 0


# --------------------------------------------------------------------------- prompts and grading


def build_prompts(test: pa.Table, template, tokenizer) -> list[dict]:
    return [
        {"question_id": r["question_id"], "prompt": template.prompt(r["question"], tokenizer), "gold": r["answer"]}
        for r in test.select(["question_id", "question", "answer"]).to_pylist()
    ]


def grade(task: str, rows: list[dict], eval_hash: str, options: GraderOptions = PAPER_GRADING) -> pa.Table:
    """Prediction rows with the extracted answer and correctness, in `PREDICTION_SCHEMA`."""
    graded = []
    for r in rows:
        extracted, correct = answers.grade(task, r["generation"], r["gold"], options)
        graded.append({
            "eval_hash": eval_hash, "question_id": r["question_id"], "prompt": r["prompt"],
            "generation": r["generation"], "extracted": extracted, "gold": r["gold"], "correct": correct,
            "tokens_generated": int(r["tokens_generated"]), "truncated": bool(r["truncated"]),
        })
    return pa.Table.from_pylist(graded, schema=PREDICTION_SCHEMA)


def metrics(task: str, predictions: pa.Table, path: str, engine: str = "hf", eval_hash: str = "",
            max_new_tokens: int = 0) -> EvalResult:
    rows = predictions.to_pylist()
    tokens = [r["tokens_generated"] for r in rows] or [0]
    n = len(rows)
    return EvalResult(
        task=task,
        accuracy=sum(r["correct"] for r in rows) / n if n else 0.0,
        n=n,
        extraction_failure_rate=sum(r["extracted"] is None for r in rows) / n if n else 0.0,
        truncation_rate=sum(bool(r["truncated"]) for r in rows) / n if n else 0.0,
        mean_generated_tokens=float(statistics.fmean(tokens)),
        median_generated_tokens=float(statistics.median(tokens)),
        predictions_path=path,
        engine=engine,
        eval_hash=eval_hash,
        max_new_tokens=max_new_tokens,
    )


# --------------------------------------------------------------------------- incremental output


def parts_dir(out_path: str | Path) -> Path:
    """Where the per-batch prediction files of ``out_path`` accumulate."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def read_parts(parts: Path, eval_hash: str) -> pa.Table:
    """Every prediction written so far for this evaluation (parts of other evaluations are ignored).

    A part that cannot be read (damaged or cut short) is renamed ``*.corrupt`` and left
    out with a warning, so its questions are generated again and the other parts are kept.
    """
    part_files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    tables = []
    for f in part_files:
        try:
            tables.append(pq.read_table(f, schema=PREDICTION_SCHEMA))
        except (OSError, pa.ArrowException) as err:
            aside = f.with_name(f.name + ".corrupt")
            os.replace(f, aside)
            reason = " ".join(str(err).split())[:200]
            log.warning("%s: unreadable prediction part (%s); moved to %s, its questions are generated again",
                        f, reason, aside.name)
    table = pa.concat_tables(tables) if tables else PREDICTION_SCHEMA.empty_table()
    return table.filter(pa.compute.equal(table["eval_hash"], eval_hash)) if len(table) else table


def write_part(parts: Path, table: pa.Table) -> None:
    """Write one batch atomically (a crash mid-write leaves no half file behind)."""
    files.write_parquet(table, parts / f"part-{uuid.uuid4().hex}.parquet")


# --------------------------------------------------------------------------- generation


def generate_batches(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                     stop_strings: list[str], engine: str = "hf", lora: LoraPlan | None = None) -> Iterator[list[dict]]:
    """Rows with generations, one list per finished batch, from an actor pool on Ray Data.

    ``lora`` (vLLM only): ``model_path`` is the adapter's base and every request applies the adapter.
    """
    import ray

    # Similar lengths in one batch waste less compute on padding.
    dataset = ray.data.from_items(sorted(prompts, key=lambda r: len(r["prompt"])))
    if engine == "vllm":
        tokenizer = load_tokenizer(model_path, template_name)
        longest = max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
        context = vllm_max_model_len(spec, longest, model_max_len(model_path))
        generated = vllm_processor(model_path, template_name, spec, stop_strings, context, lora)(dataset)
    else:
        generated = dataset.map_batches(
            HFEngine,
            fn_constructor_kwargs={"model_path": model_path, "template_name": template_name,
                                   "spec": spec.model_dump(mode="json"), "stop_strings": stop_strings},
            batch_size=spec.batch_size,
            compute=ray.data.ActorPoolStrategy(size=spec.num_actors),
            num_cpus=spec.cpus_per_actor,
            num_gpus=1 if spec.use_gpu else 0,
            resources=spec.resources_per_actor or None,
        )
    columns = ["question_id", "prompt", "gold", "generation", "tokens_generated", "truncated"]
    for batch in generated.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.select(columns).to_pylist()


# --------------------------------------------------------------------------- models


def is_adapter(model_path: str | Path) -> bool:
    return (Path(model_path) / "adapter_config.json").is_file()


def adapter_base(adapter_path: str | Path) -> str:
    """The base model of a LoRA adapter folder (``base_model_name_or_path``), checked."""
    from raydistill.students import StudentError

    config = Path(adapter_path) / "adapter_config.json"
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise StudentError(f"{config}: unreadable adapter config ({reason}); save the adapter again "
                           "with save_pretrained") from None
    if not base or not isinstance(base, str):
        raise StudentError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown; "
                           "set it to the base model's folder or hub id")
    return base


def merged_model(adapter_path: str | Path) -> str:
    """An HF folder with the LoRA adapter merged into its base model (built once, then cached)."""
    from raydistill.students import STUDENT_INFO_FILE, default_cache_dir

    adapter = Path(adapter_path).resolve()
    stamp = [str(adapter)] + [(f.name, f.stat().st_mtime_ns) for f in sorted(adapter.iterdir()) if f.is_file()]
    target = default_cache_dir() / "merged" / content_hash(stamp)
    if (target / "config.json").is_file():
        return str(target)
    base = adapter_base(adapter)
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(tmp)
    if (adapter / STUDENT_INFO_FILE).is_file():
        shutil.copy(adapter / STUDENT_INFO_FILE, tmp / STUDENT_INFO_FILE)
    try:
        os.replace(tmp, target)
    except OSError:  # another process merged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# --------------------------------------------------------------------------- evaluate


def model_digest(model_path: str | Path) -> str:
    """The weights' part of an evaluation's identity: the folder's digest, and for a LoRA
    adapter also its base model's."""
    from raydistill.students import weights_digest

    if is_adapter(model_path):
        return content_hash([weights_digest(model_path), weights_digest(adapter_base(model_path))])
    return weights_digest(model_path)


def eval_hash(model: str, template: str, task: str, spec: EvalSpec, engine: str, grader: GraderOptions) -> str:
    """The identity of one evaluation: whatever determines its predictions apart from the
    questions themselves (model weights, template, task, the resolved decoding settings, the
    engine that ran, the grader); not how the work is spread over actors. A resumed row must
    also have the current question's prompt and gold answer (`_current`)."""
    return content_hash({"model": model, "template": template, "task": task,
                         "eval": {**spec.result_fields(), "engine": engine}, "grader": grader.model_dump()})


def _current(table: pa.Table, prompts: list[dict]) -> pa.Table:
    """The rows of ``table`` whose question is asked now with the same prompt and gold answer."""
    wanted = {p["question_id"]: (p["prompt"], p["gold"]) for p in prompts}
    rows = zip(table["question_id"].to_pylist(), table["prompt"].to_pylist(), table["gold"].to_pylist())
    return table.filter(pa.array([wanted.get(q) == (p, g) for q, p, g in rows], pa.bool_()))


def evaluate(model_path: str, student: str, task: str, test: pa.Table, spec: EvalSpec,
             out_path: str | Path, grader: GraderOptions = PAPER_GRADING, progress: bool = True) -> EvalResult:
    """Generate, grade and write predictions for one model on one test table (resumable).

    ``spec`` is resolved for ``task`` first (the task's protocol fills the fields it leaves open).
    """
    from tqdm.auto import tqdm

    from raydistill.students import get_student, get_template

    spec = spec.for_task(task)
    engine = choose_engine(spec)
    template_name = get_student(student).template
    key = eval_hash(model_digest(model_path), template_name, task, spec, engine, grader)
    lora = vllm_lora(model_path) if engine == "vllm" and is_adapter(model_path) else None  # else merged
    model_path = lora.base if lora else merged_model(model_path) if is_adapter(model_path) else str(model_path)
    tokenizer = load_tokenizer(model_path, template_name)
    template = get_template(template_name)
    prompts = build_prompts(test, template, tokenizer)
    parts = parts_dir(out_path)
    done = set(_current(read_parts(parts, key), prompts)["question_id"].to_pylist())
    todo = [p for p in prompts if p["question_id"] not in done]
    stop_strings = list(dict.fromkeys([*spec.stop_strings, *template.stop_strings(tokenizer)]))
    if todo:
        with tqdm(total=len(todo), desc=f"eval {task}", unit="q", disable=not progress) as bar:
            for rows in generate_batches(todo, model_path, template_name, spec, stop_strings, engine, lora):
                write_part(parts, grade(task, rows, key, grader))
                bar.update(len(rows) // spec.n_samples)
    predictions = _current(read_parts(parts, key), prompts).sort_by("question_id")
    files.write_parquet(predictions, out_path)
    return metrics(task, predictions, str(out_path), engine, key, spec.max_new_tokens)


# --------------------------------------------------------------------------- command line


def _spec_from_args(args: argparse.Namespace) -> EvalSpec:
    return EvalSpec(protocol=args.protocol, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                    stop_strings=args.stop_string, engine=args.engine, batch_size=args.batch_size,
                    num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor, use_gpu=args.gpu,
                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                    n_samples=args.n_samples, seed=args.seed, max_model_len=args.max_model_len,
                    enforce_eager=args.enforce_eager)


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
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--n-samples", type=int, default=defaults.n_samples)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)

    import ray

    from raydistill.datasets import load_test
    from raydistill.students import resolve_student

    from pydantic import ValidationError

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
    try:
        for task in tasks:
            test = load_test(task)
            test = test.slice(0, args.limit) if args.limit else test
            result = evaluate(model_path, args.student or args.model, task, test, spec,
                              out_dir / f"{task}.parquet", grader)
            print(json.dumps({**asdict(result), "protocol": spec.protocol_note(task),
                              "grader": grader.label()}), flush=True)
    finally:
        ray.shutdown()
    return 0
