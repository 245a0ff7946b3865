"""Throughput of the annotation pipeline against the local OpenAI-compatible test server.

Writes one JSON file with:

(a) ceiling   - rows/s at zero server latency and high concurrency: what the CPU allows.
(b) latency   - rows/s at a realistic teacher reply time (2 s) for concurrency 1, 8, 64, 256, each
                next to its bound min(concurrency / latency, ceiling): over the whole run, and
                settled (steady_rows_per_s: the first two latency periods, when the replies of a
                whole concurrency arrive at once, and the last one, the drain, left out).
(c) sequential - a plain loop of litellm.completion calls at the same latency, and the speed-up of
                each concurrency over it.
(d) cpu       - where the CPU of a row goes: the annotator actors, the driver, Ray's own processes,
                the server; plus micro-benchmarks of one litellm call (openai/ and hosted_vllm/
                routes) and of one bare aiohttp call with the same chat.

Rows/s are measured at the server, from the first request received to the last reply sent, so they
exclude the pipeline's start-up (actor start and the litellm import, reported as startup_s).

    python benchmarks/annotate.py --out outputs/bench/annotate.json            # about 6 minutes
    python benchmarks/annotate.py --quick --out /tmp/annotate.json             # a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import argparse
import asyncio
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from openai_server import ServerProcess  # noqa: E402

from raydistill import annotate as A  # noqa: E402

KEY_ENV = "RAYDISTILL_BENCH_KEY"


def _questions(folder: Path, n: int, tag: str) -> tuple[Path, dict[str, str]]:
    qs = [f"[{tag}] Question {i}: Tom has {i + 3} apples and gets {2 * i + 1} more. How many apples now?"
          for i in range(n)]
    golds = [str(3 * i + 4) for i in range(n)]
    path = folder / f"q-{tag}.parquet"
    pq.write_table(pa.table({"question": qs, "answer": golds}), path)
    return path, dict(zip(qs, golds))


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def _ray_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of this process's descendants, by kind: "core" (gcs, raylet, agents, monitors)
    or "workers" (Ray workers other than the annotator actors, which report their own CPU)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline()[:3])
            if "openai_server.py" in cmd or "MapWorker" in cmd:
                continue
            kind = "workers" if cmd.startswith("ray::") and "Agent" not in cmd else "core"
            t = p.cpu_times()
            out[p.pid] = (kind, t.user + t.system)
        except psutil.Error:
            pass
    return out


def _cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], kind: str) -> float:
    return sum(v - before.get(pid, (k, 0.0))[1] for pid, (k, v) in after.items() if k == kind)


def _steady_rate(log: list[dict], first: float, last: float, latency: float) -> float | None:
    """Rows/s once the run has settled, by Little's law: the mean number of requests held by the
    server between two latency periods after the first request (the ramp-up, when a whole
    concurrency's replies arrive at once) and one latency period before the last reply (the drain),
    over the mean time the server held a request. None for runs too short to have that window."""
    lo, hi = first + 2 * latency, last - latency
    if latency <= 0 or hi - lo < 2 * latency:
        return None
    held = sum(max(0.0, min(e["t_done"], hi) - max(e["t_recv"], lo)) for e in log)  # request-seconds
    mean_latency = sum(e["t_done"] - e["t_recv"] for e in log) / len(log)
    return held / (hi - lo) / mean_latency


def run_pipeline(server: ServerProcess, work: Path, n: int, concurrency: int, tag: str, actors: int,
                 batch: int, provider: str = "openai", latency: float = 0.0) -> dict:
    qpath, _ = _questions(work, n, tag)
    spec = A.AnnotationSpec(
        task="svamp", level=3,
        teacher=dict(model=f"{provider}/bench-teacher", api_base=server.base_url, api_key_env=KEY_ENV, timeout_s=60),
        questions=dict(source="parquet", path=str(qpath)),
        runtime=dict(concurrency=concurrency, num_actors=actors, batch_size=batch, progress=False,
                     cache_dir=str(work / f"cache-{tag}"), num_cpus_per_actor=0.5),
    )
    n0 = len(server.log_entries())
    srv0, drv0, sys0 = _cpu_of(server.proc.pid), time.process_time(), _ray_cpu()
    t0 = time.time()
    run = A.annotate_cells([(spec, work / f"out-{tag}")], progress=False)
    wall = time.time() - t0
    srv1, drv1, sys1 = _cpu_of(server.proc.pid), time.process_time(), _ray_cpu()
    log = server.log_entries()[n0:]
    r = run.cells[0]
    assert r.rows == n and r.failed == 0, (r.rows, r.failed, r.errors)
    first = min(e["t_recv"] for e in log)
    last = max(e["t_done"] for e in log)
    span = last - first
    return {
        "concurrency": concurrency,
        "rows": n,
        "actors": min(actors, concurrency),
        "rows_per_s": n / span if span > 0 else float("inf"),
        "steady_rows_per_s": _steady_rate(log, first, last, latency),
        "end_to_end_rows_per_s": n / wall,
        "wall_s": wall,
        "startup_s": first - t0,
        "requests_seen_by_server": len(log),
        "cpu_ms_per_row": {
            "annotator_actors": 1000 * run.totals.get("actor_cpu_s", 0.0) / n,
            "driver": 1000 * (drv1 - drv0) / n,
            "ray_core": 1000 * _cpu_delta(sys0, sys1, "core") / n,
            "other_ray_workers": 1000 * _cpu_delta(sys0, sys1, "workers") / n,
            "server": 1000 * (srv1 - srv0) / n,
        },
    }


def sequential(server: ServerProcess, n: int) -> dict:
    import litellm

    litellm.suppress_debug_info = True
    t0 = time.time()
    for i in range(n):
        litellm.completion(model="openai/bench-teacher", api_base=server.base_url, api_key="sk-bench",
                           messages=[{"role": "user", "content": f"sequential {i}"}], max_retries=0)
    wall = time.time() - t0
    return {"rows": n, "rows_per_s": n / wall, "wall_s": wall}


def microbench(server: ServerProcess, calls: int, concurrency: int) -> dict:
    """CPU per call in this process: litellm.acompletion vs a bare aiohttp POST."""
    import aiohttp
    import litellm

    from raydistill import answers

    litellm.suppress_debug_info = True
    url = server.base_url + "/chat/completions"

    from raydistill import prompts

    chats = [prompts.build_messages("svamp", 3, "cot", f"Micro question {i}: what is {i} + 1?") for i in range(calls + 1)]

    async def with_litellm(provider: str):
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                await litellm.acompletion(model=f"{provider}/bench-teacher", api_base=server.base_url,
                                          api_key="sk-bench", max_retries=0, messages=chats[i])
        await one(calls)  # the first call builds the client
        c0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return time.process_time() - c0

    async def with_aiohttp():
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-bench"}) as s:
            async def one(i):
                async with sem:
                    async with s.post(url, json={"model": "bench-teacher", "messages": chats[i]}) as r:
                        await r.json()
            await one(calls)
            c0 = time.process_time()
            await asyncio.gather(*(one(i) for i in range(calls)))
            return time.process_time() - c0

    lit = asyncio.run(with_litellm("openai"))
    vllm = asyncio.run(with_litellm("hosted_vllm"))
    raw = asyncio.run(with_aiohttp())
    text = "Step one. Step two gives 3 + 4 = 7. The answer is 7"
    c0 = time.process_time()
    for _ in range(2000):
        answers.is_correct("svamp", text, "7")
    chk = time.process_time() - c0
    return {
        "calls": calls,
        "litellm_acompletion_cpu_ms": 1000 * lit / calls,  # openai/<model>: through the OpenAI SDK
        "litellm_hosted_vllm_cpu_ms": 1000 * vllm / calls,  # hosted_vllm/<model>: litellm's own HTTP path
        "aiohttp_post_cpu_ms": 1000 * raw / calls,
        "answer_check_cpu_ms": 1000 * chk / 2000,
    }


def _actors(args: argparse.Namespace, concurrency: int) -> int:
    """--actors, or the layout docs/annotate.md recommends: at most 64 requests in flight per actor."""
    return args.actors or max(2, math.ceil(concurrency / 64))


def _against_bound(r: dict, latency_bound: float, ceiling: float) -> None:
    r["bound"] = min(latency_bound, ceiling)
    r["ratio_to_bound"] = r["rows_per_s"] / r["bound"]
    steady = r["steady_rows_per_s"]
    r["steady_ratio_to_bound"] = None if steady is None else steady / r["bound"]


def _line(r: dict) -> str:
    steady = "" if r["steady_rows_per_s"] is None else \
        f"; settled {r['steady_rows_per_s']:.2f} rows/s ({100 * r['steady_ratio_to_bound']:.0f}%)"
    return (f"concurrency {r['concurrency']}: {r['rows_per_s']:.2f} rows/s, bound {r['bound']:.2f} "
            f"({100 * r['ratio_to_bound']:.0f}%){steady}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench/annotate.json")
    p.add_argument("--latency", type=float, default=2.0)
    p.add_argument("--jitter", type=float, default=0.5,
                   help="also run the latency sweep at latency +- this uniform jitter (0: skip)")
    p.add_argument("--concurrency", default="1,8,64,256")
    p.add_argument("--ceiling-rows", type=int, default=3000)
    p.add_argument("--ceiling-concurrency", type=int, default=256)
    p.add_argument("--waves", type=int, default=15, help="rows per latency run = waves x concurrency")
    p.add_argument("--actors", type=int, default=0,
                   help="annotator actors (0.5 CPU each); 0: one per 64 requests in flight, at least 2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sequential-rows", type=int, default=5)
    p.add_argument("--provider", default="openai", choices=["openai", "hosted_vllm"],
                   help="litellm route to the server: openai/<name> (OpenAI SDK) or hosted_vllm/<name>")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.ceiling_rows, args.waves, args.concurrency, args.sequential_rows = 400, 2, "1,8,64", 2

    import ray

    os.environ[KEY_ENV] = "sk-bench"
    work = Path(tempfile.mkdtemp(prefix="raydistill-bench-"))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": os.getloadavg()},
        "settings": {"latency_s": args.latency, "jitter_s": args.jitter, "actors": args.actors or "auto",
                     "batch_size": args.batch_size, "provider": args.provider},
    }
    try:
        with ServerProcess(work / "fast", latency=0.0) as fast:
            result["microbench"] = microbench(fast, calls=400, concurrency=64)
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
            ceiling = run_pipeline(fast, work, args.ceiling_rows, args.ceiling_concurrency, "ceiling",
                                   _actors(args, args.ceiling_concurrency), args.batch_size, args.provider)
            result["ceiling"] = ceiling
            print(f"ceiling: {ceiling['rows_per_s']:.1f} rows/s at concurrency {args.ceiling_concurrency}", flush=True)
        with ServerProcess(work / "slow", latency=args.latency) as slow:
            result["sequential"] = sequential(slow, args.sequential_rows)
            print(f"sequential: {result['sequential']['rows_per_s']:.3f} rows/s", flush=True)
            rows = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                r = run_pipeline(slow, work, max(2, args.waves * c), c, f"c{c}", _actors(args, c), args.batch_size,
                                 args.provider, args.latency)
                _against_bound(r, c / args.latency, ceiling["rows_per_s"])
                r["speedup_vs_sequential"] = r["rows_per_s"] / result["sequential"]["rows_per_s"]
                rows.append(r)
                print(f"{_line(r)}, {r['speedup_vs_sequential']:.1f}x sequential", flush=True)
            result["latency"] = rows
        if args.jitter:
            with ServerProcess(work / "jitter", latency=args.latency, latency_jitter=args.jitter) as slow:
                rows = []
                for c in [int(x) for x in args.concurrency.split(",") if int(x) >= 64]:
                    r = run_pipeline(slow, work, max(2, args.waves * c), c, f"j{c}", _actors(args, c), args.batch_size,
                                     args.provider, args.latency)
                    _against_bound(r, c / args.latency, ceiling["rows_per_s"])
                    r["speedup_vs_sequential"] = r["rows_per_s"] / result["sequential"]["rows_per_s"]
                    rows.append(r)
                    print(f"latency {args.latency} +- {args.jitter} s, {_line(r)}", flush=True)
                result["latency_jittered"] = rows
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
