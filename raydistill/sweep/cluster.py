"""The Ray cluster a sweep runs on: the one it was submitted to, or a local one."""

from __future__ import annotations

import os


def init_ray(verbose: bool = True) -> None:
    """Join the cluster this runs in (`ray job submit`, RAY_ADDRESS) or start a local one.

    ``verbose`` forwards every Ray worker's log lines to this process (Ray's default); without
    it a trial's errors still arrive with its result, and its logs stay in Ray's session folder.
    """
    import ray

    if ray.is_initialized():
        return
    # Joins RAY_ADDRESS when set (e.g. inside `ray job submit`), else starts a local cluster of
    # RAYDISTILL_RAY_NUM_CPUS CPUs (default: all of this machine's).
    cpus = os.environ.get("RAYDISTILL_RAY_NUM_CPUS")
    ray.init(num_cpus=int(cpus) if cpus and not os.environ.get("RAY_ADDRESS") else None, log_to_driver=verbose)
