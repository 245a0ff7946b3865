"""Cluster runs, locally: the real `ray start` / `ray job submit` / `ray job stop` CLI against a
private Ray head, and the real autoscaler against Ray's fake multi-node provider.

Each test starts its own head with a private --temp-dir and stops exactly the processes of that
head (found by the temp dir in their command line, plus their descendants) — `ray stop` would
stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny_sweep.yaml"
VENV_BIN = str(Path(sys.executable).parent)
# What the job's working-dir upload leaves out (besides .gitignore'd paths, which Ray skips too).
UPLOAD_EXCLUDES = [".git", ".venv", ".venv-vllm", "outputs", "**/__pycache__", ".pytest_cache", "mlruns",
                   "*.egg-info", "benchmarks"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's token authentication with a token of this test session (not ~/.ray/auth_token): the head
# and every CLI call below get it from the environment.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                "RAY_USAGE_STATS_ENABLED": "0", **AUTH})
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(extra)
    return env


def _ray(*args: str, env: dict | None = None, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([os.path.join(VENV_BIN, "ray"), *args], cwd=REPO, env=env or _env(), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _agent_ports() -> list[str]:
    """Ports of their own for a node's agents: the defaults (52365 and others) may be held by another
    Ray instance of this machine, and the job agent would not start."""
    return [a for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                             "--runtime-env-agent-port", "--metrics-export-port")
            for a in (option, str(_free_port()))]


class LocalHead:
    """A Ray head started with the real CLI in a private temp dir; `stop()` ends only its processes."""

    def __init__(self, num_cpus: int, dashboard: bool = True, autoscaling_config: Path | None = None,
                 env: dict | None = None, object_store_mb: int = 300, extra_args: tuple[str, ...] = (),
                 node_ip: str = "127.0.0.1"):
        # short path: Ray's Unix sockets live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")
        self.node_ip = node_ip  # a driver joining with ray.init(address) needs a non-loopback one
        self.env = env or _env()
        # Ports are free when chosen but may be taken before Ray binds them ("address already in
        # use"): a head that fails to start is stopped and started again on new ports.
        for attempt in range(3):
            self.port, self.dashboard_port = _free_port(), _free_port()
            self.gcs = f"{node_ip}:{self.port}"
            self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
            args = ["start", "--head", "--node-ip-address", node_ip, "--port", str(self.port),
                    "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir, "--disable-usage-stats",
                    "--object-store-memory", str(object_store_mb * 1024 * 1024),
                    "--min-worker-port", "0", "--max-worker-port", "0"]
            args += _agent_ports()
            if dashboard:
                args += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dashboard_port)]
            else:
                args += ["--include-dashboard", "false"]
            if autoscaling_config is not None:
                args += [f"--autoscaling-config={autoscaling_config}"]
            args += list(extra_args)
            try:
                _ray(*args, env=self.env)
                return
            except AssertionError:
                _stop_processes(self.processes())
                if attempt == 2:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)
                    raise
            except BaseException:
                self.stop()
                raise

    def processes(self) -> list[psutil.Process]:
        """This head's processes: those naming its temp dir, and everything they started."""
        return _processes_naming(self.temp_dir)

    def stop(self) -> None:
        _stop_processes(self.processes())
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _processes_naming(text: str) -> list[psutil.Process]:
    """Processes with `text` in their command line, and everything they started."""
    own = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or []):
                own.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in own}
    for proc in own:
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_processes(procs: list[psutil.Process], grace: float = 5) -> None:
    """SIGTERM, then SIGKILL for what is left after ``grace`` seconds. A head's GCS server and one
    of its Python processes have outlasted 20 s after SIGTERM on this 2-core machine; every process
    of the node is in ``procs``, so killing them leaves none behind."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _runtime_env(model_cache: Path) -> str:
    return json.dumps({
        "excludes": UPLOAD_EXCLUDES,
        "env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"],
                     "RAYDISTILL_CACHE_DIR": str(model_cache),
                     "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    })


def _submit(head: LocalHead, job_id: str, model_cache: Path, out: Path, *overrides: str, config: str = TINY) -> None:
    """The real `ray job submit`, as docs/cluster.md tells users to run it (here without waiting).
    A head that has just started may not have its job agent yet: Ray answers "No available agent
    to submit job, please try again later", and so the submission is tried again."""
    sets = [a for o in overrides for a in ("--set", o)]
    args = ["job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--no-wait",
            "--working-dir", ".", "--runtime-env-json", _runtime_env(model_cache), "--",
            "python", "sweeps/granularity.py", "--config", config, "--output-dir", str(out), *sets]
    deadline = time.monotonic() + 120
    while True:
        proc = _ray(*args, env=_env(), check=False)
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            raise AssertionError(f"ray job submit exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        time.sleep(3)


# `ray job status` prints "Status for job 'x': RUNNING" while a job runs, and a sentence once it ended.
JOB_ENDED = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}


def _status(head: LocalHead, job_id: str) -> str:
    out = _ray("job", "status", "--address", head.dashboard, job_id, env=head.env, check=False).stdout
    running = re.search(r"Status for job '[^']+': (\w+)", out)
    if running:
        return running.group(1)
    ended = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out)
    return JOB_ENDED[ended.group(1)] if ended else "UNKNOWN"


def _logs(head: LocalHead, job_id: str) -> str:
    return _ray("job", "logs", "--address", head.dashboard, job_id, env=head.env, check=False).stdout[-6000:]


def _wait_job(head: LocalHead, job_id: str, timeout: float, every: float = 10) -> str:
    """Wait for the job's end and return its status. `ray job logs --follow` returns once the job
    has ended (the head closes the stream after it saw a final status), so one call waits on the
    event itself; `ray job status` is then read, and polled (each call is a Python start of about
    1.5 CPU-seconds, hence not often) only if the follow ended early."""
    deadline = time.monotonic() + timeout
    try:
        _ray("job", "logs", "--address", head.dashboard, "--follow", job_id, env=head.env, timeout=timeout,
             check=False)
    except subprocess.TimeoutExpired:
        pass
    while True:
        status = _status(head, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    raise AssertionError(f"job {job_id} still running after {timeout} s\n{_logs(head, job_id)}")


def _records(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/record.json")}


@pytest.fixture
def head():
    local = LocalHead(num_cpus=2)
    try:
        yield local
    finally:
        local.stop()


def test_upload_is_small(tmp_path):
    """The working-dir package the tests (and docs/cluster.md) submit leaves out venvs and outputs.

    Built with Ray's own packaging function, as `ray job submit --working-dir .` builds it."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=UPLOAD_EXCLUDES)
    names = zipfile.ZipFile(package).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"raydistill", "sweeps", "tests", "cluster", "data", "pyproject.toml"} <= tops
    assert not tops & {".venv", ".venv-vllm", "outputs", ".git", "benchmarks"}, tops
    assert "tests/configs/tiny_sweep.yaml" in names
    assert package.stat().st_size < 10 * 2**20, f"package is {package.stat().st_size / 2**20:.1f} MiB"


README_SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python sweeps/granularity.py"


def _readme_cluster_commands() -> list[str]:
    """The README's bash block that submits a sweep to a local head, one command per entry
    (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next((b for b in blocks if README_SUBMIT in b), None)
    assert block is not None, f"README.md has no bash block with `{README_SUBMIT}`"
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _ray_session_of_default_temp_dir() -> str:
    return os.path.realpath("/tmp/ray/session_latest")


CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # `ray start` writes it, `ray stop` removes it


def _restore_current_cluster(before: str | None) -> None:
    """Do what `ray stop` does for the address file: a stale one makes every later `ray.init()`
    of this machine try to join the stopped head."""
    if before is None:
        CURRENT_CLUSTER.unlink(missing_ok=True)
    else:
        CURRENT_CLUSTER.write_text(before)


# What a head that is still starting answers a job submission (the README says to run it again).
STILL_STARTING = "No available agent to submit job|Remote end closed connection without response"


def _again_while_starting(command: str) -> str:
    """``command`` in bash, run again (up to 36 times, 5 s apart) while its output says the head is still
    starting: on a busy 2-core machine its job agent has taken more than 15 s, and once more than 60 s
    (a fresh-clone run beside other work, 2026-12-07)."""
    return textwrap.dedent(f"""\
        for attempt in $(seq 36); do
            if out=$({command} 2>&1); then echo "$out"; break; fi
            echo "$out"
            if [ "$attempt" = 36 ] || ! grep -qE "{STILL_STARTING}" <<< "$out"; then exit 1; fi
            sleep 5
        done""")


def test_readme_job_submit_lines_work_from_a_fresh_shell(tmp_path):
    """The README's lines, as written, in bash with nothing but HOME and the system PATH: the venv,
    Ray's token authentication and the head's environment all come from those lines. The job's
    command gets a one-trial config appended (the README's default sweep takes 14 minutes); the
    final `ray stop` (every Ray process of the machine) is replaced by stopping this head only."""
    commands = _readme_cluster_commands()
    assert commands[-1] == "ray stop" and sum(README_SUBMIT in c for c in commands) == 1, commands
    out = tmp_path / "out"
    one_trial = f" --config {TINY} --output-dir {out} --set levels=[1]"
    script = "set -euo pipefail\n" + "\n".join(
        _again_while_starting(c + one_trial) if README_SUBMIT in c else c for c in commands[:-1]) + "\n"
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    before = _ray_session_of_default_temp_dir()
    address_before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, text=True, capture_output=True,
                              timeout=900)
    finally:
        session = _ray_session_of_default_temp_dir()
        if session != before:
            _stop_processes(_processes_naming(session))
            _restore_current_cluster(address_before)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "succeeded" in proc.stdout + proc.stderr

    run_dir = out / "tiny-cluster"
    records = [json.loads(p.read_text()) for p in _records(run_dir)]
    assert [r["axes"]["level"] for r in records] == ["1"]
    assert all(r["metrics"]["n_test"] == 6 and r["metrics"]["train_examples"] == 16 for r in records)
    row = next(line for line in (run_dir / "results.md").read_text().splitlines() if "tiny-llama" in line)
    for record in records:
        assert f"{100 * record['metrics']['accuracy']:.1f}" in row
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-cluster")
    hashes = {r.data.tags.get("raydistill.trial_hash") for r in client.search_runs([experiment.experiment_id])}
    assert {r["trial_hash"] for r in records} <= hashes
    assert "wall time" in proc.stdout


def test_job_stop_then_resume(head, model_cache, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "tiny-cluster"
    _submit(head, "rd-first", model_cache, out)
    deadline = time.monotonic() + 600
    checked = 0.0
    while not _records(run_dir):
        assert time.monotonic() < deadline, _logs(head, "rd-first")
        if time.monotonic() - checked > 15:
            assert _status(head, "rd-first") in ("PENDING", "RUNNING"), _logs(head, "rd-first")
            checked = time.monotonic()
        time.sleep(0.5)
    _ray("job", "stop", "--address", head.dashboard, "rd-first", env=head.env)
    assert _wait_job(head, "rd-first", timeout=60, every=2) == "STOPPED"
    finished = _records(run_dir)
    assert len(finished) == 1, "the job was stopped after its first trial"

    _submit(head, "rd-again", model_cache, out)
    status = _wait_job(head, "rd-again", timeout=600)
    assert status == "SUCCEEDED", _logs(head, "rd-again")
    after = _records(run_dir)
    assert len(after) == 2
    assert {p: after[p] for p in finished} == finished, "the finished trial was not recomputed"
    row = next(line for line in (run_dir / "results.md").read_text().splitlines() if "tiny-llama" in line)
    assert row.count("|") >= 4


# --------------------------------------------------------------------------- autoscaler


def _fake_cluster_config(path: Path, gcs: str) -> Path:
    """Ray's fake multi-node provider: worker "nodes" are raylets on this machine, started and
    stopped by the real autoscaler (monitor) of the head."""
    config = {
        "cluster_name": "raydistill-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        # type external: the same provider class, without the defaults file that type
        # fake_multinode loads (not shipped in the wheel)
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu.annotation": {"resources": {"CPU": 2, "annotation_node": 2, "object_store_memory": 200 * 2**20},
                               "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
    path.write_text(yaml.safe_dump(config))
    return path


# Watches the fake cluster from its own process: joining a cluster with ray.init in the pytest
# process would leave Ray's cached auth mode behind for the local clusters of later tests.
NODE_WATCHER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps([n["Resources"] for n in nodes]), flush=True)
    time.sleep(1)
"""


class NodeWatcher:
    """Alive nodes of a cluster (their resources), seen once a second by a watcher process."""

    def __init__(self, gcs: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", NODE_WATCHER, gcs], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.latest: list[dict] | None = None
        self.peak = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.latest = json.loads(line)
            self.peak = max(self.peak, len(self.latest))

    def wait_for(self, predicate, timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while self.latest is None or not predicate(self.latest):
            assert self.proc.poll() is None, "the node watcher exited"
            assert time.monotonic() < deadline, f"{what}: nodes seen {self.latest}"
            time.sleep(1)
        return self.latest

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_autoscaler_adds_and_removes_nodes_for_a_sweep(model_cache, tmp_path):
    env = _env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_AUTH_TOKEN")
    head = watcher = None
    try:
        head = _start_fake_head(tmp_path / "fake.yaml", env)
        watcher = NodeWatcher(head.gcs, env)
        nodes = watcher.wait_for(lambda nodes: len(nodes) >= 1, 120, "the watcher saw no node")
        assert len(nodes) == 1 and not nodes[0].get("CPU")  # only the head, which has no CPU
        # A one-trial sweep whose Train group (2 workers) and eval actor need CPUs: none on the
        # head, so the autoscaler must start annotation-type nodes. The driver joins via RAY_ADDRESS.
        out = tmp_path / "out"
        driver = subprocess.run(
            [sys.executable, "sweeps/granularity.py", "--config", TINY, "--output-dir", str(out),
             "--set", "levels=[1]", "--set", "train.num_workers=2"],
            cwd=REPO, env={**env, "RAY_ADDRESS": head.gcs, "RAYDISTILL_CACHE_DIR": str(model_cache)},
            capture_output=True, text=True, timeout=900)
        assert driver.returncode == 0, driver.stdout[-4000:] + driver.stderr[-4000:]
        assert len(_records(out / "tiny-cluster")) == 1
        assert watcher.peak >= 2, "the autoscaler added no node"
        types = {n.get("annotation_node") for n in watcher.latest if n.get("CPU")}
        assert types <= {2.0}
        # idle nodes go away (idle_timeout_minutes 0.1)
        watcher.wait_for(lambda nodes: len(nodes) == 1, 120, "idle nodes were not removed")
    finally:
        if watcher is not None:
            watcher.stop()
        if head is not None:
            head.stop()


def _start_fake_head(config: Path, env: dict, tries: int = 3) -> LocalHead:
    """A 0-CPU head whose autoscaler runs the fake provider of ``config`` (written here: it names the
    head's GCS port). The port is free when chosen but may be taken before Ray binds it: a head that
    fails to start is stopped and started again on a new port, with the config rewritten."""
    head = LocalHead.__new__(LocalHead)
    head.temp_dir = tempfile.mkdtemp(prefix="rdf-", dir="/tmp")
    head.env, head.dashboard_port, head.dashboard = env, None, None
    try:
        for attempt in range(tries):
            head.port = _free_port()
            head.gcs = f"127.0.0.1:{head.port}"
            _fake_cluster_config(config, head.gcs)
            try:
                _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(head.port), "--num-cpus", "0",
                     "--temp-dir", head.temp_dir, "--disable-usage-stats", "--include-dashboard", "false",
                     "--object-store-memory", str(200 * 2**20), f"--autoscaling-config={config}",
                     *_agent_ports(), env=env)
                return head
            except AssertionError:
                _stop_processes(head.processes())
                if attempt == tries - 1:
                    raise
    except BaseException:
        head.stop()
        raise
    raise AssertionError("unreachable")
