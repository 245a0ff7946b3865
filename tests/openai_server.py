"""A small OpenAI-compatible chat-completions server for tests and benchmarks.

It answers ``POST /v1/chat/completions`` on 127.0.0.1 with deterministic replies that end in
"The answer is X", and can inject latency and failures (HTTP 429, HTTP 500, or a reply slower than
the client's timeout). Every request is appended to a JSON Lines log (one line per request, written
when the server has finished with it) so tests can check what was sent, when, and how often.

Run it as a process (tests do this, so the server's CPU and event loop are separate from the
client under test)::

    python tests/openai_server.py --port 0 --log /tmp/log.jsonl --ready-file /tmp/ready.json \
        --latency 0.05 --fail-rate 0.2 --fail-kinds 429,500,timeout --answers gold.json

Usage: ``prompt_tokens`` and ``completion_tokens`` count whitespace words, or with ``--usage
tiktoken`` tokens as OpenAI's chat API counts them (cl100k_base; the count litellm's token_counter
makes for an OpenAI-compatible model, so a plan's input tokens can be checked against it).

It also serves OpenAI's files and batches endpoints (``/v1/files``, ``/v1/batches``; see
:class:`BatchAPI`) with the same replies, for the annotation stage's batch mode.

``--ready-file`` receives ``{"port": P, "pid": N}`` once the socket listens. ``GET /stats`` returns
counters, ``GET /health`` answers ``ok``. From Python, :class:`ServerProcess` starts and stops it.

Reply policy: the last user message is the question. ``--answers`` maps question text to the gold
answer (JSON object); with ``--policy gold`` the reply's answer is the gold answer when known (else
``--fixed-answer``), with ``--policy fixed`` it is always ``--fixed-answer``; ``--wrong-rate`` makes
that share of questions (chosen by hash) answer wrongly, ``--wrong-by-seed`` that share of
(question, request seed) pairs (`wrong_by_seed`): several samples of one question, each with its
own seed, then differ, and each one's reply stays the same on every attempt. The rationale's length follows the last
assistant message in the conversation (the prompt's one-shot exemplar), like a teacher that copies
the exemplar's granularity.

Failures are chosen by hashing (request key, attempt number), so a run is reproducible:
``--fail-rate`` is the chance that an attempt fails transiently, ``--permanent-fail-rate`` the
share of request keys that fail on every attempt. ``--kinds-by-question`` (JSON object: question
text -> kind) fixes the reply to a question on every attempt; besides the kinds above it takes
``400`` (a non-retryable bad request), ``empty`` (HTTP 200, empty content), ``noanswer`` (HTTP 200,
a reply without "The answer is" or any number), ``badjson`` (HTTP 200, a body cut short), ``hang``
(the connection is accepted and nothing is sent until the client hangs up) and ``stall`` (status,
headers and the start of a body, then nothing until the client hangs up). The request key is the sha256 of the canonical
JSON of (model, messages, temperature, max_tokens, top_p, seed).

The log line: ``{"key", "question", "status", "kind", "t_recv", "t_done", "attempt", "auth"}``
where ``kind`` is ``ok``, ``429``, ``500``, ``timeout``, ``401`` or a forced kind and ``auth`` says whether the
bearer token matched ``--expect-key-sha256`` (the key itself is never logged). An injected timeout
is logged when it starts stalling, since the client gives up before it ends; so are ``hang`` and
``stall``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from aiohttp import web


def request_key(body: dict) -> str:
    canon = {k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens", "top_p", "seed")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def wrong_by_seed(question: str, seed: object, rate: float, server_seed: int = 0) -> bool:
    """Whether ``--wrong-by-seed rate`` answers ``question`` wrongly at this request seed."""
    return _unit("wrong-by-seed", server_seed, question.strip(), seed) < rate


def _content(msg: dict) -> str:
    c = msg.get("content") or ""
    if isinstance(c, list):  # content parts
        c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return str(c)


_FILLER = [
    "We read the question and note the quantities it gives.",
    "We decide which operation connects them.",
    "We carry out the computation carefully.",
    "We check the result against the question.",
    "We make sure the units and the wording match.",
    "We restate what was asked before answering.",
]


class Server:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.answers: dict[str, str] = {}
        if args.answers:
            self.answers = json.loads(Path(args.answers).read_text())
        self.kinds_by_question: dict[str, str] = {}
        if args.kinds_by_question:
            self.kinds_by_question = {q.strip(): k for q, k in
                                      json.loads(Path(args.kinds_by_question).read_text()).items()}
        self.fail_kinds = [k for k in args.fail_kinds.split(",") if k]
        self.attempts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.log = open(args.log, "a", buffering=1) if args.log else None
        self.expect_key_sha256 = args.expect_key_sha256
        self.rng = random.Random(args.seed)
        self.by_key_ok: defaultdict[str, int] = defaultdict(int)

    def _latency(self) -> float:
        lat = self.args.latency
        if self.args.latency_jitter:
            lat += self.rng.uniform(-self.args.latency_jitter, self.args.latency_jitter)
        return max(0.0, lat)

    def _answer(self, question: str, seed: object = None) -> str:
        a = self.args
        gold = self.answers.get(question.strip())
        if a.policy == "fixed" or gold is None:
            ans = a.fixed_answer
        else:
            ans = gold
        if a.wrong_rate and _unit("wrong", a.seed, question) < a.wrong_rate:
            ans = _wrong(ans)
        if a.wrong_by_seed and wrong_by_seed(question, seed, a.wrong_by_seed, a.seed):
            ans = _wrong(ans)
        return ans

    def _reply(self, messages: list[dict], seed: object = None) -> str:
        users = [_content(m) for m in messages if m.get("role") == "user"]
        question = users[-1] if users else ""
        exemplar = [_content(m) for m in messages if m.get("role") == "assistant"]
        target_words = len(exemplar[-1].split()) if exemplar else self.args.default_words
        words: list[str] = []
        i = 0
        first = " ".join(question.split()[:12])
        words += f"The question asks: {first}.".split()
        while len(words) < max(target_words - 4, 0):
            words += _FILLER[i % len(_FILLER)].split()
            i += 1
        return " ".join(words) + f" The answer is {self._answer(question, seed)}"

    async def chat(self, request: web.Request) -> web.Response:
        t_recv = time.time()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            try:
                body = await request.json()
            except Exception:
                return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
            key = request_key(body)
            attempt = self.attempts[key]
            self.attempts[key] += 1
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            auth_ok = None
            if self.expect_key_sha256:
                auth_ok = hashlib.sha256(token.encode()).hexdigest() == self.expect_key_sha256
            messages = body.get("messages") or []
            users = [_content(m) for m in messages if m.get("role") == "user"]
            question = users[-1] if users else ""

            kind = "ok"
            a = self.args
            if a.permanent_fail_rate and _unit("perm", a.seed, key) < a.permanent_fail_rate:
                kind = self.fail_kinds[int(_unit("pk", a.seed, key) * len(self.fail_kinds))] if self.fail_kinds else "500"
            elif a.fail_rate and self.fail_kinds and _unit("fail", a.seed, key, attempt) < a.fail_rate:
                kind = self.fail_kinds[int(_unit("kind", a.seed, key, attempt) * len(self.fail_kinds))]
            kind = self.kinds_by_question.get(question.strip(), kind)
            if self.expect_key_sha256 and not auth_ok:
                kind = "401"

            if kind == "timeout":
                # Logged now: the client gives up long before this reply would come.
                self._log(key, question, 504, kind, t_recv, attempt, auth_ok)
                await asyncio.sleep(a.timeout_sleep)
                return web.json_response({"error": {"message": "too slow (injected)"}}, status=504)
            if kind in ("hang", "stall"):
                # No reply at all, or headers and the start of a body and then nothing, for as long
                # as the client keeps the connection open.
                self._log(key, question, 0 if kind == "hang" else 200, kind, t_recv, attempt, auth_ok)
                if kind == "stall":
                    stalled = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                    await stalled.prepare(request)
                    await stalled.write(b'{"id": "chatcmpl-stalled", "object": "chat.completion", "choices": [')
                while request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.05)
                raise asyncio.CancelledError
            await asyncio.sleep(self._latency())
            if kind in ("ok", "empty", "noanswer"):
                content = {"ok": lambda m: self._reply(m, body.get("seed")), "empty": lambda m: "",
                           "noanswer": lambda m: "I cannot tell from what is given."}[kind](messages)
                finish = "stop"
                if kind == "ok" and a.cut_rate and _unit("cut", a.seed, key) < a.cut_rate:
                    content, finish = " ".join(content.split()[: len(content.split()) // 2]), "length"
                prompt_tokens, completion_tokens = self._usage(messages, content)
                payload = {
                    "id": "chatcmpl-" + key[:24],
                    "object": "chat.completion",
                    "created": int(t_recv),
                    "model": body.get("model", "mock"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
                resp = web.json_response(payload)
                status = 200
            elif kind == "429":
                resp = web.json_response(
                    {"error": {"message": "rate limited (injected)", "type": "rate_limit_error"}},
                    status=429,
                    headers={"Retry-After": str(a.retry_after)},
                )
                status = 429
            elif kind == "badjson":
                resp = web.Response(text='{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{',
                                    content_type="application/json")
                status = 200
            elif kind == "400":
                resp = web.json_response({"error": {"message": "bad request (injected)",
                                                    "type": "invalid_request_error"}}, status=400)
                status = 400
            elif kind == "401":
                resp = web.json_response({"error": {"message": "bad api key", "type": "auth_error"}}, status=401)
                status = 401
            else:
                resp = web.json_response({"error": {"message": "internal error (injected)"}}, status=500)
                status = 500
            self._log(key, question, status, kind, t_recv, attempt, auth_ok)
            return resp
        finally:
            self.in_flight -= 1

    def _usage(self, messages: list[dict], content: str) -> tuple[int, int]:
        """(prompt_tokens, completion_tokens): whitespace words by default; with ``--usage tiktoken``
        tokens as OpenAI's chat API counts them (its cookbook's rule: per message 3 tokens plus the
        tokens of its role and content, 3 to prime the reply) in tiktoken's cl100k_base."""
        if self.args.usage == "words":
            return sum(len(_content(m).split()) for m in messages), len(content.split())
        enc = _cl100k()
        prompt = sum(3 + len(enc.encode(m.get("role", ""))) + len(enc.encode(_content(m))) for m in messages) + 3
        return prompt, len(enc.encode(content))

    def _log(self, key: str, question: str, status: int, kind: str, t_recv: float, attempt: int,
             auth_ok: bool | None) -> None:
        self.stats[kind] += 1
        if kind == "ok":
            self.by_key_ok[key] += 1
        if self.log:
            entry = {"key": key, "question": question, "status": status, "kind": kind, "t_recv": t_recv,
                     "t_done": time.time(), "attempt": attempt, "auth": auth_ok}
            self.log.write(json.dumps(entry, ensure_ascii=False) + "\n")

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "counts": dict(self.stats),
                "requests": sum(self.stats.values()),
                "ok": self.stats["ok"],
                "distinct_ok": len(self.by_key_ok),
                "duplicate_ok": sum(v - 1 for v in self.by_key_ok.values() if v > 1),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model"}]})


def _cl100k():
    """tiktoken's cl100k_base, read offline from the copy litellm ships (as litellm itself does)."""
    import importlib.util

    import tiktoken

    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        litellm_dir = Path(importlib.util.find_spec("litellm").origin).parent
        os.environ["TIKTOKEN_CACHE_DIR"] = str(litellm_dir / "litellm_core_utils" / "tokenizers")
    return tiktoken.get_encoding("cl100k_base")


class BatchAPI:
    """OpenAI's files and batches endpoints (``/v1/files``, ``/v1/batches``) over the same replies.

    An uploaded batch input file is kept in memory. A batch goes ``validating`` -> ``in_progress``
    -> ``completed`` one step per retrieve after ``--batch-polls`` retrieves (no clock involved);
    on completion every line is answered as ``/v1/chat/completions`` would answer its body (same
    content, same usage) and logged like a chat request with ``"batch": <id>``. The first
    ``--batch-expire`` batches created expire instead: their first half is answered, the rest go to
    the error file with code ``batch_expired``. ``--batch-kinds-by-question`` (JSON: question ->
    kind) fails a question in the first batch that holds it (an error-file line with that HTTP
    status); it is answered normally afterwards. ``GET /batch-stats`` counts files, batches and retrieves.
    """

    def __init__(self, server: Server):
        self.server = server
        self.files: dict[str, dict] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.polls: Counter[str] = Counter()
        self.failed_once: set[str] = set()
        self.kinds: dict[str, str] = {}
        if server.args.batch_kinds_by_question:
            self.kinds = {q.strip(): k for q, k in
                          json.loads(Path(server.args.batch_kinds_by_question).read_text()).items()}
        self.created = 0

    def _new_file(self, content: bytes, purpose: str, filename: str) -> dict:
        fid = f"file-{len(self.files) + 1:06d}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                           "filename": filename, "purpose": purpose, "status": "processed"}
        self.contents[fid] = content
        return self.files[fid]

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        content = upload.file.read() if hasattr(upload, "file") else str(upload or "").encode()
        return web.json_response(self._new_file(content, str(form.get("purpose", "batch")),
                                                getattr(upload, "filename", "upload.jsonl")))

    async def file(self, request: web.Request) -> web.Response:
        fid = request.match_info["fid"]
        if fid not in self.files:
            return web.json_response({"error": {"message": f"no file {fid}"}}, status=404)
        return web.json_response(self.files[fid])

    async def content(self, request: web.Request) -> web.Response:
        fid = request.match_info["fid"]
        if fid not in self.contents:
            return web.json_response({"error": {"message": f"no file {fid}"}}, status=404)
        return web.Response(body=self.contents[fid], content_type="application/octet-stream")

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in self.contents:
            return web.json_response({"error": {"message": f"no file {fid}"}}, status=400)
        self.created += 1
        bid = f"batch_{self.created:06d}"
        lines = [ln for ln in self.contents[fid].decode().splitlines() if ln.strip()]
        self.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": fid, "completion_window": body.get("completion_window"), "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
            "in_progress_at": None, "expires_at": None, "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "_expire": self.created <= self.server.args.batch_expire,
        }
        return web.json_response(self._public(bid))

    def _public(self, bid: str) -> dict:
        return {k: v for k, v in self.batches[bid].items() if not k.startswith("_")}

    async def retrieve(self, request: web.Request) -> web.Response:
        bid = request.match_info["bid"]
        if bid not in self.batches:
            return web.json_response({"error": {"message": f"no batch {bid}"}}, status=404)
        b = self.batches[bid]
        self.polls[bid] += 1
        if b["status"] in ("validating", "in_progress") and self.polls[bid] > self.server.args.batch_polls:
            if b["status"] == "validating":
                b["status"], b["in_progress_at"] = "in_progress", int(time.time())
            else:
                self._finish(bid)
        return web.json_response(self._public(bid))

    def _finish(self, bid: str) -> None:
        b = self.batches[bid]
        lines = [json.loads(ln) for ln in self.contents[b["input_file_id"]].decode().splitlines() if ln.strip()]
        out, err = [], []
        for i, line in enumerate(lines):
            body = line["body"]
            messages = body.get("messages") or []
            users = [_content(m) for m in messages if m.get("role") == "user"]
            question = users[-1] if users else ""
            key = request_key(body)
            t_recv = time.time()
            if b["_expire"] and i >= len(lines) // 2:
                err.append({"id": f"batch_req_{bid}_{i}", "custom_id": line["custom_id"], "response": None,
                            "error": {"code": "batch_expired",
                                      "message": "This request could not be executed before the completion window expired."}})
                continue
            kind = self.kinds.get(question.strip())
            if kind and question.strip() not in self.failed_once:
                self.failed_once.add(question.strip())
                status = int(kind) if kind.isdigit() else 500
                err.append({"id": f"batch_req_{bid}_{i}", "custom_id": line["custom_id"],
                            "response": {"status_code": status, "request_id": f"req_{i}",
                                         "body": {"error": {"message": f"injected {kind} in a batch",
                                                            "type": "server_error"}}},
                            "error": None})
                self._log(key, question, status, kind, t_recv, bid)
                continue
            content = self.server._reply(messages, body.get("seed"))
            prompt_tokens, completion_tokens = self.server._usage(messages, content)
            reply = {"id": "chatcmpl-" + key[:24], "object": "chat.completion", "created": int(t_recv),
                     "model": body.get("model", "mock"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}}
            out.append({"id": f"batch_req_{bid}_{i}", "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "request_id": f"req_{i}", "body": reply}, "error": None})
            self._log(key, question, 200, "ok", t_recv, bid)
        now = int(time.time())
        if out:
            b["output_file_id"] = self._new_file("".join(json.dumps(o) + "\n" for o in out).encode(),
                                                 "batch_output", f"{bid}_output.jsonl")["id"]
        if err:
            b["error_file_id"] = self._new_file("".join(json.dumps(e) + "\n" for e in err).encode(),
                                                "batch_output", f"{bid}_error.jsonl")["id"]
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b["status"] = "expired" if b["_expire"] else "completed"
        b["expired_at" if b["_expire"] else "completed_at"] = now

    def _log(self, key: str, question: str, status: int, kind: str, t_recv: float, bid: str) -> None:
        s = self.server
        s.stats[kind] += 1
        if kind == "ok":
            s.by_key_ok[key] += 1
        if s.log:
            entry = {"key": key, "question": question, "status": status, "kind": kind, "t_recv": t_recv,
                     "t_done": time.time(), "attempt": 0, "auth": None, "batch": bid}
            s.log.write(json.dumps(entry, ensure_ascii=False) + "\n")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"files": len(self.files), "batches_created": self.created,
                                  "retrieves": sum(self.polls.values()),
                                  "status": {bid: b["status"] for bid, b in self.batches.items()}})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{fid}", self.file)
        app.router.add_get("/v1/files/{fid}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches/{bid}", self.retrieve)
        app.router.add_get("/batch-stats", self.stats)


def _wrong(ans: str) -> str:
    if re.fullmatch(r"-?\d+", ans or ""):
        return str(int(ans) + 1)
    if ans in ("A", "B", "C", "D", "E"):
        return "ABCDE"[("ABCDE".index(ans) + 1) % 5]
    if ans in ("True", "False"):
        return "False" if ans == "True" else "True"
    return (ans or "") + "1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", default=None, help="write {port, pid} here once listening")
    p.add_argument("--log", default=None, help="append one JSON line per request here")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    p.add_argument("--latency-jitter", type=float, default=0.0, help="uniform +- jitter, seconds")
    p.add_argument("--fail-rate", type=float, default=0.0, help="chance an attempt fails transiently")
    p.add_argument("--permanent-fail-rate", type=float, default=0.0, help="share of requests that always fail")
    p.add_argument("--fail-kinds", default="429,500,timeout", help="comma list of 429, 500, timeout")
    p.add_argument("--timeout-sleep", type=float, default=5.0, help="how long an injected timeout stalls")
    p.add_argument("--retry-after", type=float, default=0, help="Retry-After header of 429 replies")
    p.add_argument("--answers", default=None, help="JSON file: question text -> gold answer")
    p.add_argument("--kinds-by-question", default=None,
                   help="JSON file: question text -> reply kind on every attempt (see above)")
    p.add_argument("--policy", choices=["gold", "fixed"], default="gold")
    p.add_argument("--fixed-answer", default="0")
    p.add_argument("--wrong-rate", type=float, default=0.0)
    p.add_argument("--wrong-by-seed", type=float, default=0.0,
                   help="share of (question, request seed) pairs answered wrongly (samples that differ)")
    p.add_argument("--default-words", type=int, default=30, help="rationale length without an exemplar")
    p.add_argument("--cut-rate", type=float, default=0.0,
                   help="share of replies cut in half with finish_reason 'length' (as at max_tokens)")
    p.add_argument("--expect-key-sha256", default=None, help="401 unless the bearer token hashes to this")
    p.add_argument("--usage", choices=["words", "tiktoken"], default="words",
                   help="what usage counts: whitespace words, or tokens as OpenAI counts them (cl100k_base)")
    p.add_argument("--batch-polls", type=int, default=1,
                   help="retrieves of a batch before each step validating -> in_progress -> completed")
    p.add_argument("--batch-expire", type=int, default=0, help="the first N batches created expire half done")
    p.add_argument("--batch-kinds-by-question", default=None,
                   help="JSON file: question -> HTTP status it fails with in the first batch holding it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    server = Server(args)
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/chat/completions", server.chat)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/stats", server.stats_handler)
    app.router.add_get("/health", server.health)
    BatchAPI(server).routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        Path(tmp).write_text(json.dumps({"port": port, "pid": os.getpid()}))
        os.replace(tmp, args.ready_file)
    print(f"listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_parent() -> None:  # a killed test run must not leave the server behind
        while args.parent_pid and os.getppid() == args.parent_pid:
            await asyncio.sleep(1.0)
        stop.set()

    watcher = asyncio.create_task(watch_parent()) if args.parent_pid else None
    await stop.wait()
    if watcher:
        watcher.cancel()
    await runner.cleanup()
    if server.log:
        server.log.close()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_serve(parse_args(argv)))
    return 0


class ServerProcess:
    """Start the server as a child process; ``with ServerProcess(tmp_path, latency=0.1) as s: ...``.

    Keyword options map to the command-line flags (``fail_rate=0.2`` -> ``--fail-rate 0.2``);
    ``answers`` and ``kinds_by_question`` may be dicts (written to JSON files). ``base_url`` is
    ``http://127.0.0.1:P/v1``.
    """

    def __init__(self, workdir: str | os.PathLike, **options: object):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server-requests.jsonl"
        self.ready_path = self.workdir / "server-ready.json"
        for name in ("answers", "kinds_by_question", "batch_kinds_by_question"):
            value = options.pop(name, None)
            if isinstance(value, dict):
                p = self.workdir / f"server-{name.replace('_', '-')}.json"
                p.write_text(json.dumps(value))
                value = str(p)
            if value:
                options[name] = value
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        if self.ready_path.exists():
            self.ready_path.unlink()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--log", str(self.log_path)]
        cmd += ["--ready-file", str(self.ready_path), "--parent-pid", str(os.getpid())]
        for k, v in self.options.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "server.err", "ab"))
        deadline = time.time() + timeout
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mock server exited: {(self.workdir / 'server.err').read_text()[-2000:]}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError("mock server did not start")
            time.sleep(0.05)
        self.port = json.loads(self.ready_path.read_text())["port"]
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return json.loads(r.read())

    def batch_stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/batch-stats", timeout=10) as r:
            return json.loads(r.read())

    def log_entries(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written right now
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
