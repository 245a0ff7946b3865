"""Sweep benchmark: a 6-trial tiny granularity sweep, sequential vs concurrent trials, or
per-trial evaluation engines vs shared ones.

    python benchmarks/sweep.py [--out benchmarks/results/sweep.json] [--concurrency 2]
    python benchmarks/sweep.py --engines [--out benchmarks/results/sweep-engines.json]
    .venv-vllm/bin/python benchmarks/sweep.py --engines --engine vllm --concurrency 1 --cpus 3 \
        --out benchmarks/results/sweep-engines-vllm.json
    .venv-vllm/bin/python benchmarks/sweep.py --engines --engine vllm --lora --concurrency 1 --cpus 3 \
        --out benchmarks/results/sweep-engines-vllm-lora.json
    python benchmarks/sweep.py --engines --demo --concurrency 3 --cpus 2 \
        --out benchmarks/results/sweep-engines-demo.json
    python benchmarks/sweep.py --engines --demo --shared-only --concurrency 3 --cpus 2 --out after.json

`--engines` runs the sweep at `--concurrency` twice instead: with per-trial engines (fresh Ray
Data actors or ray.data.llm engines for each trial's evaluation) and with `eval.shared_engines:
true` (engines that outlive a trial, `raydistill.evaluate.shared`), and compares both runs'
predictions. `--engine vllm` (in the vLLM environment, `make install-vllm`) runs it on vLLM with
SmolLM2-135M as the student (vLLM's CPU attention rejects the tiny Llama's head size 16) and counts
the vLLM engine starts in each run's Ray logs. `--lora` trains each trial a LoRA adapter instead of
the whole model (`train.lora`, kept unmerged: `merge_on_save: false`), so that shared vLLM engines
serve the six adapters of one base per request. `--demo` runs the comparison at the demo's own
size instead (sweeps/granularity.yaml as `make demo` runs it, at all six levels): SmolLM2-135M,
8 optimizer steps and 40 questions of up to 384 new tokens a trial, where the useful share is
measured against its goal. `--shared-only` runs the shared-engines sweep alone, to compare the
same sweep under two versions of the code (run it in each checkout).

Runs the same sweep (tiny-llama on SVAMP levels 1-6, released GPT-4o annotations) twice in one
run, each time as `sweeps/granularity.py` in a fresh process and local Ray cluster of
`--cpus` CPUs: once with `max_concurrent_trials: 1`, once with `--concurrency`. Every trial
needs one CPU (one Train worker, then one evaluation actor), so on `--cpus` = concurrency CPUs the
ideal speed-up is the concurrency. Parallel efficiency = (sequential wall / concurrent wall) /
concurrency; the goal is >= 0.85. Both runs write to their own output folder; the student is
built once into a shared cache before timing starts.

Each run also records the share of the machine's CPU that was busy. Ray's own processes and the
sweep driver use CPU beyond the trials' reservations, so a sequential run on a small box already
keeps more than one core busy; `speedup_bound_from_idle_cpu` (1 / the sequential busy share,
at most the concurrency) is the speed-up its idle CPU leaves room for, and
`efficiency_vs_idle_cpu_bound` is how much of that the concurrent run got.

Each run also sums its trials' time breakdowns (`breakdown`: seconds per stage of
`raydistill.records.TIME_STAGES`) and gives the useful share: optimizer steps + generation, of
the trials' own time (`useful_share_of_trial_time`) and of the sweep's wall time across its
Ray CPUs, in CPU seconds (`useful_cpu_share_of_cpu_wall`: useful CPU seconds / (wall x CPUs)) and,
where every trial had a CPU of its own (concurrency <= CPUs), in wall seconds
(`useful_share_of_cpu_wall`). With more trials than CPUs the wall-time shares count the time
trials wait for each other's cores as useful; the CPU-time share does not.
`useful_cpu_share_of_busy_cpu` is the useful CPU seconds' share of all the CPU seconds the machine
used during the run (`cpu_busy_s`: Ray, the driver and every trial's start-up included; the rest
is `non_useful_cpu_s`, and `idle_cpu_s` is wall x the machine's CPUs less `cpu_busy_s`), and
`cpu_s_by_process` splits those CPU seconds by process kind (Ray's daemons, the sweep driver, and
each actor class: `ray::RayTrainWorker`, `ray::EngineHost`, `ray::TrainController`, ...; see
`ProcessCpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]

SWEEP = {
    "name": "bench", "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1, 2, 3, 4, 5, 6],
    "formats": ["cot"], "students": ["tiny-llama"], "seeds": [100], "train_limit": 32, "test_limit": 12,
    "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 1, "cpus_per_worker": 1,
              "zero_stage": 2, "cutoff_len": 256, "learning_rate": 3e-3},
    "eval": {"engine": "hf", "max_new_tokens": 16, "batch_size": 12, "num_actors": 1, "cpus_per_actor": 1},
}


# `--engine vllm`: the same sweep with SmolLM2-135M (2 optimizer steps a trial) evaluated on vLLM.
VLLM_SWEEP = {
    **SWEEP, "students": ["smollm2-135m"], "train_limit": 16, "test_limit": 12,
    "train": {**SWEEP["train"], "zero_stage": 0, "cutoff_len": 512, "learning_rate": 5e-5},
    "eval": {"engine": "vllm", "max_new_tokens": 32, "batch_size": 12, "num_actors": 1, "cpus_per_actor": 1},
}
# `--lora`: rank-8 adapters kept unmerged, at a learning rate at which 2 steps change the generations.
LORA_TRAIN = {"lora": {"r": 8, "alpha": 16, "merge_on_save": False}, "learning_rate": 2e-3}


def demo_sweep() -> dict:
    """`--demo`: the demo's own settings (sweeps/granularity.yaml: SmolLM2-135M, 64 training rows,
    40 test questions, 384 new tokens) at all six levels, the size the useful-share goal is set for."""
    demo = yaml.safe_load((REPO / "sweeps" / "granularity.yaml").read_text())
    return {**{k: v for k, v in demo.items() if k not in ("output_dir", "max_concurrent_trials")},
            "name": "bench", "levels": [1, 2, 3, 4, 5, 6]}


ENGINE_START = "Initializing a V1 LLM engine"  # vLLM's log line at each engine start


def run_sweep(workdir: Path, concurrency: int, cpus: int, shared: bool = False, sweep: dict = SWEEP) -> dict:
    """Wall time of one sweep run in its own process and Ray cluster."""
    tag = f"c{concurrency}" + ("-shared" if shared else "")
    if (workdir / tag).exists():  # its trials would be reused: no training, and shares against another wall time
        raise SystemExit(f"{workdir / tag} holds an earlier run of this sweep; pass an empty --workdir")
    config = workdir / f"sweep-{tag}.yaml"
    sweep = {**sweep, "eval": {**sweep["eval"], "shared_engines": True}} if shared else sweep
    config.write_text(yaml.safe_dump({**sweep, "output_dir": str(workdir / tag), "max_concurrent_trials": concurrency}))
    ray_tmp = tempfile.mkdtemp(prefix="rd-bench-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYDISTILL_RAY_NUM_CPUS": str(cpus)}
    log = workdir / f"sweep-{tag}.log"
    cpu_before = psutil.cpu_times()
    started = time.perf_counter()
    with log.open("wb") as out, ProcessCpu() as by_process:
        code = subprocess.call([sys.executable, str(REPO / "sweeps" / "granularity.py"), "--config", str(config)],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    busy = _busy_seconds(psutil.cpu_times()) - _busy_seconds(cpu_before)
    if code:
        raise SystemExit(f"sweep with max_concurrent_trials={concurrency} failed (exit {code}); see {log}")
    records = [json.loads(p.read_text()) for p in (workdir / tag / "bench" / "trials").glob("*/record.json")]
    return {"max_concurrent_trials": concurrency, "shared_engines": shared, "wall_s": round(wall, 1),
            "trials": len(records), "predictions": _predictions(records),
            "train_s_sum": round(sum(r["metrics"]["train_seconds"] for r in records), 1),
            "eval_s_sum": round(sum(r["metrics"]["eval_seconds"] for r in records), 1),
            "cpu_busy_fraction": round(busy / (wall * psutil.cpu_count()), 3), "cpu_busy_s": round(busy, 1),
            "idle_cpu_s": round(wall * psutil.cpu_count() - busy, 1),
            **(_vllm_counts(ray_tmp) if sweep["eval"]["engine"] == "vllm" else {}),
            **breakdown(records, wall, cpus, concurrency, busy),
            "cpu_s_by_process": by_process.summary(busy)}


class ProcessCpu:
    """The machine's CPU seconds by process kind while a sweep runs, sampled every ``interval``
    seconds: each process's CPU time since the last sample goes to the kind its title names then
    (Ray sets a worker's title to the actor class or task it runs: ``ray::RayTrainWorker``). A
    process that ends between samples loses its last interval; `unattributed` is that and the
    CPU time of processes shorter than one interval."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.seconds, self.last = interval, defaultdict(float), {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessCpu":
        self._sample(count=False)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()
        self._sample()

    def _sample(self, count: bool = True) -> None:
        for proc in psutil.process_iter(["cmdline", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None:
                continue
            try:
                key, total = (proc.pid, proc.create_time()), times.user + times.system
            except psutil.Error:
                continue
            if count:
                kind = "benchmark" if proc.pid == os.getpid() else process_kind(proc.info["cmdline"] or [])
                self.seconds[kind] += total - self.last.get(key, 0.0)
            self.last[key] = total

    def summary(self, busy: float) -> dict:
        kinds = {k: round(v, 1) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1]) if v >= 0.5}
        return {**kinds, "unattributed": round(busy - sum(self.seconds.values()), 1)}


# A word in a process's command line -> its kind, first match wins (`dashboard_agent` before `dashboard`).
PROCESS_KINDS = {"ray-dashboard": "dashboard", "gcs_server": "gcs_server", "raylet": "raylet",
                 "dashboard_agent": "dashboard_agent", "runtime_env_agent": "runtime_env_agent",
                 "log_monitor": "log_monitor", "monitor.py": "monitor", "dashboard.py": "dashboard",
                 "granularity.py": "driver", "default_worker.py": "default_worker"}


def process_kind(cmdline: list[str]) -> str:
    """A process's kind from its command line: Ray's title for its workers (`ray::TrainController`),
    the daemon's name for Ray's own processes, `driver` for the sweep itself."""
    head = " ".join(cmdline)
    if head.startswith("ray::"):
        return head.split()[0].split(".")[0]
    return next((kind for word, kind in PROCESS_KINDS.items() if word in head), "other")


def _vllm_counts(ray_tmp: str) -> dict:
    return {"vllm_engine_starts": _log_count(ray_tmp, ENGINE_START)}


def _log_count(ray_tmp: str, line: str) -> int:
    """How often ``line`` occurs in the Ray session's worker logs."""
    logs = [f for f in Path(ray_tmp).rglob("*") if "session_latest" not in f.parts and "logs" in f.parts
            and f.suffix in (".out", ".err", ".log") and f.is_file()]
    return sum(f.read_text(errors="replace").count(line) for f in logs)


def breakdown(records: list[dict], wall: float, cpus: int, concurrency: int, busy: float) -> dict:
    """The trials' time by stage, summed, and the useful share: of the trials' own time, and of the
    sweep's wall time x its CPUs, counted in CPU seconds (`useful_cpu`). Counted in wall seconds the
    latter would be wrong with more trials than CPUs: trials sharing a core stretch each other's
    optimizer steps, so it is given only where each trial had a CPU of its own. ``busy``: the CPU
    seconds the whole machine used, of which `useful_cpu_share_of_busy_cpu` went into useful work and
    `non_useful_cpu_s` did not."""
    from raydistill.records import CPU_STAGES, TIME_STAGES

    sums = {stage: round(sum(r["timings"].get(stage, 0.0) for r in records), 1) for stage in TIME_STAGES}
    if not all("useful" in r["timings"] for r in records):  # an engine that does not time generation (vLLM)
        sums["useful"] = sums["useful_cpu"] = None
        return {"breakdown": sums, "useful_share_of_trial_time": None, "useful_share_of_cpu_wall": None,
                "useful_cpu_share_of_cpu_wall": None, "useful_cpu_share_of_busy_cpu": None, "non_useful_cpu_s": None}
    with_cpu = all("useful_cpu" in r["timings"] for r in records)
    if not with_cpu:  # records from before the CPU timings: not measured rather than 0
        sums.update(dict.fromkeys(CPU_STAGES))
    return {"breakdown": sums,
            "useful_share_of_trial_time": round(sums["useful"] / max(sums["wall"], 1e-9), 3),
            "useful_share_of_cpu_wall": round(sums["useful"] / (wall * cpus), 3) if concurrency <= cpus else None,
            "useful_cpu_share_of_cpu_wall": round(sums["useful_cpu"] / (wall * cpus), 3) if with_cpu else None,
            "useful_cpu_share_of_busy_cpu": round(sums["useful_cpu"] / max(busy, 1e-9), 3) if with_cpu else None,
            "non_useful_cpu_s": round(busy - sums["useful_cpu"], 1) if with_cpu else None}


def _predictions(records: list[dict]) -> dict:
    """Each trial's generations by question, keyed by its axes, for comparing two runs."""
    import pyarrow.parquet as pq

    return {json.dumps(r["axes"], sort_keys=True): sorted((p["question_id"], p["generation"]) for p in
                                                           pq.read_table(r["predictions_path"]).to_pylist())
            for r in records}


def compare_engines(workdir: Path, concurrency: int, cpus: int, sweep: dict = SWEEP) -> dict:
    """The sweep with per-trial engines, then with shared ones: same predictions, time by stage."""
    runs = {"per_trial": run_sweep(workdir, concurrency, cpus, sweep=sweep),
            "shared": run_sweep(workdir, concurrency, cpus, True, sweep=sweep)}
    before, after = runs["per_trial"].pop("predictions"), runs["shared"].pop("predictions")
    pairs = [(a, b) for trial in before for a, b in zip(before[trial], after.get(trial, []))]
    first = {k: round(r["breakdown"]["eval_first_batch"] / r["trials"], 1) for k, r in runs.items()}
    return {**runs, "same_predictions": before == after,
            "identical_generations": f"{sum(a == b for a, b in pairs)}/{sum(len(v) for v in before.values())}",
            "eval_first_batch_s_per_trial": first,
            "wall_ratio_shared_vs_per_trial": round(runs["shared"]["wall_s"] / runs["per_trial"]["wall_s"], 3)}


def _busy_seconds(times) -> float:
    """CPU seconds the machine spent on anything but idling (all cores together)."""
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep.json"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: concurrency)")
    parser.add_argument("--workdir", default=None, help="keep outputs here: a folder without an earlier run (default: a temporary folder)")
    parser.add_argument("--engines", action="store_true",
                        help="compare per-trial evaluation engines with shared ones (eval.shared_engines)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="with --engines: the engine (vllm: SmolLM2-135M, in the vLLM environment)")
    parser.add_argument("--lora", action="store_true",
                        help="with --engines: train LoRA adapters (unmerged) instead of full fine-tunes")
    parser.add_argument("--demo", action="store_true",
                        help="with --engines: the demo's settings (sweeps/granularity.yaml) at levels 1-6 on HF")
    parser.add_argument("--shared-only", action="store_true",
                        help="with --engines: run the shared-engines sweep alone (to compare two versions of the code)")
    args = parser.parse_args(argv)
    if (args.engine != "hf" or args.lora or args.demo or args.shared_only) and not args.engines:
        parser.error("--engine, --lora, --demo and --shared-only apply to --engines")
    if args.demo and (args.engine != "hf" or args.lora):
        parser.error("--demo runs the demo's settings as they are: HF engines, full fine-tunes")
    cpus = args.cpus or args.concurrency
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rd-bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from raydistill.students import resolve_student

    sweep = demo_sweep() if args.demo else VLLM_SWEEP if args.engine == "vllm" else SWEEP
    if args.lora:
        sweep = {**sweep, "train": {**sweep["train"], **LORA_TRAIN}}
    resolve_student(sweep["students"][0])  # built or found once, outside the timings
    load_before = os.getloadavg()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before}
    if args.shared_only:
        shared = run_sweep(workdir, args.concurrency, cpus, True, sweep=sweep)
        shared.pop("predictions")
        result = {"benchmark": "sweep-shared", "sweep": sweep, "ray_cpus": cpus, "shared": shared,
                  "machine": {**machine, "loadavg_after": os.getloadavg()}}
        return _write(result, args.out)
    if args.engines:
        result = {"benchmark": "sweep-engines", "sweep": sweep, "ray_cpus": cpus,
                  **compare_engines(workdir, args.concurrency, cpus, sweep),
                  "machine": {**machine, "loadavg_after": os.getloadavg()}}
        return _write(result, args.out)
    sequential = run_sweep(workdir, 1, cpus)
    concurrent = run_sweep(workdir, args.concurrency, cpus)
    sequential.pop("predictions"), concurrent.pop("predictions")
    speedup = sequential["wall_s"] / concurrent["wall_s"]
    bound = min(args.concurrency, 1 / max(sequential["cpu_busy_fraction"], 1e-9))
    result = {
        "benchmark": "sweep", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "sweep": SWEEP, "ray_cpus": cpus, "sequential": sequential, "concurrent": concurrent,
        "speedup": round(speedup, 3), "parallel_efficiency": round(speedup / args.concurrency, 3),
        "goal_parallel_efficiency": 0.85,
        # The speed-up the sequential run's idle CPU leaves room for (Ray's own processes and the
        # driver already keep part of the machine busy), and how much of it the concurrent run got.
        "speedup_bound_from_idle_cpu": round(bound, 3),
        "efficiency_vs_idle_cpu_bound": round(speedup / bound, 3),
    }
    return _write(result, args.out)


def _write(result: dict, out: str) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
