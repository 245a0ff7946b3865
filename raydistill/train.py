"""SFT stage: Ray Train `TorchTrainer` + DeepSpeed ZeRO on an annotations Parquet.

Each worker tokenises the cell with the student's template (loss on the response tokens only),
draws its shard of length-grouped micro-batches, and steps a DeepSpeed engine. Rank 0 saves the
final model as a plain HF folder that evaluation loads.

    raydistill train --student tiny-llama --data cell.parquet --out runs/ --set epochs=1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from raydistill.schemas import answer_problem
from raydistill.spec import SpecError, TrainSpec, parse_overrides, redact_storage, storage_problem

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "configs" / "deepspeed"


@dataclass(frozen=True)
class TrainJob:
    """Everything one fine-tuning run needs; plain data so it travels to Ray workers."""

    student: str  # registry name or local HF folder (for the template)
    model_path: str  # HF folder with the initial weights
    data_path: str  # Parquet with EXAMPLE_SCHEMA (question, rationale)
    run_name: str
    storage_path: str  # local folder or pyarrow URI (s3://bucket/prefix, gs://...) for checkpoints
    spec: dict  # TrainSpec.model_dump()


@dataclass(frozen=True)
class TrainResult:
    model_path: str  # HF folder of the fine-tuned model
    steps: int
    final_loss: float
    train_seconds: float
    examples: int
    truncated: int
    over_cutoff: int = 0
    padding_fraction: float = 0.0
    resumed_at: tuple[int, ...] = ()


class TrainInputError(ValueError):
    """A config, data file or checkpoint training cannot use; the message names it and what to do."""


# --------------------------------------------------------------------------- inputs


def load_train_spec(config: str | os.PathLike | None, overrides: dict | None = None) -> TrainSpec:
    """The `TrainSpec` of a YAML file of TrainSpec fields (or none) plus overrides."""
    import yaml
    from pydantic import ValidationError

    fields: object = {}
    if config is not None:
        try:
            fields = yaml.safe_load(Path(config).read_text()) or {}
        except FileNotFoundError:
            raise TrainInputError(f"{config}: no such file; check the path given to --config") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            reason = " ".join(str(err).split())
            raise TrainInputError(f"{config}: cannot read the train config ({reason}); "
                                  "fix it or pass another file") from None
        if not isinstance(fields, dict):
            raise TrainInputError(f"{config}: a train config is a mapping of TrainSpec fields "
                                  f"(epochs, learning_rate, ...), got {type(fields).__name__}")
    fields = {**fields, **(overrides or {})}
    try:
        return TrainSpec.model_validate(fields)
    except ValidationError as err:
        where = f"{config}: " if config is not None else ""
        problems = "; ".join(f"train.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise TrainInputError(where + problems) from None


def read_examples(path: str | os.PathLike) -> list[dict]:
    """The (question, rationale) rows of a training Parquet, checked: a file that is missing,
    not Parquet, without these text columns, empty, or with a blank row raises TrainInputError
    naming the file (and rows)."""
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise TrainInputError(f"{path}: no such training file; check --data (or the cell's "
                              "examples.parquet)") from None
    except (OSError, pa.ArrowException) as err:
        reason = " ".join(str(err).split())[:200]
        raise TrainInputError(f"{path}: not a readable Parquet file ({reason}); delete it and write it "
                              "again (raydistill data export, or rerun the annotation)") from None
    missing = [c for c in ("question", "rationale") if c not in table.column_names]
    if missing:
        raise TrainInputError(f"{path}: missing columns {missing} (has {table.column_names}); training needs "
                              "question and rationale (EXAMPLE_SCHEMA)")
    for name in ("question", "rationale"):
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise TrainInputError(f"{path}: column {name!r} has type {kind}, not string; write it as text")
    if table.num_rows == 0:
        raise TrainInputError(f"{path}: no rows to train on; check the cell's filters (policy, limits)")
    rows = table.select(["question", "rationale"]).to_pylist()
    blank = [i for i, r in enumerate(rows) if not (r["question"] or "").strip() or not (r["rationale"] or "").strip()]
    if blank:
        raise TrainInputError(f"{path}: rows {blank[:10]}{' ...' if len(blank) > 10 else ''} have an empty "
                              f"question or rationale ({len(blank)} in all); remove or fill them")
    problem = answer_problem(table)
    if problem:
        raise TrainInputError(f"{path}: {problem}")
    return rows


def check_storage(storage_path: str) -> None:
    """A storage path pyarrow cannot open (unknown scheme, no bucket, bad query option, credentials
    in the URI) raises TrainInputError naming it, before any worker starts."""
    problem = storage_problem(storage_path)
    if problem:
        raise TrainInputError(f"checkpoint storage {redact_storage(storage_path)!r}: {problem}")


def read_train_state(folder: str | os.PathLike) -> dict:
    """The train_state.json of a checkpoint folder; a missing, cut-short or incomplete file raises
    TrainInputError naming it and the folder to delete."""
    path = Path(folder) / TRAIN_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise TrainInputError(f"{path}: unreadable checkpoint state ({reason}); delete the checkpoint "
                              f"folder {Path(folder)} to resume from the one before it") from None
    if not isinstance(state, dict) or not isinstance(state.get("step", state.get("steps")), int) \
            or not isinstance(state.get("history"), list):
        raise TrainInputError(f"{path}: incomplete checkpoint state (needs step and history); delete the "
                              f"checkpoint folder {Path(folder)} to resume from the one before it")
    return state


# --------------------------------------------------------------------------- data


def tokenize_examples(rows: list[dict], tokenizer, template, cutoff_len: int,
                      overlong: str = "truncate") -> tuple[list[dict], int]:
    """Token ids with the prompt masked out of the labels.

    Sequences over `cutoff_len` are cut (`overlong="truncate"`) or left out (`"drop"`).
    Returns the examples and how many sequences were over the cutoff.
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"train.overlong must be 'truncate' or 'drop', got {overlong!r}")
    examples, over = [], 0
    for row in rows:
        prompt_ids, response_ids = template.encode(tokenizer, row["question"], row["rationale"])
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if len(input_ids) > cutoff_len:
            over += 1
            if overlong == "drop":
                continue
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        examples.append({"input_ids": input_ids, "labels": labels})
    if not examples:
        raise ValueError(f"train.cutoff_len={cutoff_len} with overlong='drop' leaves no example")
    return examples, over


def micro_batches(lengths: list[int], spec: TrainSpec, rank: int, world: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for the whole run.

    Each epoch is a seeded shuffle cut into global micro-batches of `micro_batch_size x world`
    examples, grouped by length within windows of 50 to cut padding; rank r takes every
    world-th example of each. The count is a whole number of optimizer steps, equal on every rank.
    """
    per_step = spec.micro_batch_size * world
    batches_per_epoch = max(1, len(lengths) // per_step)
    steps = max(1, round(spec.epochs * batches_per_epoch / spec.grad_accum_steps))
    needed = steps * spec.grad_accum_steps
    rng = random.Random(spec.seed)
    mine: list[list[int]] = []
    while len(mine) < needed:
        order = rng.sample(range(len(lengths)), len(lengths))
        order = (order * math.ceil(per_step / len(order)))[: max(1, len(order) // per_step) * per_step]
        groups = (_length_grouped(order, lengths, per_step, rng) if group_by_length
                  else [order[i:i + per_step] for i in range(0, len(order), per_step)])
        mine += [group[rank::world] for group in groups]
    return mine[:needed]


def _length_grouped(order: list[int], lengths: list[int], size: int, rng: random.Random,
                    window_batches: int = 50) -> list[list[int]]:
    groups = []
    for start in range(0, len(order), size * window_batches):
        window = sorted(order[start:start + size * window_batches], key=lengths.__getitem__)
        groups += [window[i:i + size] for i in range(0, len(window), size)]
    rng.shuffle(groups)
    return groups


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the token slots in padded micro-batches that hold padding."""
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0


def collate(examples: list[dict], indices: list[int], pad_id: int):
    import torch

    width = max(len(examples[i]["input_ids"]) for i in indices)
    ids, labels, mask = [], [], []
    for i in indices:
        seq, lab = examples[i]["input_ids"], examples[i]["labels"]
        pad = width - len(seq)
        ids.append(seq + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        mask.append([1] * len(seq) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def checkpoint_steps(spec: TrainSpec, total_steps: int) -> set[int]:
    """Optimizer steps after which a resumable checkpoint is written (the last step excluded:
    the final model is reported then)."""
    steps = {round(total_steps * k / spec.epochs) for k in range(1, math.ceil(spec.epochs) + 1)}
    if spec.checkpoint_every_steps:
        steps |= set(range(spec.checkpoint_every_steps, total_steps + 1, spec.checkpoint_every_steps))
    return {s for s in steps if 0 < s < total_steps}


# --------------------------------------------------------------------------- DeepSpeed


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


def _cosine_schedule(spec: TrainSpec, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return lambda optimizer: get_cosine_schedule_with_warmup(optimizer, spec.warmup_steps, total_steps)


def _save_hf_folder(engine, tokenizer, zero_stage: int, out_dir: Path, rank: int) -> None:
    """Write the full model (gathered from ZeRO-3 shards if needed) as an HF folder on rank 0."""
    import deepspeed

    model = engine.module
    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else _nullcontext()
    with gather:
        if rank == 0:
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- checkpoints


def _save_resume_checkpoint(engine, state: dict, rank: int) -> None:
    """Every rank saves its DeepSpeed shard (model, optimizer, scheduler) into one Ray checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if rank == 0:
            (Path(tmp) / TRAIN_STATE_FILE).write_text(json.dumps(state))
        metrics = {"train_loss": state["history"][-1]["loss"], "step": state["step"]}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{state['step']:07d}")


def _restore(engine) -> dict | None:
    """Load the latest Ray checkpoint into `engine`; returns its train state (None on a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        state = read_train_state(path)
        if not state.get("final"):
            load_path, _ = engine.load_checkpoint(str(Path(path) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
            if load_path is None:
                raise RuntimeError(f"checkpoint {path} holds no DeepSpeed state to resume from")
    return state


def _write_worker_info(job: TrainJob, rank: int, attempt_step: int) -> None:
    """Record this worker's host, PID and first step under <storage>/<run>/workers/, for operators."""
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(job.storage_path)
    folder = f"{base}/{job.run_name}/workers"
    fs.create_dir(folder)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start_step": attempt_step}
    with fs.open_output_stream(f"{folder}/rank{rank}.json") as out:
        out.write(json.dumps(info).encode())


def _local_model_folder(checkpoint, download_to: str | os.PathLike | None) -> str:
    """The final checkpoint as a local folder: the checkpoint itself on local storage; from object
    storage, a copy downloaded once into `download_to` (default: the cache) under the checkpoint's
    name. Checkpoint folders never change, so an existing complete copy is reused."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    from raydistill.students import default_cache_dir

    if download_to:
        target = Path(download_to) / Path(checkpoint.path).name
    else:  # mirrors bucket/prefix/run/checkpoint under <cache>/checkpoints/<s3|gcs|...>/
        target = default_cache_dir() / "checkpoints" / checkpoint.filesystem.type_name / checkpoint.path
    if not (target / TRAIN_STATE_FILE).exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        checkpoint.to_directory(str(partial))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return str(target)


# --------------------------------------------------------------------------- worker loop


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
    return _maybe_lora(model, spec)


def attention_of(job: TrainJob, spec: TrainSpec) -> str | None:
    """`TrainSpec.attn_implementation`, ``auto`` resolved by the student's family."""
    from raydistill.students import get_student

    return get_student(job.student).attention if spec.attn_implementation == "auto" else spec.attn_implementation


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; resumes from `ray.train.get_checkpoint()` after a failure."""
    job = TrainJob(**config["job"])
    spec = TrainSpec.model_validate(job.spec)
    if not spec.use_gpu:
        stay_on_cpu()
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from raydistill.students import get_student

    check_precision(spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.seed)

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    template = get_student(job.student).prompt_template
    template.fix_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = read_examples(job.data_path)
    examples, over = tokenize_examples(rows, tokenizer, template, spec.cutoff_len, spec.overlong)
    lengths = [len(e["input_ids"]) for e in examples]
    if spec.use_gpu:  # before any weight is loaded: the GPU this worker got
        import ray.train.torch

        capacity = torch.cuda.get_device_properties(ray.train.torch.get_device()).total_memory
        problem = memory_problem(job, spec, max(lengths), capacity, world)
        if problem:
            raise TrainInputError(problem)
    batches = micro_batches(lengths, spec, rank, world)
    total_steps = len(batches) // spec.grad_accum_steps
    save_at = checkpoint_steps(spec, total_steps)

    ds_config = deepspeed_config(spec)
    model = load_student_model(job, spec)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=_cosine_schedule(spec, total_steps),
    )
    if world == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False  # one rank: averaging over ranks would only copy every gradient

    state = _restore(engine) or {"step": 0, "history": [], "resumed_at": []}
    if state.get("final"):  # the run had finished; its model is already the latest checkpoint
        _shutdown(engine, dist)
        return
    if state["step"]:
        state["resumed_at"].append(state["step"])
    if rank == 0:
        print(f"[raydistill.train] {len(examples)} examples, {over} over cutoff_len={spec.cutoff_len} "
              f"({spec.overlong}), {total_steps} steps, starting at step {state['step']}", flush=True)
    _write_worker_info(job, rank, state["step"])

    window_loss, window_tokens, started = 0.0, 0, time.perf_counter()
    for micro_step in range(state["step"] * spec.grad_accum_steps + 1, len(batches) + 1):
        batch = {k: v.to(engine.device) for k, v in collate(examples, batches[micro_step - 1], pad_id).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        window_loss += loss.item() / spec.grad_accum_steps
        window_tokens += int(batch["attention_mask"].sum())
        if micro_step % spec.grad_accum_steps:
            continue
        step = micro_step // spec.grad_accum_steps
        elapsed, started = time.perf_counter() - started, time.perf_counter()  # includes the last report
        state["step"] = step
        state["history"].append({"step": step, "loss": window_loss, "lr": engine.get_lr()[0],
                                 "tokens_per_s": window_tokens * world / max(elapsed, 1e-9),
                                 "step_seconds": elapsed})
        if step in save_at:  # metrics go out with checkpoints only: a report syncs all workers
            _save_resume_checkpoint(engine, state, rank)
        window_loss, window_tokens = 0.0, 0

    state.update(final=True, examples=len(examples), over_cutoff=over, overlong=spec.overlong,
                 truncated=over if spec.overlong == "truncate" else 0,
                 padding_fraction=padding_fraction(batches, lengths), steps=total_steps, world_size=world,
                 deepspeed=_deepspeed_setup(engine), precision=spec.precision,
                 gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                 attn_implementation=model.config._attn_implementation)
    _report_final_model(engine, tokenizer, spec, job, state, rank, ds_config["zero_optimization"]["stage"])
    _shutdown(engine, dist)


def _deepspeed_setup(engine) -> dict:
    """What DeepSpeed ran with: the ZeRO stage, where optimizer state and parameters lived, and whether
    the engine all-reduced gradients itself (off for ZeRO stage 0 on one worker)."""

    def device(offload) -> str:
        return "none" if offload is None else str(getattr(offload.device, "value", offload.device))

    from deepspeed.accelerator import get_accelerator

    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the base optimizer
    return {"zero_stage": engine.zero_optimization_stage(),
            "offload_optimizer": device(engine.zero_offload_optimizer()),
            "offload_param": device(engine.zero_offload_param()),
            "gradient_allreduce": engine.enable_backward_allreduce,
            "accelerator": get_accelerator().device_name(),
            "optimizer": type(optimizer).__name__}


def _report_final_model(engine, tokenizer, spec: TrainSpec, job: TrainJob, state: dict, rank: int,
                        zero_stage: int) -> None:
    """Report the fine-tuned model as a plain HF folder (LoRA merged) with the train state."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        _save_hf_folder(engine, tokenizer, zero_stage, out, rank)
        checkpoint = None
        if rank == 0:
            model_dir = _merge_lora_if_needed(out, spec, job.model_path)
            (model_dir / TRAIN_STATE_FILE).write_text(json.dumps(state))
            checkpoint = ray.train.Checkpoint.from_directory(str(model_dir))
        ray.train.report({"train_loss": state["history"][-1]["loss"], "step": state["steps"]},
                         checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step{state['steps']:07d}_final")


def _shutdown(engine, dist) -> None:
    engine.destroy()
    if dist.is_initialized():
        dist.barrier()


def _maybe_lora(model, spec: TrainSpec):
    if spec.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _merge_lora_if_needed(out: Path, spec: TrainSpec, base_path: str) -> Path:
    """With LoRA, `out` holds an adapter; merge it into the base so evaluation loads a plain folder."""
    if spec.lora is None or not spec.lora.merge_on_save:
        return out
    from peft import AutoPeftModelForCausalLM

    merged = out.parent / "merged"
    model = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    model.save_pretrained(merged)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(merged)
    return merged


# --------------------------------------------------------------------------- driver


def lora_parameters(config, lora) -> int:
    """Trainable weights of a LoRA adapter on every linear layer of the decoder (peft's "all-linear";
    an upper bound for a narrower ``target_modules``): r x (inputs + outputs) per matrix."""
    from raydistill.memory import Shape

    shape = Shape.of(config)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = (shape.hidden + q) + 2 * (shape.hidden + kv) + (q + shape.hidden)
    mlp = (3 if shape.gated else 2) * (shape.hidden + shape.intermediate)
    return lora.r * shape.layers * (attention + mlp)


def memory_problem(job: TrainJob, spec: TrainSpec, longest: int, capacity_bytes: int, world: int) -> str | None:
    """One line saying why the run cannot fit ``capacity_bytes`` per GPU and which micro-batch would
    (`raydistill.memory`), for micro_batch_size x the cell's ``longest`` sequence; None if it fits."""
    from transformers import AutoConfig

    from raydistill import memory

    config = AutoConfig.from_pretrained(job.model_path)
    zero = deepspeed_config(spec)["zero_optimization"]
    offloaded = {k: (zero.get(k) or {}).get("device", "none") not in ("none", None)
                 for k in ("offload_optimizer", "offload_param")}
    args = dict(seq_len=longest, precision=spec.precision, zero_stage=zero["stage"], world_size=world,
                gradient_checkpointing=bool(spec.gradient_checkpointing),
                attn_implementation=attention_of(job, spec) or "sdpa",
                trainable_parameters=lora_parameters(config, spec.lora) if spec.lora else None, **offloaded)
    estimate = memory.estimate_training_memory(config, micro_batch_size=spec.micro_batch_size, **args)
    if estimate.total() <= capacity_bytes:
        return None
    args.pop("world_size")
    suggestion = memory.largest_micro_batch(config, capacity_bytes=capacity_bytes,
                                            global_batch_size=spec.global_batch_size, world_size=world, **args)
    what = (f"train {job.student}: micro_batch_size {spec.micro_batch_size} x {longest} tokens, ZeRO-{zero['stage']}, "
            f"{spec.precision}, gradient_checkpointing {bool(spec.gradient_checkpointing)}")
    return memory.fits_message(estimate, capacity_bytes, suggestion, what)


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


def fit(job: TrainJob, report_to_tune: bool = False, download_to: str | os.PathLike | None = None) -> TrainResult:
    """Run one fine-tuning job on the current Ray cluster and return where the model landed: a local
    HF folder (the final checkpoint, or with URI storage its copy under `download_to`)."""
    read_examples(job.data_path)  # a bad file fails here, in one line, before any worker starts
    if "://" not in job.storage_path:  # workers resolve paths from their own working directory
        job = replace(job, storage_path=os.path.abspath(job.storage_path))
    check_storage(job.storage_path)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = TrainSpec.model_validate(job.spec)
    check_memory_on_driver(job, spec)
    if precision_warning(spec):
        log.warning(precision_warning(spec))
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": spec.cpus_per_worker, **spec.resources_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": asdict(job)},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=job.run_name, storage_path=job.storage_path, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # a worker's input error is the user's to fix: its own line
        inputs = [e for e in getattr(err, "worker_failures", {}).values() if isinstance(e, TrainInputError)]
        if inputs:
            raise TrainInputError(str(inputs[0])) from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.run_name} finished without a checkpoint")
    model_path = _local_model_folder(result.checkpoint, download_to)
    state = read_train_state(model_path)
    return TrainResult(model_path=model_path, steps=state["steps"], final_loss=state["history"][-1]["loss"],
                       train_seconds=time.perf_counter() - started, examples=state["examples"],
                       truncated=state["truncated"], over_cutoff=state["over_cutoff"],
                       padding_fraction=state["padding_fraction"], resumed_at=tuple(state["resumed_at"]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="registry name or local HF folder")
    parser.add_argument("--data", required=True, help="Parquet with question and rationale columns")
    parser.add_argument("--out", default="outputs/train",
                        help="storage for checkpoints: a local folder or a URI such as s3://bucket/runs or "
                             "gs://bucket/runs (credentials from the environment, as for pyarrow)")
    parser.add_argument("--download-to", help="with URI storage, the local folder the final model is copied to "
                                              "(default: checkpoints/ in the model cache, $RAYDISTILL_CACHE_DIR "
                                              "or ~/.cache/raydistill/models)")
    parser.add_argument("--name", default="sft", help="run name under --out")
    parser.add_argument("--config", help="YAML of TrainSpec fields (e.g. zero_stage, lora, deepspeed_config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainSpec field, e.g. --set epochs=1 --set zero_stage=2")
    args = parser.parse_args(argv)

    import ray

    from raydistill.students import StudentError, resolve_student

    storage = args.out if "://" in args.out else str(Path(args.out).resolve())
    try:
        spec = load_train_spec(args.config, parse_overrides(args.set))
        read_examples(args.data)
        check_storage(storage)
        model_path = resolve_student(args.student)
        job = TrainJob(student=args.student, model_path=str(model_path),
                       data_path=str(Path(args.data).resolve()), run_name=args.name,
                       storage_path=storage, spec=spec.model_dump())
        check_memory_on_driver(job, spec)
    except (TrainInputError, StudentError, SpecError) as err:
        parser.error(str(err))
    ray.init(ignore_reinit_error=True)
    result = fit(job, download_to=args.download_to)
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(os.sys.argv[1:]))
