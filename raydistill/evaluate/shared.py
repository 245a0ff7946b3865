"""HF engines that outlive a trial (``eval.shared_engines: true``).

Per trial, the HF engine (on CPU) otherwise runs in fresh Ray Data actors: a process starts, imports torch
and transformers and loads the model before the first batch (`eval_first_batch` in a trial's time
breakdown). Shared engines are named, detached actors (`EngineHost`), one per actor slot of an
actor shape, that the sweep's trials find by name: each keeps its process and imports, and loads
the weights a call names only when they differ from the last call's (the next trial's model).
Predictions are the same as with per-trial actors: the same `HFEngine` generates them.

The hosts reserve no CPU of their own; the trial's evaluation task holds the CPUs they work with
(`host_cpus`), so an idle host does not keep a training worker from starting. The sweep stops
them when it ends (`stop_engine_hosts`), or when an evaluation runs past ``eval.timeout_s``.
"""

from __future__ import annotations

import math

import numpy as np

from raydistill.spec import EvalSpec

NAMESPACE = "raydistill-engines"


def host_cpus(spec: EvalSpec) -> float:
    """The CPUs a trial's evaluation holds while shared hosts generate for it."""
    return spec.cpus_per_actor * spec.num_actors if spec.shared_engines else 0


class EngineHost:
    """One long-lived HF engine (a Ray actor): generates a batch with the weights the call names."""

    def __init__(self):
        self.engine, self.loaded = None, None

    def generate(self, model_path: str, template_name: str, spec: dict, stop_strings: list[str],
                 rows: list[dict]) -> list[dict]:
        from raydistill.evaluate.hf_engine import HFEngine

        wanted = (model_path, template_name, repr(sorted(spec.items())), tuple(stop_strings))
        if wanted != self.loaded:  # another trial's model: load it into this process
            import torch

            self.engine, self.loaded = None, None  # the last model goes before the next one loads
            # the threads a per-trial actor of cpus_per_actor CPUs gets from Ray (OMP_NUM_THREADS)
            torch.set_num_threads(max(1, math.floor(spec["cpus_per_actor"])))
            self.engine, self.loaded = HFEngine(model_path, template_name, spec, stop_strings), wanted
        batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
        out = self.engine(batch)
        return [{key: _plain(values[i]) for key, values in out.items()} for i in range(len(out["prompt"]))]

    def pid(self) -> int:
        import os

        return os.getpid()


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def host_names(spec: EvalSpec, group: str) -> list[str]:
    """The names of the hosts a sweep (``group``) evaluates with under ``spec``."""
    return [f"{group}-hf-{i}" for i in range(spec.num_actors)]


def engine_hosts(spec: EvalSpec, group: str) -> list:
    """The sweep's shared hosts for ``spec`` (``num_actors`` of them), started on first use."""
    import ray

    host = ray.remote(EngineHost)
    return [host.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
                         resources=spec.resources_per_actor or None).remote()
            for name in host_names(spec, group)]


def generate_on_hosts(prompts: list[dict], model_path: str, template_name: str, spec: EvalSpec,
                      stop_strings: list[str], group: str):
    """Rows with generations, one list per finished batch of ``spec.batch_size`` prompts (in the
    order given: `generate_batches` sorts them by length)."""
    from ray.util import ActorPool

    batches = [prompts[i:i + spec.batch_size] for i in range(0, len(prompts), spec.batch_size)]
    dumped = spec.model_dump(mode="json")
    pool = ActorPool(engine_hosts(spec, group))
    yield from pool.map_unordered(
        lambda host, rows: host.generate.remote(model_path, template_name, dumped, stop_strings, rows), batches)


def stop_engine_hosts(group: str, specs: list[EvalSpec]) -> int:
    """Kill the sweep's shared hosts; returns how many were running."""
    import ray

    stopped = 0
    for name in {n for spec in specs for n in host_names(spec, group)}:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            stopped += 1
        except ValueError:  # never started, or already gone
            pass
    return stopped
