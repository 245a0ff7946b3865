"""Provider batch APIs (`mode: batch`): a cell's uncached requests go to the teacher's provider as
batches through litellm's files and batches functions (``create_file``, ``create_batch``,
``retrieve_batch``, ``file_content``), at the provider's batch price.

- Each cell's requests (a request shared by cells belongs to the first cell of the run that uses
  it) are cut into batches within `BatchSpec.max_requests` and `max_bytes`, uploaded and created;
  every batch id is written to the cell's ``batches.json`` as soon as the provider returns it,
  before any polling, so a driver killed while it waits resumes polling the same batches (none
  created again, nothing paid twice).
- The driver polls every `poll_s` and logs each batch's state and counts when they change.
- A finished batch's output file is read: each reply goes into the request cache under the same
  key as a synchronous request (a synchronous run afterwards sends nothing), priced per row at the
  batch price. Rows in the error file, or missing from an expired / failed / cancelled batch, are
  sent again: synchronously (`resend: sync`, the default) or in a new batch (`resend: batch`, up to
  `max_rounds` rounds; what still fails then is written as a failed row).

litellm's files and batches take OpenAI's JSON Lines format for the routes below; other providers
(Vertex AI, Bedrock, Anthropic) are refused with `mode: batch` rather than half supported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from raydistill import files
from raydistill.annotate.cache import RequestCache
from raydistill.annotate.cells import CellState, PlannedRequest, RequestTarget
from raydistill.annotate.spend import _model_info, request_bound
from raydistill.annotate.teacher import SPEND_CAP, _scrub, empty_result, finish_result
from raydistill.spec.annotation import BatchSpec, TeacherSpec
from raydistill.spec.base import SpecError

log = logging.getLogger(__name__)

SUPPORTED = ("openai", "azure", "hosted_vllm", "litellm_proxy")  # litellm routes with OpenAI-format batches
LEDGER = "batches.json"  # in a cell's folder: the batches created for its requests
FINISHED = frozenset({"completed", "expired", "failed", "cancelled"})
ENDPOINT = "/v1/chat/completions"


def provider_of(t: TeacherSpec) -> tuple[str, str]:
    """(provider, the model name the provider knows) of a litellm model string."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    model, provider, _, _ = litellm.get_llm_provider(t.model)
    return provider, model


def check_batch_teachers(teachers: list[TeacherSpec]) -> None:
    for t in teachers:
        provider = provider_of(t)[0]
        if provider not in SUPPORTED:
            raise SpecError(
                f"mode: batch: teacher {t.model} goes through litellm's {provider!r} route; batch mode supports "
                f"{', '.join(SUPPORTED)} (OpenAI-format files and batches); use mode: sync for this teacher")


def batch_prices(t: TeacherSpec, discount: float) -> tuple[float, float] | None:
    """USD per input and output token in a batch: declared prices x ``discount``; else litellm's
    ``*_cost_per_token_batches``, or its synchronous price x ``discount`` where it has no batch
    price (litellm's batch_cost_calculator halves it); None when the model has no price."""
    if t.input_cost_per_token is not None or t.output_cost_per_token is not None:
        return float(t.input_cost_per_token or 0.0) * discount, float(t.output_cost_per_token or 0.0) * discount
    info = _model_info(t.model)
    if not info:
        return None
    out: list[float] = []
    for side in ("input", "output"):
        batch, sync = info.get(f"{side}_cost_per_token_batches"), info.get(f"{side}_cost_per_token")
        if batch is None and sync is None:
            return None
        out.append(float(batch) if batch is not None else float(sync) * discount)
    return out[0], out[1]


class Ledger:
    """A cell's ``batches.json``: every batch created for its requests, with the request keys it
    holds and whether its results have been read (``closed``)."""

    def __init__(self, folder: Path):
        self.path = folder / LEDGER
        self.batches: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                self.batches = json.loads(self.path.read_text())["batches"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SpecError(f"{self.path}: damaged ({err}); it lists batches already paid for: repair it "
                                "from the provider's batch list, or move it away to create them again") from None

    def open(self) -> list[dict[str, Any]]:
        return [b for b in self.batches if not b.get("closed")]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(self.path, {"batches": self.batches})


class BatchRunner:
    def __init__(self, teachers: list[TeacherSpec], spec: BatchSpec, cache_dir: Path, show: bool):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
        self.litellm = litellm
        self.teachers = teachers
        self.spec = spec
        self.cache_dir = cache_dir
        self.writer = None
        self.show = show
        self.prices = [batch_prices(t, spec.discount) for t in teachers]
        self.stats: Counter = Counter()

    # provider calls ------------------------------------------------------------------------------
    def _kw(self, t: TeacherSpec) -> dict[str, Any]:
        kw: dict[str, Any] = {"custom_llm_provider": provider_of(t)[0], "timeout": t.timeout_s}
        if t.api_base:
            kw["api_base"] = t.api_base
        if t.api_key_env:
            key = os.environ.get(t.api_key_env)
            if not key:
                raise SpecError(f"teacher.api_key_env: environment variable {t.api_key_env} is not set")
            kw["api_key"] = key
        return kw

    def _call(self, t: TeacherSpec, what: str, fn: Callable[..., Any], retry: bool = True, **kw: Any) -> Any:
        """A provider call, tried up to 4 times; ``retry=False`` for a call that must not be
        repeated blindly (a batch created by a call whose reply was lost would be paid twice)."""
        tries = 0
        while True:
            tries += 1
            try:
                return fn(**kw, **self._kw(t))
            except SpecError:
                raise
            except Exception as err:  # noqa: BLE001 - retried, then named in one line
                secret = os.environ.get(t.api_key_env or "", "")
                msg = _scrub(str(err), [secret]).replace("\n", " ")[:300]
                if tries >= 4 or not retry:
                    raise RuntimeError(f"batch API ({t.model}): {what} failed after {tries} tries: "
                                       f"{type(err).__name__}: {msg}") from None
                log.warning("batch API (%s): %s failed (%s), trying again", t.model, what, msg)
                time.sleep(min(30.0, 0.5 * 2 ** tries))

    def _lines(self, reqs: list[PlannedRequest]) -> list[bytes]:
        out = []
        for r in reqs:
            t = self.teachers[r.teacher_idx]
            body = {"model": provider_of(t)[1], "messages": r.messages, **t.sample_params(r.sample)}
            line = {"custom_id": r.key, "method": "POST", "url": ENDPOINT, "body": body}
            out.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
        return out

    def chunks(self, reqs: list[PlannedRequest]) -> list[tuple[list[PlannedRequest], bytes]]:
        """The requests cut into batches within max_requests and max_bytes (one teacher each)."""
        out: list[tuple[list[PlannedRequest], bytes]] = []
        by_teacher: dict[int, list[PlannedRequest]] = {}
        for r in reqs:
            by_teacher.setdefault(r.teacher_idx, []).append(r)
        for group in by_teacher.values():
            cur: list[PlannedRequest] = []
            data: list[bytes] = []
            size = 0
            for r, line in zip(group, self._lines(group)):
                if len(line) > self.spec.max_bytes:
                    raise SpecError(f"batch.max_bytes: one request is {len(line)} bytes, more than the "
                                    f"{self.spec.max_bytes} allowed per batch; raise batch.max_bytes")
                if cur and (len(cur) >= self.spec.max_requests or size + len(line) > self.spec.max_bytes):
                    out.append((cur, b"".join(data)))
                    cur, data, size = [], [], 0
                cur.append(r)
                data.append(line)
                size += len(line)
            if cur:
                out.append((cur, b"".join(data)))
        return out

    def submit(self, ledger: Ledger, cell_name: str, reqs: list[PlannedRequest], round_: int) -> list[dict]:
        """Upload and create the batches of ``reqs``; each is in the ledger before the next is made."""
        made = []
        for chunk, data in self.chunks(reqs):
            t = self.teachers[chunk[0].teacher_idx]
            upload = self._call(t, "upload", self.litellm.create_file,
                                file=(f"{cell_name}-r{round_}.jsonl", data), purpose="batch")
            batch = self._call(t, "create", self.litellm.create_batch, retry=False,
                               completion_window=self.spec.completion_window,
                               endpoint=ENDPOINT, input_file_id=upload.id,
                               metadata={"raydistill_cell": cell_name[:500]})
            entry = {"id": batch.id, "cell": cell_name, "teacher": t.model, "input_file_id": upload.id,
                     "round": round_, "requests": len(chunk), "bytes": len(data), "status": batch.status,
                     "created_at": time.time(), "keys": [r.key for r in chunk]}
            ledger.batches.append(entry)
            ledger.save()  # before any polling: a killed driver resumes this very batch
            self.stats["batches_created"] += 1
            log.info("batch %s (%s): created, %d requests, %d bytes", batch.id, cell_name, len(chunk), len(data))
            made.append(entry)
        return made

    # results --------------------------------------------------------------------------------------
    def collect(self, entry: dict[str, Any], batch: Any, reqs: dict[str, PlannedRequest]
                ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Results of a finished batch (each reply appended to the cache first) and, per key that
        got no reply, why."""
        t = next(x for x in self.teachers if x.model == entry["teacher"])
        i = self.teachers.index(t)
        results: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        seen: set[str] = set()
        took = max(0.0, float(getattr(batch, "completed_at", None) or time.time()) - float(entry["created_at"]))
        for line in self._file_lines(t, getattr(batch, "output_file_id", None)):
            key = line.get("custom_id")
            seen.add(key)
            resp = line.get("response") or {}
            body = resp.get("body") or {}
            if resp.get("status_code") != 200 or not body.get("choices"):
                failed[key] = _why(line)
                continue
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            p = self.prices[i] or (0.0, 0.0)
            rec = {"key": key, "model": t.model, "response": (choice.get("message") or {}).get("content") or "",
                   "tokens_in": tin, "tokens_out": tout, "cost_usd": tin * p[0] + tout * p[1],
                   "latency_s": took, "finish_reason": choice.get("finish_reason"), "t": time.time(),
                   "batch": entry["id"]}
            if self.writer is None:
                self.writer = RequestCache(self.cache_dir).writer()
            self.writer.append(rec)
            if key in reqs:
                r = reqs[key]
                out = empty_result(key)
                out["attempts"] = 1
                results.append(finish_result(out, rec, r.task, r.gold, _answers()))
        for line in self._file_lines(t, getattr(batch, "error_file_id", None)):
            key = line.get("custom_id")
            if key not in seen:
                seen.add(key)
                failed[key] = _why(line)
        for key in entry["keys"]:
            if key not in seen:
                failed[key] = f"batch {entry['id']} {batch.status}: no reply"
        return results, failed

    def _file_lines(self, t: TeacherSpec, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = self._call(t, f"download {file_id}", self.litellm.file_content, file_id=file_id)
        data = getattr(content, "content", content)
        out = []
        for raw in (data.decode() if isinstance(data, bytes) else str(data)).splitlines():
            if raw.strip():
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    log.warning("batch file %s: a line that is not JSON was skipped", file_id)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _why(line: dict[str, Any]) -> str:
    err = line.get("error") or ((line.get("response") or {}).get("body") or {}).get("error") or {}
    status = (line.get("response") or {}).get("status_code")
    code = err.get("code") if isinstance(err, dict) else None
    msg = err.get("message") if isinstance(err, dict) else str(err)
    return " ".join(str(x) for x in (f"HTTP {status}" if status else None, code, msg) if x) or "no reply"


def _answers():
    from raydistill import answers

    return answers


def run_batches(misses: list[PlannedRequest], targets: dict[str, list[RequestTarget]],
                cells: dict[int, CellState], teachers: list[TeacherSpec], spec: BatchSpec, cache_dir: Path,
                show: bool, on_batch: Callable[[list[dict[str, Any]]], None], cap_usd: float | None = None
                ) -> tuple[list[PlannedRequest], Counter]:
    """Send ``misses`` as batches and feed every answered row to ``on_batch``. Returns the requests
    to send again synchronously (``resend: sync``) and the counts (batches_created, batch_rows,
    batch_resent, batch_failed, batch_spent_usd)."""
    runner = BatchRunner(teachers, spec, cache_dir, show)
    reqs = {r.key: r for r in misses}
    owner: dict[int, list[PlannedRequest]] = {}
    for r in misses:
        owner.setdefault(targets[r.key][0].cell, []).append(r)
    ledgers = {idx: Ledger(cells[idx].out_dir) for idx in owner}
    for idx, c in cells.items():  # batches of this run's requests pending under another cell's folder
        if idx not in ledgers and (c.out_dir / LEDGER).exists():
            ledgers[idx] = Ledger(c.out_dir)
    models = {t.model for t in teachers}
    pending = {k for lg in ledgers.values() for b in lg.open() if b["teacher"] in models for k in b["keys"]}
    resumed = sum(b["teacher"] in models for lg in ledgers.values() for b in lg.open())
    if resumed:
        log.info("resuming %d batch(es) created by an earlier run (polling them, not creating them again)", resumed)
    stats = runner.stats
    resend: list[PlannedRequest] = []
    reserved = 0.0  # the cap: bounds of the batches this run waits for, at batch prices
    spent = 0.0
    closed_cap = False
    try:
        for idx, group in owner.items():
            new = [r for r in group if r.key not in pending]
            if cap_usd is not None and new:
                new, refused = _within_cap(new, teachers, runner, cap_usd, spent + reserved, closed_cap)
                closed_cap = closed_cap or bool(refused)
                if refused:
                    on_batch([_capped(r.key) for r in refused])
                reserved += sum(request_bound(teachers[r.teacher_idx], runner.prices[r.teacher_idx] or (0.0, 0.0),
                                              r.messages) for r in new)
            if new:
                runner.submit(ledgers[idx], cells[idx].name, new, 1)
        rounds: dict[str, int] = {}
        last: dict[str, tuple] = {}
        while True:
            # (a batch of a teacher this run does not use holds none of its requests: left for its own run)
            live = [(idx, b) for idx, lg in ledgers.items() for b in lg.open() if b["teacher"] in models]
            if not live:
                break
            again: dict[int, list[PlannedRequest]] = {}
            for idx, entry in live:
                t = next(x for x in teachers if x.model == entry["teacher"])
                batch = runner._call(t, f"retrieve {entry['id']}", runner.litellm.retrieve_batch, batch_id=entry["id"])
                counts = getattr(batch, "request_counts", None)
                seen = (batch.status, getattr(counts, "completed", None), getattr(counts, "failed", None))
                if last.get(entry["id"]) != seen:
                    last[entry["id"]] = seen
                    log.info("batch %s (%s): %s, %s of %s done, %s failed", entry["id"], entry["cell"], batch.status,
                             seen[1] if seen[1] is not None else "?", entry["requests"],
                             seen[2] if seen[2] is not None else "?")
                entry["status"] = batch.status
                if batch.status not in FINISHED:
                    continue
                results, failed = runner.collect(entry, batch, reqs)
                stats["batch_rows"] += len(results)
                cells[idx].stats["batch_rows"] += len(results)
                spent += sum(r["cost_usd"] for r in results)
                if results:
                    on_batch(results)
                entry.update(closed=True, closed_at=time.time(), answered=len(results), failed=len(failed))
                ledgers[idx].save()
                for key, why in failed.items():
                    if key not in reqs:
                        continue
                    round_ = rounds.get(key, entry.get("round", 1))
                    if spec.resend == "batch" and round_ < spec.max_rounds:
                        rounds[key] = round_ + 1
                        again.setdefault(idx, []).append(reqs[key])
                    elif spec.resend == "sync":
                        resend.append(reqs[key])
                    else:
                        stats["batch_failed"] += 1
                        out = empty_result(key)
                        out.update(error=f"batch: {why} (after {round_} batch round(s))", error_kind="batch",
                                   attempts=1)
                        on_batch([out])
                        continue
                    stats["batch_resent"] += 1
                    cells[idx].stats["batch_resent"] += 1
                if failed:
                    log.info("batch %s: %d row(s) failed or expired; sending them again %s", entry["id"],
                             sum(k in reqs for k in failed), "in a new batch" if spec.resend == "batch" else
                             "synchronously")
            for idx, group in again.items():
                by_round: dict[int, list[PlannedRequest]] = {}
                for r in group:
                    by_round.setdefault(rounds[r.key], []).append(r)
                for round_, rs in by_round.items():
                    runner.submit(ledgers[idx], cells[idx].name, rs, round_)
            if any(b["teacher"] in models for lg in ledgers.values() for b in lg.open()):
                time.sleep(spec.poll_s)
    finally:
        runner.close()
    stats["batch_spent_usd"] = spent
    return resend, stats


def _capped(key: str) -> dict[str, Any]:
    out = empty_result(key)
    out.update(error="not sent: the run reached its spending cap", error_kind=SPEND_CAP)
    return out


def _within_cap(reqs: list[PlannedRequest], teachers: list[TeacherSpec], runner: BatchRunner, cap: float,
                used: float, closed: bool) -> tuple[list[PlannedRequest], list[PlannedRequest]]:
    """The requests that fit under the cap in order (bounds at batch prices), and the rest."""
    if closed:
        return [], reqs
    fit: list[PlannedRequest] = []
    for k, r in enumerate(reqs):
        b = request_bound(teachers[r.teacher_idx], runner.prices[r.teacher_idx] or (0.0, 0.0), r.messages)
        if used + b > cap:
            return fit, reqs[k:]
        used += b
        fit.append(r)
    return fit, []
