"""The Ray cluster a sweep runs on: the one it was submitted to, or a local one."""

from __future__ import annotations

import os

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch, read by each run's controller


def init_ray(verbose: bool = True) -> None:
    """Join the cluster this runs in (`ray job submit`, RAY_ADDRESS) or start a local one.

    ``verbose`` forwards every Ray worker's log lines to this process (Ray's default); without
    it a trial's errors still arrive with its result, and its logs stay in Ray's session folder.

    A local cluster lives as long as the sweep and runs what it needs only: no dashboard (unless
    ``verbose``) and no Ray Train preemption watcher (one more process per trial that watches for
    node drains, which a single machine never has). A cluster the sweep joins keeps its settings.
    """
    import ray

    if ray.is_initialized():
        return
    if not starts_local_cluster():  # RAY_ADDRESS (`ray job submit`) or a `ray start` cluster here
        ray.init(log_to_driver=verbose)
        return
    cpus = os.environ.get("RAYDISTILL_RAY_NUM_CPUS")  # default: all of this machine's
    os.environ.setdefault(PREEMPTION_WATCHER, "0")  # read by each trial's Train controller
    ray.init(num_cpus=int(cpus) if cpus else None, log_to_driver=verbose, include_dashboard=verbose)


def starts_local_cluster() -> bool:
    """Whether `ray.init()` here would start a new local cluster: no RAY_ADDRESS and no cluster
    started with `ray start` on this machine (Ray's own lookup)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is None
