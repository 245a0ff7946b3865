"""The student model on a worker: the device and precision checks, the initial weights with the
family's attention implementation, and LoRA (wrapped for training, merged into the base on save)."""

from __future__ import annotations

import os
from pathlib import Path

from raydistill.spec import TrainSpec
from raydistill.train.job import TrainInputError, TrainJob


def stay_on_cpu() -> None:
    """Keep a CPU run on CPU on a machine with GPUs: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for
    workers without GPUs, and DeepSpeed would pick CUDA by itself while Ray set up gloo."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":  # DeepSpeed was imported before with another choice
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def check_precision(spec: TrainSpec) -> None:
    """bf16 on a GPU without bf16 (before Ampere) fails here in one line rather than deep in DeepSpeed."""
    import torch

    if spec.use_gpu and spec.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainInputError(f"train.precision bf16: {torch.cuda.get_device_name()} has no bf16; "
                              "set train.precision: fp32 (twice the memory) or use an Ampere or newer GPU")


def load_student_model(job: TrainJob, spec: TrainSpec):
    """The initial weights in the run's precision, with the attention implementation of the
    student's family (`TrainSpec.attn_implementation`) and gradient checkpointing if asked."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=dtype,
                                                 attn_implementation=attention_of(job, spec))
    if spec.gradient_checkpointing:
        model.config.use_cache = False
        # Non-reentrant checkpointing also passes gradients to LoRA weights of a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return maybe_lora(model, spec)


def attention_of(job: TrainJob, spec: TrainSpec) -> str | None:
    """`TrainSpec.attn_implementation`, ``auto`` resolved by the student's family."""
    from raydistill.students import get_student

    return get_student(job.student).attention if spec.attn_implementation == "auto" else spec.attn_implementation


def maybe_lora(model, spec: TrainSpec):
    if spec.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora_if_needed(out: Path, spec: TrainSpec, base_path: str) -> Path:
    """With LoRA, `out` holds an adapter; merge it into the base so evaluation loads a plain folder."""
    if spec.lora is None or not spec.lora.merge_on_save:
        return out
    from raydistill.students import merge_lora

    merged = out.parent / "merged"
    merge_lora(out, merged)
    return merged
