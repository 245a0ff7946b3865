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


# The local S3 endpoint's credentials (any pair works with moto's server); a module's own Ray cluster
# passes them to its workers so that its runs may keep checkpoints there.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def ray_local():
    """A fresh 2-CPU local Ray cluster, shut down afterwards (`address="local"`: never a head this
    machine already runs, such as the README's `ray start`)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"]}})
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_storage(tmp_path, monkeypatch):
    """A bucket on a local S3 endpoint (moto's server, in its own process on 127.0.0.1); yields the
    pyarrow URI of a prefix in it. The credentials are set in the environment before any Ray
    cluster of the test starts (request this fixture before ``ray_local``), so workers inherit them."""
    import socket
    import subprocess
    import sys

    import pyarrow.fs

    log_path = tmp_path / "s3-server.log"
    with log_path.open("wb") as log:
        # The port is free when chosen but may be taken before the server binds it: a server that
        # exits before it answers is started again on another port.
        for attempt in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_until_serving(f"http://127.0.0.1:{port}/", proc, log_path)
                if proc.poll() is None:
                    break
            except RuntimeError:
                if proc.poll() is None or attempt == 2:
                    proc.kill()
                    proc.wait(10)
                    raise
            proc.wait(10)
        else:
            raise RuntimeError(f"the local S3 server did not start; see {log_path}")
        try:
            for name, value in S3_TEST_ENV.items():
                monkeypatch.setenv(name, value)
            uri = f"s3://raydistill-test/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
            admin, _ = pyarrow.fs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
            admin.create_dir("raydistill-test")
            yield uri
        finally:
            proc.terminate()
            proc.wait(10)


def _wait_until_serving(url: str, proc, log_path: Path, timeout: float = 60) -> None:
    """Return once `url` answers; raise naming the log if the server process ends or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local S3 server did not start; see {log_path}") from None
            time.sleep(0.2)
