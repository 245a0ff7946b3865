"""Training configuration: `TrainSpec` (with `LoraSpec`) and the loader of the YAML `raydistill train` reads.

Defaults are the paper's (LLaMA-Factory SFT: full fine-tuning, lr 5e-5, 3 epochs, cosine, no
warm-up, global batch 64, cutoff 4096, grad-norm 1.0, seed 100, DeepSpeed ZeRO-3). A CPU demo
overrides a few of them in its YAML.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationError, model_serializer, model_validator

from raydistill.spec.base import SpecError, Strict, apply_overrides, describe_validation, read_config


class LoraSpec(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the student family's default
    merge_on_save: bool = True


class TrainSpec(Strict):
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float = Field(3.0, gt=0)
    global_batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    cutoff_len: int = Field(4096, ge=8)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 100
    zero_stage: Literal[0, 1, 2, 3] = 3
    # None: bf16 with use_gpu (checked on the GPU, which must support it), fp32 on CPU.
    precision: Literal["fp32", "bf16"] | None = None
    # Recompute each layer's activations in the backward pass (None: on with use_gpu, off on CPU).
    gradient_checkpointing: bool | None = None
    # auto: the student family's choice (students.FAMILY_ATTENTION: eager for BLOOM, which has no
    # SDPA path; sdpa for Llama and Gemma), else transformers' default.
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    # Memory of each training GPU in GiB, as torch reports it (an L40S 48 GB: about 44.4; an A100
    # 40 GB: about 39.4): a sweep checks every trial against it at its start, before any GPU node is
    # asked for, whenever it is set (also for a run on CPU); `raydistill train` checks it on the
    # driver with use_gpu (raydistill.memory, docs/cluster.md "Does every trial fit?"). None: checked
    # only on each GPU worker, against the GPU it got, once the node is up.
    gpu_memory_gb: float | None = Field(None, gt=0)
    # A sweep trial whose estimate exceeds gpu_memory_gb: refuse it at sweep start (one line naming the
    # trial), or adjust: the largest micro_batch_size that fits, with more gradient accumulation (the
    # same global batch); the trial is identified, and runs, with the adjusted micro-batch.
    fit: Literal["refuse", "adjust"] = "refuse"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)  # with use_gpu
    # Custom Ray resources each worker needs, e.g. {gpu_node: 1} to land on a cluster's GPU nodes.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    lora: LoraSpec | None = None
    # DeepSpeed JSON: a path, or a file name in raydistill/configs/deepspeed/ (zero2.json,
    # zero3.json, zero3_offload.json); None picks zero{zero_stage}.json. "auto" values are filled
    # from this spec (batch sizes, lr, clipping, bf16).
    deepspeed_config: str | None = None
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: only at epoch ends and the end of the run
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1: unlimited
    overlong: Literal["truncate", "drop"] = "truncate"  # sequences longer than cutoff_len

    @model_validator(mode="before")
    @classmethod
    def _device_defaults(cls, fields: object) -> object:
        """precision and gradient_checkpointing left open follow use_gpu (stored resolved, so the
        trial's identity names what runs)."""
        if isinstance(fields, dict):
            gpu = bool(fields.get("use_gpu", False))
            if fields.get("precision") is None:
                fields = {**fields, "precision": "bf16" if gpu else "fp32"}
            if fields.get("gradient_checkpointing") is None:
                fields = {**fields, "gradient_checkpointing": gpu}
        return fields

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSpec:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {per_step}"
            )
        return self

    @model_serializer(mode="wrap")
    def _fit_when_set(self, handler) -> dict:
        """`fit` at its default is left out of the dump, so specs written before it existed dump
        (and hash) as before."""
        data = handler(self)
        if self.fit == "refuse":
            data.pop("fit", None)
        return data

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


def load_train_spec(config: str | os.PathLike | None, overrides: dict | None = None) -> TrainSpec:
    """The `TrainSpec` of a YAML file of TrainSpec fields (or none) plus dotted-key overrides."""
    fields = read_config(config, "train", "TrainSpec", "epochs, learning_rate, zero_stage, ...") \
        if config is not None else {}
    fields = apply_overrides(fields, overrides)
    try:
        return TrainSpec.model_validate(fields)
    except ValidationError as err:
        where = f"{config}: " if config is not None else ""
        raise SpecError(where + describe_validation(err, TrainSpec, prefix="train.")) from None
