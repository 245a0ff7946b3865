"""One evaluation: prompts, generation on a Ray Data actor pool, grading, metrics (resumable).

Test questions -> the student's prompt template -> an actor pool of generation engines
(`raydistill.evaluate.hf_engine`, `raydistill.evaluate.vllm_engine`) -> extracted answer ->
predictions Parquet (`PREDICTION_SCHEMA`) + metrics (`EvalResult`). Every generation that used up
``max_new_tokens`` is flagged ``truncated``. Batches are written as they finish
(`raydistill.evaluate.parts`), keyed by the evaluation's identity (`eval_hash`). With several samples per
question the metrics add pass@k and maj@k (`raydistill.samples`).
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from raydistill import answers, files
from raydistill.answers import PAPER_GRADING, GraderOptions
from raydistill.evaluate.choose import EngineError, choose_engine
from raydistill.evaluate.hf_engine import HFEngine, load_tokenizer
from raydistill.evaluate.models import adapter_base, adds_tokens, is_adapter, merged_model
from raydistill.evaluate.parts import parts_dir, read_parts, write_part
from raydistill.evaluate.shared import generate_on_hosts, generate_on_vllm_hosts, hosts_group, stop_engine_hosts
from raydistill.evaluate.vllm_engine import (LoraPlan, model_max_len, release_engine_placements,
                                             replicate_samples, vllm_lora, vllm_max_model_len, vllm_processor,
                                             whole_questions)
from raydistill.records import ACTOR_STAGES
from raydistill.samples import sample_scores
from raydistill.schemas import PREDICTION_SCHEMA
from raydistill.spec import EvalSpec, content_hash
from raydistill.timing import Stopwatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    task: str
    accuracy: float
    n: int
    extraction_failure_rate: float
    truncation_rate: float  # share of generations cut by max_new_tokens (with text; empty ones apart)
    mean_generated_tokens: float
    median_generated_tokens: float
    predictions_path: str
    engine: str = "hf"
    eval_hash: str = ""
    max_new_tokens: int = 0
    samples_per_question: int = 1
    pass_at_k: float | None = None  # with several samples: unbiased pass@k, k = samples_per_question
    maj_at_k: float | None = None  # with several samples: majority vote over the extracted answers
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (records.TIME_STAGES)
    empty_rate: float = 0.0  # share of generations with only whitespace once special tokens are removed
    # thinking evaluations (eval.think) only: generations cut inside their think block, and the mean
    # lengths of the trace and of what follows it, in the student's tokens
    think_unfinished_rate: float | None = None
    mean_think_tokens: float | None = None
    mean_answer_tokens: float | None = None


# --------------------------------------------------------------------------- prompts and grading


def build_prompts(test: pa.Table, template, tokenizer) -> list[dict]:
    return [
        {"question_id": r["question_id"], "prompt": template.prompt(r["question"], tokenizer), "gold": r["answer"]}
        for r in test.select(["question_id", "question", "answer"]).to_pylist()
    ]


def grade(task: str, rows: list[dict], eval_hash: str, options: GraderOptions = PAPER_GRADING,
          think_markers: tuple[str, str] | None = None, count_tokens=None) -> pa.Table:
    """Prediction rows with the extracted answer and correctness, in `PREDICTION_SCHEMA`.

    ``think_markers`` (a thinking evaluation, ``eval.think``): the answer is extracted from the text
    after the think block only (`raydistill.answers.split_think`); a generation that ended inside the
    block has none (``think_unfinished``). ``count_tokens`` gives ``think_tokens`` (the trace's
    length in the student's tokens)."""
    graded = []
    for r in rows:
        answer, think_tokens, unfinished = r["generation"], None, None
        if think_markers:
            part = answers.split_think(r["generation"], think_markers)
            answer, unfinished = part.answer, part.unfinished
            think_tokens = count_tokens(part.think) if part.think and count_tokens else 0
        extracted, correct = (None, False) if unfinished else answers.grade(task, answer, r["gold"], options)
        graded.append({
            "eval_hash": eval_hash, "question_id": r["question_id"], "prompt": r["prompt"],
            "generation": r["generation"], "extracted": extracted, "gold": r["gold"], "correct": correct,
            "tokens_generated": int(r["tokens_generated"]), "truncated": bool(r["truncated"]),
            "empty": bool(r["empty"]), "think_tokens": think_tokens, "think_unfinished": unfinished,
        })
    return pa.Table.from_pylist(graded, schema=PREDICTION_SCHEMA)


def metrics(task: str, predictions: pa.Table, path: str, engine: str = "hf", eval_hash: str = "",
            max_new_tokens: int = 0) -> EvalResult:
    rows = predictions.to_pylist()
    tokens = [r["tokens_generated"] for r in rows] or [0]
    n = len(rows)
    several = sample_scores([r["question_id"] for r in rows], [r["extracted"] for r in rows],
                            [r["correct"] for r in rows])
    pass_k, maj_k = several.means() if several else (None, None)
    thinking = bool(rows) and rows[0].get("think_unfinished") is not None
    think_tokens = [r["think_tokens"] or 0 for r in rows] if thinking else []
    return EvalResult(
        task=task,
        accuracy=sum(r["correct"] for r in rows) / n if n else 0.0,
        n=n,
        extraction_failure_rate=sum(r["extracted"] is None for r in rows) / n if n else 0.0,
        truncation_rate=sum(bool(r["truncated"]) for r in rows) / n if n else 0.0,
        empty_rate=sum(bool(r["empty"]) for r in rows) / n if n else 0.0,
        mean_generated_tokens=float(statistics.fmean(tokens)),
        median_generated_tokens=float(statistics.median(tokens)),
        predictions_path=path,
        engine=engine,
        eval_hash=eval_hash,
        max_new_tokens=max_new_tokens,
        samples_per_question=several.k if several else 1,
        pass_at_k=pass_k,
        maj_at_k=maj_k,
        think_unfinished_rate=sum(bool(r["think_unfinished"]) for r in rows) / n if thinking else None,
        mean_think_tokens=float(statistics.fmean(think_tokens)) if thinking else None,
        mean_answer_tokens=float(statistics.fmean(t - k for t, k in zip(tokens, think_tokens))) if thinking else None,
    )


# --------------------------------------------------------------------------- generation

GENERATED_COLUMNS = ["question_id", "prompt", "gold", "generation", "tokens_generated", "truncated", "empty"]
ENGINE_TIME_COLUMNS = {"load_seconds": "model_load_eval", "generate_seconds": "generation",
                       "generate_cpu_seconds": "generation_cpu"}  # column -> ACTOR_STAGES


def generate_batches(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                     stop_strings: list[str], engine: str = "hf", lora: LoraPlan | None = None,
                     group: str | None = None) -> Iterator[list[dict]]:
    """Rows with generations, one list per finished batch, from an actor pool on Ray Data, or with
    ``group`` from that group's shared HF engines (`raydistill.evaluate.shared`).

    ``lora`` (vLLM only): ``model_path`` is the adapter's base and every request applies the adapter.
    With ``spec.timeout_s`` the generation runs in an actor of its own (`within_timeout`).
    """
    run = _generate if spec.timeout_s is None else within_timeout
    ordered = sorted(prompts, key=lambda r: len(r["prompt"]))  # similar lengths in one batch: less padding
    yield from run(ordered, model_path, template_name, spec, stop_strings, engine, lora, group)


class EngineTimeout(EngineError):
    """The engines did not finish an evaluation's generation within ``eval.timeout_s``."""


RELEASE_TIMEOUT_S = 10  # how long a stopped generation's actor gets to remove its placement groups


class _Generation:
    """`_generate` in an actor: the Ray Data pipeline and the engine actors it starts are owned by
    this actor and die with it; the placement groups of sharded vLLM engines do not, so `release`
    (called while `batches` runs) removes them."""

    def batches(self, *args) -> Iterator[list[dict]]:
        yield from _generate(*args)

    def release(self) -> None:
        release_engine_placements()


def within_timeout(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                   stop_strings: list[str], engine: str, lora: LoraPlan | None,
                   group: str | None = None) -> Iterator[list[dict]]:
    """`_generate` run by a zero-CPU actor, its batches streamed back; when the generation has not
    finished ``spec.timeout_s`` seconds after the start, the actor is killed (and with it the engines)
    and `EngineTimeout` raised. Batches yielded before that are the caller's to keep."""
    import ray

    runner = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)(_Generation).remote()
    stream = runner.batches.options(num_returns="streaming").remote(
        prompts, model_path, template_name, spec, stop_strings, engine, lora, group)
    deadline = time.monotonic() + spec.timeout_s
    try:
        while True:
            ready, _ = ray.wait([stream], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if group:  # the shared engines may be the ones stuck
                    stop_engine_hosts(group)
                raise EngineTimeout(
                    f"the {engine} engine did not finish generating for {len(prompts)} prompts within eval.timeout_s "
                    f"= {spec.timeout_s:g} s (engine start included); its actors were stopped and the batches finished "
                    "so far kept for a rerun: raise eval.timeout_s, or check that the engines got their resources "
                    "(ray status) and are not stuck")
            try:
                ref = next(stream)
            except StopIteration:
                return
            yield ray.get(ref)
    finally:
        ray.wait([runner.release.remote()], timeout=RELEASE_TIMEOUT_S)
        ray.kill(runner)


def _generate(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec, stop_strings: list[str],
              engine: str, lora: LoraPlan | None, group: str | None = None) -> Iterator[list[dict]]:
    """`generate_batches` in this process (``prompts`` sorted by length)."""
    import ray

    if engine == "vllm":
        yield from _generate_vllm(prompts, model_path, template_name, spec, stop_strings, lora, group)
        return
    if group:
        yield from generate_on_hosts(prompts, model_path, template_name, spec, stop_strings, group)
        return
    generated = ray.data.from_items(prompts).map_batches(
        HFEngine,
        fn_constructor_kwargs={"model_path": model_path, "template_name": template_name,
                               "spec": spec.model_dump(mode="json"), "stop_strings": stop_strings},
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=spec.num_actors),
        num_cpus=spec.cpus_per_actor,
        num_gpus=1 if spec.use_gpu else 0,
        resources=spec.resources_per_actor or None,
    )
    for batch in generated.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.select(GENERATED_COLUMNS + list(ENGINE_TIME_COLUMNS)).to_pylist()


def _generate_vllm(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                   stop_strings: list[str], lora: LoraPlan | None, group: str | None) -> Iterator[list[dict]]:
    """`_generate` on vLLM: the group's shared hosts (`generate_on_vllm_hosts`), or ray.data.llm's
    engines started for this evaluation, one request per sample (`replicate_samples`) regrouped into
    whole questions (`whole_questions`), the engines' placement groups released at the end."""
    import ray

    tokenizer = load_tokenizer(model_path, template_name)
    longest = max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
    context = vllm_max_model_len(spec, longest, model_max_len(model_path))
    if group:
        yield from generate_on_vllm_hosts(prompts, model_path, template_name, spec, stop_strings, context, lora, group)
        return
    key = uuid.uuid4().hex  # names this evaluation's placement groups of sharded vLLM engines
    dataset = ray.data.from_items(replicate_samples(prompts, spec.n_samples))
    generated = vllm_processor(model_path, template_name, spec, stop_strings, context, lora, key)(dataset)
    batches = (batch.select(["sample", *GENERATED_COLUMNS]).to_pylist()
               for batch in generated.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        yield from whole_questions(batches, spec.n_samples)
    finally:
        release_engine_placements(key)


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


def _hf_model(model_path: str, shared: bool) -> str:
    """The folder HF engines load: a LoRA adapter merged on disk (`merged_model`), or for shared
    hosts the adapter itself, which they merge into the base they keep loaded (`EngineHost`)."""
    if not is_adapter(model_path) or (shared and not adds_tokens(model_path)):
        return model_path
    return merged_model(model_path)


def evaluate(model_path: str, student: str, task: str, test: pa.Table, spec: EvalSpec,
             out_path: str | Path, grader: GraderOptions = PAPER_GRADING, progress: bool = True,
             engine_group: str | None = None, engine_slot: str | None = None) -> EvalResult:
    """Generate, grade and write predictions for one model on one test table (resumable).

    ``spec`` is resolved for ``task`` first (the task's protocol fills the fields it leaves open).
    ``engine_group`` (a sweep's): with ``spec.shared_engines``, the engines of that group that
    outlive this evaluation generate (`raydistill.evaluate.shared`); HF hosts are those of
    ``engine_slot`` (the caller's trial slot), so evaluations of other slots run beside it.
    """
    from tqdm.auto import tqdm

    from raydistill.students import get_student, get_template

    clock = Stopwatch()
    with clock("eval_prepare"):
        spec = spec.for_task(task)
        engine = choose_engine(spec)
        shares = spec.shared_engines and (engine == "vllm" or not spec.use_gpu)
        group = hosts_group(engine_group, engine_slot, engine) if shares and engine_group else None
        if spec.shared_engines and not group:
            log.warning("eval.shared_engines: this evaluation starts its own engines (%s)",
                        "HF engines on GPU start per trial" if engine_group else "no sweep to share them with")
        if engine == "hf" and spec.tensor_parallel_size > 1:
            log.warning("eval.tensor_parallel_size %d applies to vLLM engines; HF generate takes one GPU per actor",
                        spec.tensor_parallel_size)
        template_name = get_student(student).template
        key = eval_hash(model_digest(model_path), template_name, task, spec, engine, grader)
        lora = vllm_lora(model_path) if engine == "vllm" and is_adapter(model_path) else None
        model_path = lora.base if lora else _hf_model(str(model_path), shared=bool(group) and engine == "hf")
        tokenizer = load_tokenizer(model_path, template_name)
        template = get_template(template_name)
        prompts = build_prompts(test, template, tokenizer)
        parts = parts_dir(out_path)
        done = set(_current(read_parts(parts, key), prompts)["question_id"].to_pylist())
        todo = [p for p in prompts if p["question_id"] not in done]
        stop_strings = list(dict.fromkeys([*spec.stop_strings, *template.stop_strings(tokenizer)]))
        think_markers = template.think_markers if spec.think else None

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if todo:
        with tqdm(total=len(todo), desc=f"eval {task}", unit="q", disable=not progress) as bar:
            waiting, stage = time.perf_counter(), "eval_first_batch"
            for rows in generate_batches(todo, model_path, template_name, spec, stop_strings, engine, lora, group):
                clock.add(stage, time.perf_counter() - waiting)
                for column, engine_stage in ENGINE_TIME_COLUMNS.items():
                    clock.add(engine_stage, sum(r.get(column) or 0.0 for r in rows))
                with clock("grading"):
                    write_part(parts, grade(task, rows, key, grader, think_markers, count_tokens))
                bar.update(len(rows) // spec.n_samples)
                waiting, stage = time.perf_counter(), "eval_generating"
    with clock("eval_finish"):
        predictions = _current(read_parts(parts, key), prompts).sort_by("question_id")
        files.write_parquet(predictions, out_path)
        result = metrics(task, predictions, str(out_path), engine, key, spec.max_new_tokens)
    timings = clock.as_dict()
    if engine != "hf":  # the vLLM engine does not time its requests: no generation figure rather than 0
        for stage in ACTOR_STAGES:
            timings.pop(stage, None)
    return replace(result, timings=timings)
