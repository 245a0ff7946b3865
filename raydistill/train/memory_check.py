"""Whether a run fits its GPUs (`raydistill.memory` at the cell's longest sequence): checked on the
driver with ``train.gpu_memory_gb`` and on each GPU worker before weights load; and the fp32 warning."""

from __future__ import annotations

from raydistill.spec import TrainSpec
from raydistill.train.data import read_examples, tokenize_examples
from raydistill.train.ds_config import deepspeed_config
from raydistill.train.job import TrainInputError, TrainJob
from raydistill.train.model import attention_of


def lora_parameters(config, lora) -> int:
    """Trainable weights of a LoRA adapter on every linear layer of the decoder (peft's "all-linear";
    an upper bound for a narrower ``target_modules``): r x (inputs + outputs) per matrix."""
    from raydistill.memory import Shape

    shape = Shape.of(config)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = (shape.hidden + q) + 2 * (shape.hidden + kv) + (q + shape.hidden)
    mlp = (3 if shape.gated else 2) * (shape.hidden + shape.intermediate)
    return lora.r * shape.layers * (attention + mlp)


def estimate_args(job: TrainJob, spec: TrainSpec, longest: int, config=None) -> tuple[object, dict]:
    """The student's config and the `raydistill.memory.estimate_training_memory` arguments of the run
    at the cell's ``longest`` sequence, all but micro_batch_size and world_size: its ZeRO stage (and
    offload) from its DeepSpeed config, precision, checkpointing, attention, LoRA."""
    from transformers import AutoConfig

    config = config if config is not None else AutoConfig.from_pretrained(job.model_path)
    zero = deepspeed_config(spec)["zero_optimization"]
    offloaded = {k: (zero.get(k) or {}).get("device", "none") not in ("none", None)
                 for k in ("offload_optimizer", "offload_param")}
    return config, dict(seq_len=longest, precision=spec.precision, zero_stage=zero["stage"],
                        gradient_checkpointing=bool(spec.gradient_checkpointing),
                        attn_implementation=attention_of(job, spec) or "sdpa",
                        trainable_parameters=lora_parameters(config, spec.lora) if spec.lora else None, **offloaded)


def describe_run(job: TrainJob, spec: TrainSpec, longest: int) -> str:
    """"train bloom-3b: micro_batch_size 4 x 1834 tokens, ZeRO-3, bf16, gradient_checkpointing True"."""
    stage = deepspeed_config(spec)["zero_optimization"]["stage"]
    return (f"train {job.student}: micro_batch_size {spec.micro_batch_size} x {longest} tokens, ZeRO-{stage}, "
            f"{spec.precision}, gradient_checkpointing {bool(spec.gradient_checkpointing)}")


def memory_problem(job: TrainJob, spec: TrainSpec, longest: int, capacity_bytes: int, world: int) -> str | None:
    """One line saying why the run cannot fit ``capacity_bytes`` per GPU and which micro-batch would
    (`raydistill.memory`), for micro_batch_size x the cell's ``longest`` sequence; None if it fits."""
    from raydistill import memory

    config, args = estimate_args(job, spec, longest)
    estimate = memory.estimate_training_memory(config, micro_batch_size=spec.micro_batch_size, world_size=world,
                                               **args)
    if estimate.total() <= capacity_bytes:
        return None
    suggestion = memory.largest_micro_batch(config, capacity_bytes=capacity_bytes,
                                            global_batch_size=spec.global_batch_size, world_size=world, **args)
    return memory.fits_message(estimate, capacity_bytes, suggestion, describe_run(job, spec, longest))


def longest_sequence(job: TrainJob, spec: TrainSpec) -> int:
    """The longest tokenized training sequence of the job's data, at most ``cutoff_len``."""
    from transformers import AutoTokenizer

    from raydistill.students import get_student

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    template = get_student(job.student).prompt_template
    template.fix_tokenizer(tokenizer)
    examples, _ = tokenize_examples(read_examples(job.data_path), tokenizer, template, spec.cutoff_len, spec.overlong)
    return max(len(e["input_ids"]) for e in examples)


def check_memory_on_driver(job: TrainJob, spec: TrainSpec) -> None:
    """With ``train.gpu_memory_gb``, refuse before any worker starts a run that cannot fit that GPU."""
    if spec.use_gpu and spec.gpu_memory_gb:
        problem = memory_problem(job, spec, longest_sequence(job, spec), int(spec.gpu_memory_gb * 2**30),
                                 spec.num_workers)
        if problem:
            raise TrainInputError(problem)


def precision_warning(spec: TrainSpec) -> str | None:
    """Why fp32 training on GPUs deserves a second look (None when it does not apply)."""
    if spec.use_gpu and spec.precision == "fp32":
        return ("train.precision fp32 on GPUs: about twice the memory and time of bf16, while evaluation runs "
                "bf16; drop train.precision (bf16 on GPUs) unless the GPU has no bf16")
    return None
