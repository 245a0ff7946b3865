"""A cluster rehearsal as strict as a real cluster, on one CPU machine.

A head (0 CPUs: it runs only drivers) and a worker node are started with the real `ray start`,
each in a mount namespace of its own (`unshare --mount`): each node has a private HOME (and so
Hugging Face cache), /tmp and Ray temp folder, and the other node's private disk is not there.
Only what the cluster configs declare shared (cluster/aws.yaml, gcp.yaml, kuberay: outputs and
`RAYDISTILL_CACHE_DIR`) is common to both, at the same path; the installation (this checkout and
its virtualenv, DeepSpeed's prebuilt ops) is on every node, as a node image would have it.

Secrets live only where docs/cluster.md puts them: each node's `~/.raydistill/secrets.env`, which
the node's environment reads at start (the launchers' file mount and `.bashrc` line; a Kubernetes
secret on KubeRay). The student is a hub student, fetched for real: a stand-in for the Hugging
Face Hub on 127.0.0.1 (tests/hub_server.py, reached through huggingface_hub's own `HF_ENDPOINT`)
serves it gated, so every download must carry the token. The sweep is submitted from outside the
cluster with `ray job submit`, as docs/cluster.md writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hub_server import HubProcess
from openai_server import ServerProcess
from test_cluster_local import AUTH, VENV_BIN, _free_port, _processes_naming, _ray, _stop_processes, _wait_job

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECRETS_FILE = ".raydistill/secrets.env"  # docs/cluster.md, "Secrets, one rule"
HUB_STUDENT = ("bloom-560m", "bigscience/bloom-560m")  # a registry entry whose weights come from the hub
# Mount namespaces need root; anyone else gets one inside a user namespace of their own.
UNSHARE_AS_USER = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]


def _docs_submit_command() -> list[str]:
    """The `ray job submit` line of docs/cluster.md's step-by-step block, as a user copies it."""
    text = (REPO / "docs" / "cluster.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "ray up" in b)
    joined = re.sub(r"\\\n\s*", "", block)
    line = next(line for line in joined.splitlines() if line.strip().startswith("ray job submit"))
    return shlex.split(line.split("  #")[0])


def _mount_script(node_dir: Path, hidden: list[Path], keep: list[Path]) -> str:
    """Shell lines, run inside the node's mount namespace: a private /tmp (the paths in ``keep``
    that lie under /tmp are bound back into it) and ``hidden`` (other nodes' disks) covered by
    empty file systems."""
    lines = ["set -euo pipefail"]
    kept = [p for p in keep if p.is_relative_to("/tmp")]
    for i, path in enumerate(kept):
        lines += [f"mkdir -p {node_dir}/.keep/{i}", f"mount --bind {path} {node_dir}/.keep/{i}"]
    lines.append("mount -t tmpfs -o size=4g,mode=1777 rehearsal-tmp /tmp")
    for i, path in enumerate(kept):
        lines += [f"mkdir -p {path}", f"mount --bind {node_dir}/.keep/{i} {path}"]
    lines += [f"mount -t tmpfs -o size=1m other-node {path}" for path in hidden]
    return "\n".join(lines)


class PrivateNode:
    """A Ray node whose processes see their own disk and the shared storage only."""

    def __init__(self, root: Path, name: str, env: dict[str, str]):
        self.root, self.name, self.dir = root, name, root / name
        self.home, self.ray_dir = self.dir / "home", self.dir / "ray"
        for folder in (self.home, self.ray_dir, self.dir / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "HOME": str(self.home), "TMPDIR": "/tmp"}

    def write_secrets(self, secrets: dict[str, str]) -> None:
        """What the launcher's file mount (or the Kubernetes secret) puts on every node."""
        path = self.home / SECRETS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
        path.chmod(0o600)

    def start(self, ray_args, others: list["PrivateNode"], keep: list[Path], tries: int = 3) -> None:
        """`ray start` with ``ray_args()`` in the node's namespace. The ports in the arguments are
        free when chosen but may be taken before Ray binds them: a failed start is stopped and tried
        again with new ones."""
        script = _mount_script(self.dir, [o.dir for o in others], keep)
        # the node's environment, as its .bashrc gives it (docs/cluster.md): the secrets file, read at start
        script += f"\nset -a; . ~/{SECRETS_FILE}; set +a\nexec {os.path.join(VENV_BIN, 'ray')} \"$@\"\n"
        for attempt in range(tries):
            command = ["unshare", *UNSHARE_AS_USER, "--mount", "--propagation", "private", "bash", "-c", script,
                       "node", *ray_args()]
            proc = subprocess.run(command, env=self.env, cwd=self.home, text=True, capture_output=True, timeout=180)
            if proc.returncode == 0:
                return
            _stop_processes(self.processes())
        raise AssertionError(f"node {self.name} did not start:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def processes(self):
        return _processes_naming(str(self.ray_dir))


def _node_env(shared: Path, hub: str) -> dict[str, str]:
    """What every node's `.bashrc` exports in the cluster configs (plus the hub stand-in's address and
    this machine's OpenBLAS settings); nothing from the test's own environment."""
    env = {"PATH": VENV_BIN + os.pathsep + "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "RAYDISTILL_OUTPUT_DIR": str(shared / "outputs"), "RAYDISTILL_CACHE_DIR": str(shared / "cache"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_ENDPOINT": hub, "HF_HUB_ETAG_TIMEOUT": "60",
           "HF_HUB_DOWNLOAD_TIMEOUT": "60",  # the stand-in hub shares 2 busy cores
           # the node image's DeepSpeed ops, built once at install (Makefile)
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions")), **AUTH}
    env.update({k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")})
    return env


def _hub_repo(model_cache: Path, folder: Path) -> Path:
    """The built tiny-llama-alpaca weights as a hub repository holds them (no raydistill files)."""
    from raydistill.students import resolve_student

    built = resolve_student("tiny-llama-alpaca", cache_dir=model_cache)
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns(".*", "raydistill_student.json"))
    return folder


def test_a_hub_student_and_secrets_on_nodes_with_private_disks(model_cache, tmp_path):
    """The sweep trains and evaluates a hub student on a worker node that cannot see the head's disk:
    the student is downloaded once, with the token, into the shared cache; the teacher key and the
    token reach the nodes from their secrets file only and are written nowhere."""
    import mlflow

    root = Path(tempfile.mkdtemp(prefix="rdr-", dir="/var/tmp"))  # not under /tmp: each node has its own
    shared = root / "shared"
    (shared / "outputs").mkdir(parents=True)
    (shared / "cache").mkdir()
    hf_token, teacher_key = "hf_sentinel" + uuid.uuid4().hex, "sk-sentinel-" + uuid.uuid4().hex
    key_env = "RAYDISTILL_SENTINEL_TEACHER_KEY"
    head = worker = None
    repo = _hub_repo(model_cache, tmp_path / "hub-repo")
    try:
        with HubProcess(tmp_path / "hub", {HUB_STUDENT[1]: repo}, hashlib.sha256(hf_token.encode()).hexdigest()) as hub, \
             ServerProcess(tmp_path / "teacher", policy="fixed", fixed_answer="7",
                           expect_key_sha256=hashlib.sha256(teacher_key.encode()).hexdigest()) as teacher:
            env = _node_env(shared, hub.endpoint)
            head, worker = PrivateNode(root, "head", env), PrivateNode(root, "worker", env)
            head.env["RAYDISTILL_DATA_DIR"] = os.environ["RAYDISTILL_DATA_DIR"]  # data is prepared on the head
            for node in (head, worker):
                node.write_secrets({"HF_TOKEN": hf_token, key_env: teacher_key})
            install = [REPO, Path(VENV_BIN).parent, Path(env["TORCH_EXTENSIONS_DIR"])]
            port, dashboard_port = _free_port(), _free_port()
            common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--object-store-memory",
                      str(300 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0"]

            def node_ports() -> list[str]:
                return [a for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                         "--runtime-env-agent-port", "--metrics-export-port")
                        for a in (option, str(_free_port()))]

            def head_args() -> list[str]:
                nonlocal port, dashboard_port
                port, dashboard_port = _free_port(), _free_port()
                return ["start", "--head", "--port", str(port), "--num-cpus", "0", "--temp-dir", str(head.ray_dir),
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                        str(dashboard_port), *common, *node_ports()]

            head.start(head_args, others=[worker], keep=[*install, Path(os.environ["RAYDISTILL_DATA_DIR"])])
            worker.start(lambda: ["start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--temp-dir",
                                  str(worker.ray_dir), *common, *node_ports()], others=[head], keep=install)

            config = {**yaml.safe_load((REPO / "tests/configs/tiny_sweep.yaml").read_text()),
                      "name": "rehearsal", "students": [HUB_STUDENT[0]], "teachers": ["local"], "levels": [2],
                      "annotation": {"teachers": {"local": {"model": "openai/local-teacher",
                                                            "api_base": teacher.base_url, "api_key_env": key_env,
                                                            "max_tokens": 256}},
                                     "runtime": {"concurrency": 4, "num_actors": 1}}}
            config.pop("output_dir")  # the nodes' RAYDISTILL_OUTPUT_DIR, as on the cluster configs
            config_path = shared / "rehearsal.yaml"
            config_path.write_text(yaml.safe_dump(config))

            dashboard = f"http://127.0.0.1:{dashboard_port}"
            command = [dashboard if a == "http://127.0.0.1:8265" else str(config_path)
                       if a == "cluster/sweep-cluster.yaml" else a for a in _docs_submit_command()]
            assert command[:3] == ["ray", "job", "submit"] and str(config_path) in command, command
            laptop = {"PATH": VENV_BIN + os.pathsep + "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
                      "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0", **AUTH}  # a user's shell: no secrets
            submit = _ray("job", "submit", "--submission-id", "rd-rehearsal", *command[3:], env=laptop, timeout=300,
                          check=False)
            assert submit.returncode == 0, submit.stdout + submit.stderr
            cluster = SimpleNamespace(dashboard=dashboard, env=laptop)  # what _wait_job asks of a head
            status = _wait_job(cluster, "rd-rehearsal", timeout=1200)
            job_log = _ray("job", "logs", "--address", dashboard, "rd-rehearsal", env=laptop, check=False).stdout
            job_list = _ray("job", "list", "--address", dashboard, env=laptop, check=False).stdout
            secrets_files = {head.home / SECRETS_FILE, worker.home / SECRETS_FILE}  # where the keys belong
            written = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p not in secrets_files]
            leaks = [p for p in written if any(s.encode() in p.read_bytes() for s in (hf_token, teacher_key))]
            hub_requests, teacher_requests = hub.requests(), teacher.log_entries()
            in_shared_cache = sorted(p.relative_to(shared / "cache").as_posix()
                                     for p in (shared / "cache").glob("hub/models--*"))
            in_head_home = [str(p) for p in head.home.rglob("models--*")]
            run_dir = shared / "outputs" / "rehearsal"
            records = [json.loads(p.read_text()) for p in (run_dir / "trials").glob("*/record.json")]
            client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}") if records else None
            runs = client.search_runs([client.get_experiment_by_name("rehearsal").experiment_id]) if client else []
            tracked = json.dumps([[r.data.params, r.data.tags, r.data.metrics] for r in runs])
    finally:
        for node in (worker, head):
            if node is not None:
                _stop_processes(node.processes())
        shutil.rmtree(root, ignore_errors=True)

    assert status == "SUCCEEDED", job_log[-8000:]
    assert len(records) == 1, "one trial"
    assert records[0]["axes"]["student"] == HUB_STUDENT[0] and records[0]["metrics"]["n_test"] == 6
    # The student came from the hub, with the token, once, into the shared cache.
    files = [r for r in hub_requests if "/resolve/" in r["path"] and r["method"] == "GET"]
    assert files and all(r["auth"] for r in hub_requests if r["path"].startswith(("/api/models", "/bigscience"))), \
        hub_requests
    assert len({r["path"] for r in files}) == len(files), "a file was downloaded twice"
    assert in_shared_cache == ["hub/models--" + HUB_STUDENT[1].replace("/", "--")] and not in_head_home, \
        (in_shared_cache, in_head_home)
    # The teacher got the key from the nodes' secrets file, and the key and token are written nowhere.
    assert teacher_requests and all(entry["auth"] for entry in teacher_requests)
    assert len(written) > 100 and not leaks, leaks
    assert hf_token not in job_log + job_list and teacher_key not in job_log + job_list
    assert runs and hf_token not in tracked and teacher_key not in tracked
