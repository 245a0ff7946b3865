"""Shared fixtures: the data mirror, a private model cache, and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAYDISTILL_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole session, so students are built or converted once."""
    path = Path(os.environ.get("RAYDISTILL_TEST_CACHE", tmp_path_factory.mktemp("models")))
    os.environ["RAYDISTILL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def ray_local():
    """A fresh 2-CPU local Ray cluster, shut down afterwards."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"]}})
    yield ray
    ray.shutdown()
