"""The driver: plans the requests of every cell of a run, serves what the cache holds, sends the
rest through one Ray Data actor pool of `TeacherCaller`s and writes each cell (`annotate_cells`,
`annotate`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa

from raydistill import files, prompts
from raydistill.annotate.batch import check_batch_teachers, run_batches
from raydistill.annotate.cache import CacheWriteError, RequestCache, prompt_hash, request_key
from raydistill.annotate.cells import (
    AnnotationResult,
    AnnotationRun,
    CellState,
    PlannedRequest,
    RequestTarget,
    reuse_finished_cell,
    set_aside_other_outputs,
)
from raydistill.annotate.questions import load_questions, question_length_levels
from raydistill.annotate.ratelimit import LIMITER_NAMESPACE, RateLimiter, limiter_name
from raydistill.annotate.spend import SpendCapReached, SpendGate, check_priced
from raydistill.annotate.teacher import SPEND_CAP, TeacherCaller, empty_result, finish_result
from raydistill.schemas import ANNOTATION_SCHEMA
from raydistill.spec.annotation import AnnotationSpec, BatchSpec, RuntimeSpec, TeacherSpec
from raydistill.spec.base import SpecError

log = logging.getLogger(__name__)


def _ensure_ray(runtime: RuntimeSpec, started: list[bool]) -> None:
    """Start or join Ray if the caller did not; records in ``started`` that this call did."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=runtime.ray_address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False if runtime.ray_address is None else None)
    started.append(True)


def _run_requests(reqs: list[PlannedRequest], teachers: list[TeacherSpec], runtime: RuntimeSpec, cache_dir: Path,
                  on_batch, gate: Any = None) -> None:
    """Send the requests through the actor pool; calls ``on_batch(list[result dict])`` as results arrive."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not reqs:
        return
    # Rate limiters: one named actor per (model, endpoint), shared by all actors and runs.
    handles = []
    names: list[str | None] = []
    for t in teachers:
        if t.requests_per_minute or t.tokens_per_minute:
            name = limiter_name(t)
            h = ray.remote(RateLimiter).options(
                name=name, namespace=LIMITER_NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1,
            ).remote(t.requests_per_minute, t.tokens_per_minute, t.burst_s)
            handles.append(h)
            names.append(name)
        else:
            names.append(None)

    actors, per_actor, batch, calls = runtime.layout()
    actors = min(actors, math.ceil(len(reqs) / batch))  # no actor without a batch to work on
    rows = [
        {"key": r.key, "teacher_idx": r.teacher_idx, "task": r.task, "gold": r.gold,
         "messages": json.dumps(r.messages, ensure_ascii=False), "sample": r.sample}
        for r in reqs
    ]
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.wait_for_min_actors_s)
    ctx.enable_progress_bars = runtime.ray_progress_bars
    # Start sending only when every actor is up, so the first seconds do not run at a fraction of
    # the concurrency while the other actors still import litellm.
    ctx.wait_for_min_actors_s = int(runtime.actor_start_timeout_s)
    try:
        # One block per batch, so the actors can work on many batches at once. from_items builds
        # the blocks in this process (from_arrow would run one remote metadata task per block);
        # the dataset keeps a copy of the context as it is now.
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch))
    finally:
        ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved
    ds = ds.map_batches(
        TeacherCaller,
        fn_constructor_kwargs=dict(
            teachers=[t.model_dump(mode="json") for t in teachers],
            runtime=runtime.model_dump(mode="json"),
            cache_dir=str(cache_dir),
            limiters=names,
            in_flight=per_actor,
            cache_since={str(shard): shard.stat().st_size for shard in RequestCache(cache_dir).shards()},
            gate=gate,
        ),
        batch_size=batch,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                  max_tasks_in_flight_per_actor=calls + 2),
        num_cpus=runtime.num_cpus_per_actor,
        resources=runtime.resources_per_actor or None,
    )
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            on_batch(out.to_pylist())
    except Exception as err:
        stopped = cache_write_error_in(err)
        if stopped is None:
            raise
        raise stopped from None
    del handles


def cache_write_error_in(err: BaseException) -> CacheWriteError | None:
    """The CacheWriteError an actor raised, out of the error Ray Data raises at the driver (which
    keeps only the remote traceback's text), so the run ends on its one line."""
    found = re.search(r"CacheWriteError: (.+)", str(err))
    return CacheWriteError(found.group(1).strip()) if found else None


def annotate_cells(cells: Sequence[tuple[AnnotationSpec, str | os.PathLike]], *, overwrite: bool = False,
                   retry_failed: bool = False, progress: bool | None = None,
                   max_spend_usd: float | None = None, mode: str = "sync",
                   batch: BatchSpec | None = None) -> AnnotationRun:
    """Annotate several cells in one Ray Data pipeline (requests shared between cells are sent once).

    Cells whose ``summary.json`` already carries the same cell hash are returned as they are,
    unless ``overwrite``, or ``retry_failed`` and some of their rows failed (the cell runs again: its
    completed requests come from the cache, only the failed rows are sent). Outputs of a different cell in a cell's folder (another hash, or a
    damaged summary) are moved to ``<folder>/superseded/`` first, never overwritten. The runtime
    settings (concurrency, actors, cache folder) of the first cell apply to the whole run.

    ``max_spend_usd`` caps what this run spends over all its cells (`raydistill.annotate.spend`):
    a teacher without a price is refused at once (SpecError) and a run that reaches the cap writes
    every answered row, marks the cells with rows left ``complete: false`` and raises
    `SpendCapReached` (its ``run`` holds the cells as written).

    ``mode="batch"`` sends the uncached requests through the providers' batch APIs
    (`raydistill.annotate.batch`, settings in ``batch``); the default ``"sync"`` sends them one by one.
    """
    if not cells:
        return AnnotationRun([], {})
    t_start = time.perf_counter()
    specs = [(s if isinstance(s, AnnotationSpec) else AnnotationSpec.model_validate(s), Path(d)) for s, d in cells]
    teachers = list({s.teacher.model_dump_json(): s.teacher for s, _ in specs}.values())
    check_priced(teachers, max_spend_usd)
    if mode not in ("sync", "batch"):
        raise SpecError(f"mode: {mode!r} is not sync or batch")
    batch_cfg = (batch or BatchSpec()) if mode == "batch" else None
    if batch_cfg is not None:
        check_batch_teachers(teachers)
    runtime = specs[0][0].runtime
    cache_dir = Path(runtime.cache_dir) if runtime.cache_dir else specs[0][1] / "request-cache"
    show = runtime.progress if progress is None else progress

    results: list[AnnotationResult | None] = [None] * len(specs)
    todo = _cells_to_run(specs, results, overwrite, retry_failed)
    if not todo:
        return AnnotationRun([r for r in results if r], {"cells": len(specs), "reused": len(specs)})
    # Another run (a second sweep or `raydistill annotate` on the same folders) may be annotating
    # some of these cells: wait for it, then reuse what it finished instead of sending it again.
    with files.exclusive_locks([specs[i][1] / CELL_LOCK for i in todo],
                               waiting="{path}: another run is annotating this cell; waiting for it"):
        if not overwrite:
            todo = _cells_to_run(specs, results, False, retry_failed, todo)
        totals = (_annotate(specs, todo, results, runtime, cache_dir, show, max_spend_usd, batch_cfg) if todo
                  else Counter())
    totals["wall_time_s"] = time.perf_counter() - t_start
    totals["cells"] = len(specs)
    totals["reused"] = len(specs) - len(todo)
    run = AnnotationRun([r for r in results if r is not None], dict(totals))
    left = [r for r in run.cells if r.rows_left]
    if max_spend_usd is not None and totals.get("capped", 0) + totals.get("probe_capped", 0):
        spent = float(totals.get("new_cost_usd", 0.0)) + float(totals.get("probe_new_cost_usd", 0.0))
        raise SpendCapReached(spent, max_spend_usd, sum(r.rows_left for r in left), len(left), run)
    return run


CELL_LOCK = ".lock"  # in a cell's folder, held while a run annotates it


def _cells_to_run(specs: list[tuple[AnnotationSpec, Path]], results: list[AnnotationResult | None],
                  overwrite: bool, retry_failed: bool, among: list[int] | None = None) -> list[int]:
    """Indices of the cells to annotate; the others' finished outputs go into ``results``."""
    todo = []
    for i in range(len(specs)) if among is None else among:
        spec, out = specs[i]
        r = None if overwrite else reuse_finished_cell(spec, out)
        if r is not None and retry_failed and r.failed:
            log.info("%s: %d row(s) failed; sending them again", spec.cell_name(), r.failed)
            r = None
        if r is not None:
            results[i] = r
            log.info("%s: outputs exist with the same cell hash, reused", spec.cell_name())
        else:
            todo.append(i)
    return todo


def cell_states(jobs: Iterable[tuple[int, AnnotationSpec, Path]]) -> tuple[list[TeacherSpec], list[CellState]]:
    """The distinct teachers of (index, spec, output folder) cells and each cell's state, its
    questions loaded once per (task, question set)."""
    teachers: list[TeacherSpec] = []
    tindex: dict[str, int] = {}
    qcache: dict[str, pa.Table] = {}
    states: list[CellState] = []
    for i, spec, out in jobs:
        tk = spec.teacher.model_dump_json()
        if tk not in tindex:
            tindex[tk] = len(teachers)
            teachers.append(spec.teacher)
        qk = spec.task + "|" + spec.questions.model_dump_json()
        if qk not in qcache:
            qcache[qk] = load_questions(spec.task, spec.questions)
        states.append(CellState(i, spec, out, qcache[qk], tindex[tk]))
    return teachers, states


def _annotate(specs: list[tuple[AnnotationSpec, Path]], todo: list[int], results: list[AnnotationResult | None],
              runtime: RuntimeSpec, cache_dir: Path, show: bool, max_spend_usd: float | None = None,
              batch: BatchSpec | None = None) -> Counter:
    """Annotate the cells ``todo`` (their locks held); fills ``results``, returns the run's totals."""
    t_start = time.perf_counter()
    teachers, states = cell_states((i, *specs[i]) for i in todo)
    for c in states:  # every cell's questions loaded: now make room for its outputs
        set_aside_other_outputs(c.spec, c.out_dir)

    started: list[bool] = []  # set when this call starts Ray (only if something is not cached)
    cache = RequestCache(cache_dir)
    totals: Counter = Counter()
    # The run's spending cap: one SpendGate actor, started with the first request sent.
    cap = {"usd": max_spend_usd, "gate": None, "batch": batch}
    try:
        # Stage 1: answer-only probes for hybrid cells that need them.
        probe_cells = [c for c in states if c.spec.hybrid and c.spec.hybrid.by == "answer_only"]
        if probe_cells:
            reqs, targets = _plan(probe_cells, teachers, probe=True)
            _execute(reqs, targets, states, cache, teachers, runtime, cache_dir, show, totals, "probe", started, cap)
            for c in probe_cells:
                _write_probe(c)
        if totals["probe_capped"]:  # the cap came during the probes: no rationale is asked for
            wall = time.perf_counter() - t_start
            for c in states:
                results[c.idx] = c.close(wall, {q: k for k, q in enumerate(c.qids)}, stopped=True)
            return totals
        for c in states:
            if c.spec.hybrid is None:
                assert c.spec.level is not None
                c.level_of = [c.spec.level] * len(c.qids)
            elif c.spec.hybrid.by == "question_length":
                c.level_of = question_length_levels(c.questions, c.spec.hybrid)
            else:
                h = c.spec.hybrid
                c.level_of = [h.easy_level if (p and p["error"] is None and p["correct"]) else h.hard_level
                              for p in c.probe_rows]
        # Stage 2: the rationales.
        reqs, targets = _plan(states, teachers, probe=False)
        _execute(reqs, targets, states, cache, teachers, runtime, cache_dir, show, totals, "annotate", started, cap)
        wall = time.perf_counter() - t_start
        for c in states:
            order = {q: k for k, q in enumerate(c.qids)}
            results[c.idx] = c.close(wall, order)
    finally:
        for c in states:
            if c.writer is not None:
                try:
                    c.writer.close()
                except Exception:
                    pass
            if c.tmp_path.exists():
                c.tmp_path.unlink()
        if started:
            import ray

            ray.shutdown()
        elif cap["gate"] is not None:
            import ray

            ray.kill(cap["gate"])
    return totals


def _plan(states: list[CellState], teachers: list[TeacherSpec], probe: bool
          ) -> tuple[dict[str, PlannedRequest], dict[str, list[RequestTarget]]]:
    reqs: dict[str, PlannedRequest] = {}
    targets: dict[str, list[RequestTarget]] = {}

    def add(c: CellState, qidx: int, level: int | None, role: str, sample: int = 0) -> None:
        spec = c.spec
        t = teachers[c.teacher_idx]
        if level is None:
            msgs = prompts.answer_only_messages(spec.task, c.qtext[qidx], spec.prompt_dir)
        else:
            gold = (c.gold[qidx] or None) if spec.show_gold else None
            msgs = prompts.build_messages(spec.task, level, spec.format, c.qtext[qidx], spec.prompt_dir, gold)
        key = request_key(t.model, msgs, t.sample_params(sample), sample)
        if key not in reqs:
            reqs[key] = PlannedRequest(key, c.teacher_idx, spec.task, c.gold[qidx] or "", msgs, prompt_hash(msgs),
                                       sample)
        targets.setdefault(key, []).append(RequestTarget(c.idx, qidx, level, role, sample))

    for c in states:
        for q in range(len(c.qids)):
            if probe:
                add(c, q, None, "probe")
            else:
                for sample in range(c.spec.samples):  # each sample its own request
                    add(c, q, c.level_of[q], "main", sample)
                if c.spec.pad is not None:
                    add(c, q, c.spec.pad.to_level, "pad_target")
    return reqs, targets


def _execute(reqs: dict[str, PlannedRequest], targets: dict[str, list[RequestTarget]], states: list[CellState],
             cache: RequestCache, teachers: list[TeacherSpec], runtime: RuntimeSpec, cache_dir: Path,
             show: bool, totals: Counter, stage: str, started: list[bool], cap: dict[str, Any] | None = None) -> None:
    from tqdm.auto import tqdm

    by_idx = {c.idx: c for c in states}
    cached = cache.load(set(reqs))
    bar = tqdm(total=len(reqs), desc=stage, unit="req", disable=not show, dynamic_ncols=True)
    counts: Counter = Counter()

    def on_batch(results: list[dict[str, Any]]) -> None:
        for res in results:
            req = reqs[res["key"]]
            for tgt in targets[res["key"]]:
                c = by_idx[tgt.cell]
                if tgt.role == "probe":
                    if res["error_kind"] == SPEND_CAP:
                        continue  # not sent: the cell's rationales are not asked for in this run
                    if not c.probe_rows:
                        c.probe_rows = [None] * len(c.qids)
                    c.probe_rows[tgt.qidx] = {**res, "req": req}
                    c.uses(tgt.qidx, req, res)
                else:
                    c.on_result(tgt, req, res)
            if not res["cache_hit"]:  # what this run spent, charged once: to the first cell using it
                by_idx[targets[res["key"]][0].cell].sums["new_cost"] += res["cost_usd"]
            counts["requests"] += 1
            counts["cache_hits"] += bool(res["cache_hit"])
            counts["capped"] += res["error_kind"] == SPEND_CAP  # not sent: a row left for the next run
            counts["failed"] += res["error"] is not None and res["error_kind"] != SPEND_CAP
            if not res["cache_hit"]:
                counts["api_calls"] += res["attempts"]
                counts["new_cost_usd"] += res["cost_usd"]
                counts["new_tokens_in"] += res["tokens_in"]
                counts["new_tokens_out"] += res["tokens_out"]
            counts["actor_cpu_s"] += res["cpu_s"]
        bar.update(len(results))
        bar.set_postfix(cached=counts["cache_hits"], failed=counts["failed"], refresh=False,
                        **({"not_sent_cap": counts["capped"]} if counts["capped"] else {}))

    try:
        # Cached responses are served here, without Ray; only the rest goes to the actor pool.
        from raydistill import answers

        hits = [r for r in reqs.values() if r.key in cached]
        for i in range(0, len(hits), 256):
            chunk = []
            for r in hits[i:i + 256]:
                res = empty_result(r.key)
                res["cache_hit"] = True
                chunk.append(finish_result(res, cached[r.key], r.task, r.gold, answers))
            on_batch(chunk)
        misses = [r for r in reqs.values() if r.key not in cached]
        if misses and cap is not None and cap["batch"] is not None:  # mode: batch
            # The cap's room: what the earlier stage of this run (the probes) spent is used up.
            room = None if cap["usd"] is None else cap["usd"] - totals["probe_new_cost_usd"]
            resend, sent = run_batches(misses, targets, by_idx, teachers, cap["batch"], cache_dir, show, on_batch,
                                       room)
            counts.update(sent)
            if resend:  # rows that failed or expired inside a batch, sent again one by one
                _ensure_ray(runtime, started)
                if room is not None:
                    import ray

                    if cap["gate"] is not None:
                        ray.kill(cap["gate"])
                    cap["gate"] = ray.remote(SpendGate).options(num_cpus=0, max_concurrency=1).remote(
                        room - counts["new_cost_usd"])
                _run_requests(resend, teachers, runtime, cache_dir, on_batch, cap["gate"])
        elif misses:
            _ensure_ray(runtime, started)
            if cap is not None and cap["usd"] is not None and cap["gate"] is None:
                import ray

                cap["gate"] = ray.remote(SpendGate).options(num_cpus=0, max_concurrency=1).remote(cap["usd"])
            _run_requests(misses, teachers, runtime, cache_dir, on_batch, cap["gate"] if cap else None)
            if counts["capped"]:  # when the cap closed, and what was in flight then (the run's record)
                import ray

                state = ray.get(cap["gate"].state.remote())
                totals["cap_closed_at"] = state["closed_at"]
                totals["cap_in_flight_at_close"] = state["in_flight_at_close"]
    finally:
        bar.close()
    if counts["requests"] != len(reqs):
        raise RuntimeError(f"{stage}: {len(reqs) - counts['requests']} requests produced no result")
    for k, v in counts.items():
        totals[f"{stage}_{k}" if stage != "annotate" else k] += v


def _write_probe(c: CellState) -> None:
    rows = []
    for q, p in enumerate(c.probe_rows or []):
        if p is None:
            continue
        rows.append(c.make_row(q, None, p["req"], p, fmt="answer_only"))
    c.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_parquet(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), c.out_dir / "probe.parquet")


def annotate(spec: AnnotationSpec | dict[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False,
             retry_failed: bool = False, progress: bool | None = None) -> AnnotationResult:
    """Annotate one cell into ``out_dir`` (annotations.parquet, examples.parquet, summary.json).

    Returns at once with ``reused=True`` when ``out_dir`` already holds this cell's outputs (and,
    with ``retry_failed``, none of its rows failed).
    """
    run = annotate_cells([(spec, out_dir)], overwrite=overwrite, retry_failed=retry_failed, progress=progress)
    return run.cells[0]
