"""`TeacherCaller`, the Ray Data actor that calls teachers through litellm: rate limits, retries
(honouring Retry-After), timeouts, cost, answer extraction; each completed response is appended
to the cache at once. API keys come from the environment and are scrubbed from error text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from raydistill.annotate.cache import CacheFollower, CacheWriteError, RequestCache
from raydistill.annotate.ratelimit import LIMITER_NAMESPACE
from raydistill.annotate.spend import request_bound, token_prices
from raydistill.spec.annotation import RuntimeSpec, TeacherSpec

log = logging.getLogger(__name__)


SPEND_CAP = "spend_cap"  # error_kind of a row not sent because the run reached its spending cap

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
RETRYABLE_NAMES = frozenset(
    {
        "Timeout",
        "APITimeoutError",
        "TimeoutError",
        "APIConnectionError",
        "RateLimitError",
        "InternalServerError",
        "ServiceUnavailableError",
        "BadGatewayError",
        "ClientConnectionError",
        "ServerDisconnectedError",
    }
)


class _Failed(Exception):
    def __init__(self, kind: str, reason: str, attempts: int):
        super().__init__(reason)
        self.kind, self.reason, self.attempts = kind, reason, attempts


def _classify(e: BaseException) -> tuple[bool, str, int | None]:
    """(retryable, kind, http status) of an exception from litellm."""
    status = getattr(e, "status_code", None)
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    name = type(e).__name__
    if isinstance(e, asyncio.TimeoutError) or name in ("Timeout", "APITimeoutError") or status == 408:
        return True, "timeout", status
    if status == 429 or name == "RateLimitError":
        return True, "rate_limit", status
    if status is not None and status in RETRYABLE_STATUS or (status or 0) >= 500:
        return True, f"http_{status}", status
    if name in RETRYABLE_NAMES:
        return True, "connection" if "Connection" in name else name, status
    if status is not None:
        return False, f"http_{status}", status
    return False, name, status


def _retry_after(e: BaseException) -> float | None:
    for obj in (getattr(e, "response", None), e):
        headers = getattr(obj, "headers", None) or getattr(obj, "litellm_response_headers", None)
        if not headers:
            continue
        try:
            v = headers.get("retry-after") or headers.get("Retry-After")
            if v is not None:
                return max(0.0, float(v))
        except (TypeError, ValueError, AttributeError):
            pass
    return None


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def empty_result(key: str) -> dict[str, Any]:
    return {"key": key, "response": None, "extracted": None, "correct": None, "tokens_in": 0, "tokens_out": 0,
            "cost_usd": 0.0, "latency_s": 0.0, "error": None, "error_kind": None, "cache_hit": False,
            "attempts": 0, "finish_reason": None, "cpu_s": 0.0}


def finish_result(out: dict[str, Any], rec: dict[str, Any], task: str, gold: str | None, answers: Any
                   ) -> dict[str, Any]:
    """Fill a result from a completed response (fresh or cached) and verify its answer."""
    out.update(response=rec["response"], tokens_in=int(rec.get("tokens_in") or 0),
               tokens_out=int(rec.get("tokens_out") or 0), cost_usd=float(rec.get("cost_usd") or 0.0),
               latency_s=float(rec.get("latency_s") or 0.0), finish_reason=rec.get("finish_reason"))
    if not out["response"]:
        out.update(error=f"empty response (finish_reason={rec.get('finish_reason')})", error_kind="empty")
        return out
    try:
        out["extracted"] = answers.extract(task, out["response"])
        out["correct"] = bool(answers.is_correct(task, out["response"], gold)) if gold else None
    except Exception as e:  # noqa: BLE001 - a checker bug must not lose the response
        out["correct"] = None
        log.warning("answer check failed for %s: %s", out["key"][:12], e)
    return out


class TeacherCaller:
    """Ray Data actor UDF: one teacher request per row, many in flight per actor via asyncio.

    Input columns: key, teacher_idx, task, gold, messages (JSON), sample. Cached requests never reach it.
    Output columns: key, response, extracted, correct, tokens_in, tokens_out, cost_usd, latency_s,
    error, error_kind, cache_hit, attempts, finish_reason, cpu_s.
    """

    SLOT_TOLERANCE_S = 0.1

    def __init__(self, teachers: list[dict[str, Any]], runtime: dict[str, Any], cache_dir: str,
                 limiters: list[str | None], in_flight: int, cache_since: dict[str, int], gate: Any = None):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        litellm.set_verbose = False
        logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
        self.litellm = litellm
        self.teachers = [TeacherSpec.model_validate(t) for t in teachers]
        self.runtime = RuntimeSpec.model_validate(runtime)
        self.cache = RequestCache(cache_dir).writer(self.runtime.fsync)
        self.appended = CacheFollower(Path(cache_dir), cache_since)
        self.limiter_names = limiters
        self.limiters: list[Any] = [None] * len(limiters)
        self.in_flight = in_flight
        self.sem: asyncio.Semaphore | None = None
        self.cpu_mark = time.process_time()
        self.expected_out = [min(t.max_tokens, 256) for t in self.teachers]
        self.unpriced = [False] * len(self.teachers)
        self.gate = gate  # the run's SpendGate (raydistill.annotate.spend), when it has a cap
        self.prices = [token_prices(t) for t in self.teachers] if gate is not None else []
        from raydistill import answers

        self.answers = answers
        # litellm imports and builds much of its machinery on the first call; do it now, offline,
        # so the first real requests are not held up behind it.
        try:
            litellm.completion(model=self.teachers[0].model, messages=[{"role": "user", "content": "warm-up"}],
                               mock_response="ok")
        except Exception:  # noqa: BLE001 - a warm-up only
            pass

    # -- helpers -------------------------------------------------------------------------------
    def _limiter(self, i: int) -> Any:
        if self.limiter_names[i] is None:
            return None
        if self.limiters[i] is None:
            import ray

            self.limiters[i] = ray.get_actor(self.limiter_names[i], namespace=LIMITER_NAMESPACE)
        return self.limiters[i]

    def _api_key(self, t: TeacherSpec) -> str | None:
        if t.api_key_env:
            key = os.environ.get(t.api_key_env)
            if not key:
                raise _Failed("auth", f"environment variable {t.api_key_env} is not set on this worker", 0)
            return key
        return None

    def _cost(self, i: int, resp: Any, tin: int, tout: int) -> float:
        t = self.teachers[i]
        if t.input_cost_per_token is not None or t.output_cost_per_token is not None:
            return tin * (t.input_cost_per_token or 0.0) + tout * (t.output_cost_per_token or 0.0)
        hidden = getattr(resp, "_hidden_params", None) or {}
        if hidden.get("response_cost") is not None:  # litellm priced it already
            return float(hidden["response_cost"])
        if self.unpriced[i]:
            return 0.0
        try:
            return float(self.litellm.completion_cost(completion_response=resp) or 0.0)
        except Exception:
            self.unpriced[i] = True  # a model litellm has no price for (local servers): 0, and stop asking
            return 0.0

    async def _wait_for_slot(self, limiter: Any, est_tokens: float) -> None:
        """Reserve a slot from the shared limiter and sleep until it. A slot this process reached
        late (its event loop was busy) is given up and a new one reserved, so a stall here never
        turns into a burst at the server."""
        for _ in range(8):
            t0 = time.monotonic()
            delay = await limiter.reserve.remote(est_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - t0 - delay <= self.SLOT_TOLERANCE_S:
                return

    async def _send(self, i: int, messages: list[dict[str, str]], sample: int) -> tuple[Any, int, float]:
        t = self.teachers[i]
        key = self._api_key(t)
        kw: dict[str, Any] = dict(model=t.model, messages=messages, timeout=t.timeout_s, num_retries=0,
                                  max_retries=0, drop_params=t.drop_unsupported_params, **t.sample_params(sample))
        if t.api_base:
            kw["api_base"] = t.api_base
        if key:
            kw["api_key"] = key
        est = sum(len(m["content"]) for m in messages) / 4 + self.expected_out[i]
        limiter = self._limiter(i)
        attempts = 0
        while True:
            attempts += 1
            if limiter is not None:
                await self._wait_for_slot(limiter, est)
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(self.litellm.acompletion(**kw), timeout=t.timeout_s * 1.5 + 5)
                return resp, attempts, time.perf_counter() - t0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is classified and recorded
                retry, kind, status = _classify(e)
                if not retry or attempts >= self.runtime.max_attempts:
                    msg = _scrub(str(e), [key or ""]).replace("\n", " ")[:400]
                    st = f" (HTTP {status})" if status else ""
                    raise _Failed(kind, f"{type(e).__name__}{st} after {attempts} attempt(s): {msg}", attempts) from None
                base = min(self.runtime.backoff_max_s, self.runtime.backoff_base_s * 2 ** (attempts - 1))
                wait = base * random.uniform(0.5, 1.0)
                ra = _retry_after(e)
                if ra is not None:
                    wait = max(wait, min(ra, self.runtime.retry_after_max_s))
                await asyncio.sleep(wait)

    async def _row(self, r: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._row_inner(r)
        except CacheWriteError:
            raise  # the run stops: a row must not be answered without its record in the cache
        except Exception as e:  # noqa: BLE001 - a bug here must cost one row, not the job
            log.exception("internal error on request %s", r["key"][:12])
            out = empty_result(r["key"])
            out.update(error_kind="internal", error=f"internal error: {type(e).__name__}: {str(e)[:300]}")
            return out

    async def _row_inner(self, r: dict[str, Any]) -> dict[str, Any]:
        out = empty_result(r["key"])
        i = int(r["teacher_idx"])
        t = self.teachers[i]
        messages = json.loads(r["messages"])
        done = self.appended.find(r["key"])
        if done is not None:  # completed by an actor of this run that died before returning it
            return finish_result(out, done, r["task"], r.get("gold"), self.answers)
        assert self.sem is not None
        async with self.sem:
            bound = None
            if self.gate is not None:  # the spending cap: room for this request's most expensive reply?
                bound = request_bound(t, self.prices[i], messages)
                if not await self.gate.reserve.remote(bound):
                    out.update(error="not sent: the run reached its spending cap", error_kind=SPEND_CAP)
                    return out
            cost = bound
            try:
                try:
                    resp, attempts, latency = await self._send(i, messages, int(r.get("sample") or 0))
                except _Failed as f:
                    cost = 0.0  # a failed attempt brings no usage back
                    out.update(error=f.reason, error_kind=f.kind, attempts=f.attempts)
                    return out
                rec, cost = self._record(r, i, resp, latency)
            finally:
                if bound is not None:
                    self.gate.settle.remote(bound, cost)
        out["attempts"] = attempts
        lim = self._limiter(i)
        tin, tout = rec["tokens_in"], rec["tokens_out"]
        if lim is not None and t.tokens_per_minute:  # charge what the request really used
            est = sum(len(m["content"]) for m in messages) / 4 + self.expected_out[i]
            lim.adjust.remote(tin + tout - est)
        if tout:
            self.expected_out[i] = 0.9 * self.expected_out[i] + 0.1 * tout
        return finish_result(out, rec, r["task"], r.get("gold"), self.answers)

    def _record(self, r: dict[str, Any], i: int, resp: Any, latency: float) -> tuple[dict[str, Any], float]:
        """The cache record of a reply, appended to the cache before anything else happens to it."""
        t = self.teachers[i]
        choice = resp.choices[0]
        text = getattr(choice.message, "content", None) or ""
        usage = getattr(resp, "usage", None)
        tin = int(getattr(usage, "prompt_tokens", 0) or 0)
        tout = int(getattr(usage, "completion_tokens", 0) or 0)
        rec = {"key": r["key"], "model": t.model, "response": text, "tokens_in": tin, "tokens_out": tout,
               "cost_usd": self._cost(i, resp, tin, tout), "latency_s": latency,
               "finish_reason": getattr(choice, "finish_reason", None), "t": time.time()}
        self.cache.append(rec)  # durable before anything else happens to it
        return rec, rec["cost_usd"]

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.in_flight)
        self.appended.refresh()
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._row(r) for r in rows))
        now = time.process_time()
        cpu, self.cpu_mark = now - self.cpu_mark, now
        cols = {k: [res[k] for res in results] for k in _RESULT_SCHEMA.names if k != "cpu_s"}
        cols["cpu_s"] = [cpu] + [0.0] * (len(results) - 1)
        return pa.Table.from_pydict(cols, schema=_RESULT_SCHEMA)

    def __del__(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()


_RESULT_SCHEMA = pa.schema(
    [("key", pa.string()), ("response", pa.string()), ("extracted", pa.string()), ("correct", pa.bool_()),
     ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("cost_usd", pa.float64()),
     ("latency_s", pa.float64()), ("error", pa.string()), ("error_kind", pa.string()),
     ("cache_hit", pa.bool_()), ("attempts", pa.int32()), ("finish_reason", pa.string()), ("cpu_s", pa.float64())]
)
