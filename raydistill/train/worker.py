"""The loop every Ray Train worker runs (importable at module level: Ray pickles it by reference).

Each worker tokenises the cell with the student's template (loss on the response tokens only),
draws its shard of length-grouped micro-batches, and steps a DeepSpeed engine. Rank 0 saves the
final model as a plain HF folder that evaluation loads.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from raydistill.records import TrainState
from raydistill.spec import TrainSpec
from raydistill.students import StudentError, require_model_folder
from raydistill.timing import Stopwatch
from raydistill.train.checkpoints import (
    TRAIN_STATE_FILE,
    checkpoint_steps,
    restore,
    save_hf_folder,
    save_resume_checkpoint,
    write_worker_info,
)
from raydistill.train.data import collate, micro_batches, padding_fraction, read_examples, tokenize_examples
from raydistill.train.ds_config import cosine_schedule, deepspeed_config
from raydistill.train.job import TrainInputError, TrainJob
from raydistill.train.memory_check import memory_problem
from raydistill.train.model import check_precision, load_student_model, merge_lora_if_needed, stay_on_cpu


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; resumes from `ray.train.get_checkpoint()` after a failure."""
    job: TrainJob = config["job"]
    spec = job.spec
    try:
        require_model_folder(job.model_path, f"train {job.student}")
    except StudentError as err:
        raise TrainInputError(str(err)) from None
    if not spec.use_gpu:
        stay_on_cpu()
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    check_precision(spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.seed)
    loop_started_at, clock = time.time(), Stopwatch()  # rank 0's breakdown goes into the train state

    with clock("train_data"):
        tokenizer, examples, over, batches = _prepare_data(job, spec, rank, world)
    total_steps = len(batches) // spec.grad_accum_steps
    save_at = checkpoint_steps(spec, total_steps)

    ds_config = deepspeed_config(spec)
    with clock("model_load"):
        model = load_student_model(job, spec)
    with clock("deepspeed_init"):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=cosine_schedule(spec, total_steps),
        )
        if world == 1 and engine.zero_optimization_stage() == 0:
            engine.enable_backward_allreduce = False  # one rank: averaging over ranks would only copy every gradient
        state = restore(engine) or TrainState(step=0, history=[])
    if state.final:  # the run had finished; its model is already the latest checkpoint
        _shutdown(engine, dist)
        return
    if state.step:
        state.resumed_at.append(state.step)
    if rank == 0:
        print(f"[raydistill.train] {len(examples)} examples, {over} over cutoff_len={spec.cutoff_len} "
              f"({spec.overlong}), {total_steps} steps, starting at step {state.step}", flush=True)
    write_worker_info(job, rank, state.step)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    window_loss, window_tokens, started, cpu_started = 0.0, 0, time.perf_counter(), time.process_time()
    for micro_step in range(state.step * spec.grad_accum_steps + 1, len(batches) + 1):
        batch = {k: v.to(engine.device) for k, v in collate(examples, batches[micro_step - 1], pad_id).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        window_loss += loss.item() / spec.grad_accum_steps
        window_tokens += int(batch["attention_mask"].sum())
        if micro_step % spec.grad_accum_steps:
            continue
        step = micro_step // spec.grad_accum_steps
        elapsed = time.perf_counter() - started
        clock.add("optimizer_steps", elapsed)
        clock.add("optimizer_cpu", time.process_time() - cpu_started)  # this process, all its threads
        state.step = step
        state.history.append({"step": step, "loss": window_loss, "lr": engine.get_lr()[0],
                                 "tokens_per_s": window_tokens * world / max(elapsed, 1e-9),
                                 "step_seconds": elapsed})
        if step in save_at:  # metrics go out with checkpoints only: a report syncs all workers
            with clock("checkpoints"):
                save_resume_checkpoint(engine, state, rank, total_steps)
        window_loss, window_tokens, started, cpu_started = 0.0, 0, time.perf_counter(), time.process_time()

    if world > 1:  # every worker's CPU seconds in the record rank 0 writes
        clock.seconds["optimizer_cpu"] = _sum_over_workers(clock.seconds["optimizer_cpu"], engine.device, dist)
    state = state.model_copy(update=dict(final=True, examples=len(examples), over_cutoff=over, overlong=spec.overlong,
                 truncated=over if spec.overlong == "truncate" else 0,
                 padding_fraction=padding_fraction(batches, [len(e["input_ids"]) for e in examples]),
                 steps=total_steps, world_size=world,
                 deepspeed=_deepspeed_setup(engine), precision=spec.precision,
                 gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                 attn_implementation=model.config._attn_implementation, loop_started_at=loop_started_at))
    _report_final_model(engine, tokenizer, spec, job, state, rank, ds_config["zero_optimization"]["stage"], clock)
    _shutdown(engine, dist)


def _prepare_data(job: TrainJob, spec: TrainSpec, rank: int, world: int):
    """The student's tokenizer, the tokenised examples, how many were over cutoff_len, and this
    rank's micro-batches; on a GPU, a model that cannot fit stops here, before any weight is loaded."""
    import torch
    from transformers import AutoTokenizer

    from raydistill.students import get_student

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    template = get_student(job.student).prompt_template
    template.fix_tokenizer(tokenizer)
    rows = read_examples(job.data_path)
    examples, over = tokenize_examples(rows, tokenizer, template, spec.cutoff_len, spec.overlong)
    lengths = [len(e["input_ids"]) for e in examples]
    if spec.use_gpu:  # before any weight is loaded: the GPU this worker got
        import ray.train.torch

        capacity = torch.cuda.get_device_properties(ray.train.torch.get_device()).total_memory
        problem = memory_problem(job, spec, max(lengths), capacity, world)
        if problem:
            raise TrainInputError(problem)
    return tokenizer, examples, over, micro_batches(lengths, spec, rank, world)


def _sum_over_workers(value: float, device, dist) -> float:
    import torch

    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


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


def _report_final_model(engine, tokenizer, spec: TrainSpec, job: TrainJob, state: TrainState, rank: int,
                        zero_stage: int, clock: Stopwatch) -> None:
    """Report the fine-tuned model as a plain HF folder (LoRA merged) with the train state, which
    carries rank 0's time breakdown of this attempt."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        with clock("final_save"):
            save_hf_folder(engine, tokenizer, zero_stage, out, rank)
            model_dir = merge_lora_if_needed(out, spec, job.model_path) if rank == 0 else None
        checkpoint = None
        if rank == 0:
            state.timings = clock.as_dict()
            state.write(model_dir / TRAIN_STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(str(model_dir))
        ray.train.report({"train_loss": state.history[-1]["loss"], "step": state.steps},
                         checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step{state.steps:07d}_final")


def _shutdown(engine, dist) -> None:
    engine.destroy()
    if dist.is_initialized():
        dist.barrier()
