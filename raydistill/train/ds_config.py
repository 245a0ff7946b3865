"""The run's DeepSpeed config: a JSON file shipped in ``raydistill/configs/deepspeed/`` (found through
:mod:`importlib.resources`, so an installed wheel reads it too) or the user's own, with its "auto" values
filled from the `TrainSpec`; and the learning-rate schedule handed to DeepSpeed."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from raydistill.spec import TrainSpec

DEEPSPEED_CONFIG_DIR = Path(str(resources.files("raydistill").joinpath("configs", "deepspeed")))


def deepspeed_config_path(spec: TrainSpec) -> Path:
    """The JSON file the run starts from: `spec.deepspeed_config` (a path, or a name in
    raydistill/configs/deepspeed/), else zero{2,3}.json after `spec.zero_stage`."""
    name = spec.deepspeed_config or f"zero{3 if spec.zero_stage == 3 else 2}.json"
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        path = DEEPSPEED_CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: no such file {name!r} "
                                f"(looked in the working directory and {DEEPSPEED_CONFIG_DIR})")
    return path


def deepspeed_config(spec: TrainSpec) -> dict:
    """The run's DeepSpeed config: the JSON file with its "auto" values filled from `spec`.

    Without an explicit file, `spec.zero_stage` sets the ZeRO stage (0 and 1 start from zero2.json).
    """
    path = deepspeed_config_path(spec)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"train.deepspeed_config: {path} is not valid JSON: {err}") from None
    auto = {
        ("train_micro_batch_size_per_gpu",): spec.micro_batch_size,
        ("gradient_accumulation_steps",): spec.grad_accum_steps,
        ("gradient_clipping",): spec.max_grad_norm,
        ("optimizer", "params", "lr"): spec.learning_rate,
        ("bf16", "enabled"): spec.precision == "bf16",
    }
    for keys, value in auto.items():
        node = config
        for key in keys[:-1]:
            node = node.get(key, {})
        if node.get(keys[-1], "auto") == "auto":
            node[keys[-1]] = value
    if spec.deepspeed_config is None:
        config.setdefault("zero_optimization", {})["stage"] = spec.zero_stage
    leftover = [k for k, v in _flatten(config) if v == "auto"]
    if leftover:
        raise ValueError(f"train.deepspeed_config: {path} has 'auto' values raydistill cannot fill: {leftover}")
    return config


def _flatten(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cosine_schedule(spec: TrainSpec, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return lambda optimizer: get_cosine_schedule_with_warmup(optimizer, spec.warmup_steps, total_steps)
