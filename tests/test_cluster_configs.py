"""Cluster configs (cluster/): launcher YAMLs against Ray's own schema, KubeRay manifests against
the CRD subset in cluster/kuberay/schema/, and placement: every custom resource the cluster sweep
asks for exists on a node type (and every worker group) with enough of it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydistill.spec import SpecError, load_sweep, sweep_from_dict

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
SWEEP = CLUSTER / "sweep-cluster.yaml"
KUBERAY_SCHEMA = CLUSTER / "kuberay" / "schema" / "ray.io_v1.subset.schema.json"
CPU_RESOURCE, GPU_RESOURCE = "annotation_node", "gpu_node"
HEAD = "ray.head.default"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- launcher configs


def validate_launcher(config: dict) -> None:
    """Ray's own validation: its JSON schema, after the launcher's default filling."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path):
    validate_launcher(_yaml(path))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_validator_catches_a_typo(path):
    config = _yaml(path)
    config["available_node_types"]["gpu.train"]["max_worker"] = config["available_node_types"]["gpu.train"].pop(
        "max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_launcher(config)
    config = _yaml(path)
    config["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(config)


def _node_types(config: dict) -> dict[str, dict]:
    return config["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_node_types_autoscale_from_zero(path):
    config = _yaml(path)
    types = _node_types(config)
    assert config["head_node_type"] == HEAD
    assert types[HEAD]["resources"].get("CPU") == 0, "the head runs only drivers"
    workers = {name: t for name, t in types.items() if name != HEAD}
    cpu = [t for t in workers.values() if CPU_RESOURCE in t["resources"]]
    gpu = [t for t in workers.values() if GPU_RESOURCE in t["resources"]]
    assert cpu and gpu
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    for t in gpu:
        assert t["resources"]["GPU"] >= 1 and t["resources"][GPU_RESOURCE] == t["resources"]["GPU"]
        assert CPU_RESOURCE not in t["resources"]
    for t in cpu:
        assert "GPU" not in t["resources"] and GPU_RESOURCE not in t["resources"]
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu)
    assert 0 < config["idle_timeout_minutes"] <= 30


def _commands(node_type: dict, config: dict, head: bool) -> str:
    cmds = list(config.get("setup_commands", []))
    cmds += config.get("head_setup_commands", []) if head else config.get("worker_setup_commands", [])
    cmds += node_type.get("worker_setup_commands", [])
    return "\n".join(cmds)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_setup_installs_raydistill(path):
    config = _yaml(path)
    assert config["file_mounts"]["~/raydistill"] == "."
    assert {"**/.venv", "**/outputs", "**/.git"} <= set(config["rsync_exclude"])
    common = "\n".join(config["setup_commands"])
    assert re.search(r'ray\[[a-z,]+\]==2\.60\.0', common), "every node runs the Ray version the project pins"
    for name, node_type in _node_types(config).items():
        cmds = _commands(node_type, config, head=name == HEAD)
        if GPU_RESOURCE in node_type["resources"]:
            assert 'pip install -q -e "$HOME/raydistill[gpu]"' in cmds
            assert "torch==2.13.0" not in cmds, "GPU nodes need the CUDA build of torch"
        else:
            assert "pip install -q torch==2.13.0" in cmds
            assert "-e ~/raydistill" in cmds
        # the environment the sweep reads, and the shared file system, on every node
        assert "RAYDISTILL_OUTPUT_DIR=/mnt/shared/outputs" in cmds and "RAYDISTILL_CACHE_DIR=/mnt/shared/cache" in cmds
        assert "/mnt/shared" in cmds and "mount -t nfs" in cmds


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_mlflow_and_dashboard_bound_to_localhost(path):
    config = _yaml(path)
    head = "\n".join(config["head_start_ray_commands"])
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1
    assert "--host 127.0.0.1" in mlflow[0] and "--port 5000" in mlflow[0]
    assert "--backend-store-uri sqlite:////mnt/shared/" in mlflow[0]
    assert "--default-artifact-root /mnt/shared/" in mlflow[0]
    assert "--dashboard-host=127.0.0.1" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert not re.search(r"0\.0\.0\.0", head)


# --------------------------------------------------------------------------- the cluster sweep


def _requested(spec) -> dict[str, list[dict[str, float]]]:
    """What one unit of each kind of work asks Ray for (custom resources, GPUs)."""
    train = dict(spec.train.resources_per_worker)
    if spec.train.use_gpu:
        train["GPU"] = spec.train.gpus_per_worker
    evaluation = dict(spec.eval.resources_per_actor)
    if spec.eval.use_gpu:
        evaluation["GPU"] = 1
    annotation = dict(spec.annotation.runtime.resources_per_actor)
    return {"train": [train], "eval": [evaluation], "annotation": [annotation]}


def check_placement(spec, capacities: dict[str, dict[str, float]]) -> None:
    """Every custom resource the sweep asks for exists on some node type with enough of it."""
    for stage, requests in _requested(spec).items():
        for request in requests:
            custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU")}
            assert custom, f"{stage} asks for no custom resource: it could land on any node"
            fits = [name for name, cap in capacities.items()
                    if all(cap.get(k, 0) >= v for k, v in request.items())]
            assert fits, f"{stage} asks for {request}; no node type has it: {capacities}"


def _launcher_capacities(config: dict) -> dict[str, dict[str, float]]:
    return {name: t["resources"] for name, t in _node_types(config).items()}


def test_cluster_sweep_loads_with_the_sweep_loader():
    spec = load_sweep(SWEEP)
    assert spec.train.use_gpu and spec.eval.use_gpu
    assert spec.train.precision == "bf16" and spec.train.zero_stage == 3
    assert spec.train.resources_per_worker == {GPU_RESOURCE: 1}
    assert spec.eval.resources_per_actor == {GPU_RESOURCE: 1}
    assert spec.annotation.runtime.resources_per_actor == {CPU_RESOURCE: 1}
    # the paper's grid and hyper-parameters
    assert len(spec.datasets) == 7 and spec.levels == [1, 2, 3, 4, 5, 6] and len(spec.students) == 7
    assert spec.train_limit is None and spec.test_limit is None
    assert (spec.train.learning_rate, spec.train.epochs, spec.train.global_batch_size, spec.train.cutoff_len) == (
        5e-5, 3.0, 64, 4096)
    assert spec.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert len(spec.trials()) == 7 * 6 * 7


def test_cluster_sweep_typo_is_rejected(tmp_path):
    raw = _yaml(SWEEP)
    raw["train"]["resources_per_workers"] = raw["train"].pop("resources_per_worker")
    with pytest.raises(SpecError, match="resources_per_workers"):
        sweep_from_dict(raw, source="typo.yaml")


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_cluster_sweep_fits_launcher_node_types(path):
    spec = load_sweep(SWEEP)
    config = _yaml(path)
    capacities = _launcher_capacities(config)
    check_placement(spec, capacities)
    # training workers and eval actors land on the GPU type only, annotation on the CPU type only
    gpu_types = [n for n, c in capacities.items() if c.get(GPU_RESOURCE)]
    cpu_types = [n for n, c in capacities.items() if c.get(CPU_RESOURCE)]
    assert all(capacities[n].get("GPU", 0) >= spec.train.gpus_per_worker for n in gpu_types)
    assert all(capacities[n].get("CPU", 0) >= spec.train.cpus_per_worker for n in gpu_types)
    assert set(gpu_types).isdisjoint(cpu_types)
    # the trials allowed to run at once can get their GPUs from the GPU node type at its maximum
    gpus = sum(capacities[n]["GPU"] * _node_types(config)[n]["max_workers"] for n in gpu_types)
    assert spec.train.num_workers * spec.train.gpus_per_worker <= gpus
    assert spec.max_concurrent_trials * spec.train.num_workers * spec.train.gpus_per_worker <= gpus


def test_placement_check_catches_a_missing_resource():
    spec = load_sweep(SWEEP, {"train.resources_per_worker": {"gpu_nodes": 1}})
    with pytest.raises(AssertionError, match="gpu_nodes"):
        check_placement(spec, _launcher_capacities(_yaml(LAUNCHER[0])))
    spec = load_sweep(SWEEP, {"train.gpus_per_worker": 8.0})
    with pytest.raises(AssertionError, match="no node type"):
        check_placement(spec, _launcher_capacities(_yaml(LAUNCHER[0])))


# --------------------------------------------------------------------------- KubeRay


def validate_kuberay(manifest: dict) -> None:
    jsonschema.validate(manifest, json.loads(KUBERAY_SCHEMA.read_text()))


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def _group_resources(group: dict) -> dict[str, float]:
    """What a head/worker group advertises: rayStartParams resources (a quoted JSON string, the
    KubeRay convention) plus GPUs from the container limits and num-cpus/CPU limits."""
    params = group.get("rayStartParams", {})
    resources = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = float(limits["nvidia.com/gpu"])
    resources["CPU"] = float(params.get("num-cpus", limits.get("cpu", 0)))
    return resources


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd_schema(path):
    manifest = _yaml(path)
    validate_kuberay(manifest)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_schema_catches_a_typo(path):
    manifest = _yaml(path)
    cluster = _cluster_spec(manifest)
    cluster["workerGroupSpecs"][0]["maxReplica"] = cluster["workerGroupSpecs"][0].pop("maxReplicas")
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate_kuberay(manifest)
    manifest = _yaml(path)
    manifest["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(manifest)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_autoscaling_groups_and_resources(path):
    cluster = _cluster_spec(_yaml(path))
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1
    capacities = {name: _group_resources(g) for name, g in groups.items()}
    assert any(c.get(CPU_RESOURCE) for c in capacities.values())
    assert all(c["GPU"] >= 1 and c[GPU_RESOURCE] == c["GPU"] for c in capacities.values() if GPU_RESOURCE in c)
    check_placement(load_sweep(SWEEP), capacities)
    # the same custom resources as the launcher node types
    launcher = _launcher_capacities(_yaml(CLUSTER / "aws.yaml"))
    custom = lambda caps: sorted(  # noqa: E731
        (k, v) for c in caps.values() for k, v in c.items() if k not in ("CPU", "GPU"))
    assert custom(capacities) == custom(launcher)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_mlflow_localhost_and_shared_volume(path):
    cluster = _cluster_spec(_yaml(path))
    head = cluster["headGroupSpec"]["template"]["spec"]
    mlflow = [c for c in head["containers"] if c["name"] == "mlflow"]
    assert len(mlflow) == 1
    args = " ".join(mlflow[0].get("command", []) + mlflow[0].get("args", []))
    assert "--host 127.0.0.1" in args and "sqlite:////mnt/shared/" in args
    pods = [head] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"raydistill-shared"}
        ray_container = pod["containers"][0]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in ray_container["volumeMounts"]
        env = {e["name"]: e["value"] for e in ray_container["env"]}
        assert env["RAYDISTILL_OUTPUT_DIR"] == "/mnt/shared/outputs"


def test_rayjob_runs_the_cluster_sweep_from_the_image():
    job = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    assert "sweeps/granularity.py" in job["spec"]["entrypoint"]
    assert "cluster/sweep-cluster.yaml" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # the RayJob's cluster is the RayCluster manifest's
    assert job["spec"]["rayClusterSpec"] == _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert "COPY --chown=ray:users cluster ./cluster" in dockerfile and "[gpu]" in dockerfile
    assert "FROM rayproject/ray:2.60.0-" in dockerfile
