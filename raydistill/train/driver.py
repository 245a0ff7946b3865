"""The driver side of a run: check its inputs before any worker starts, run `train_loop_per_worker`
on a Ray Train `TorchTrainer`, and return where the fine-tuned model landed."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from raydistill.records import CPU_STAGES, TrainState
from raydistill.spec import redact_storage, storage_problem
from raydistill.train.checkpoints import local_model_folder, read_train_state
from raydistill.train.data import read_examples
from raydistill.train.job import TrainInputError, TrainJob, TrainResult
from raydistill.train.memory_check import check_memory_on_driver, precision_warning
from raydistill.train.worker import train_loop_per_worker

log = logging.getLogger(__package__)  # "raydistill.train"


def check_storage(storage_path: str) -> None:
    """A storage path pyarrow cannot open (unknown scheme, no bucket, bad query option, credentials
    in the URI) raises TrainInputError naming it, before any worker starts."""
    problem = storage_problem(storage_path)
    if problem:
        raise TrainInputError(f"checkpoint storage {redact_storage(storage_path)!r}: {problem}")


def fit(job: TrainJob, progress_file: str | os.PathLike | None = None,
        download_to: str | os.PathLike | None = None) -> TrainResult:
    """Run one fine-tuning job on the current Ray cluster and return where the model landed: a local
    HF folder (the final checkpoint, or with URI storage its copy under `download_to`).

    ``progress_file``: a file on this node that each checkpoint's step and loss are appended to as
    they are reported (`progress_callback`), for a caller that follows the run while `fit` waits."""
    read_examples(job.data_path)  # a bad file fails here, in one line, before any worker starts
    if "://" not in job.storage_path:  # workers resolve paths from their own working directory
        job = replace(job, storage_path=os.path.abspath(job.storage_path))
    check_storage(job.storage_path)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = job.spec
    check_memory_on_driver(job, spec)
    if precision_warning(spec):
        log.warning(precision_warning(spec))
    callbacks = [progress_callback(progress_file)] if progress_file else []
    resources = {"CPU": spec.cpus_per_worker, **spec.resources_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=job.run_name, storage_path=job.storage_path, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started, started_at = time.perf_counter(), time.time()
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # a worker's input error is the user's to fix: its own line
        inputs = [e for e in getattr(err, "worker_failures", {}).values() if isinstance(e, TrainInputError)]
        if inputs:
            raise TrainInputError(str(inputs[0])) from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.run_name} finished without a checkpoint")
    model_path = local_model_folder(result.checkpoint, download_to)
    state = read_train_state(model_path)
    train_seconds = time.perf_counter() - started
    return TrainResult(model_path=model_path, steps=state.steps, final_loss=state.history[-1]["loss"],
                       train_seconds=train_seconds, examples=state.examples,
                       truncated=state.truncated, over_cutoff=state.over_cutoff,
                       padding_fraction=state.padding_fraction, resumed_at=tuple(state.resumed_at),
                       timings=train_timings(state, started_at, train_seconds))


def progress_callback(path: str | os.PathLike):
    """A Ray Train callback (it runs in the run's controller, which Ray Train places on the node of
    the process that called `fit`) appending rank 0's metrics of each report (step, steps_total,
    train_loss) to ``path`` as a JSON line."""
    import json

    from ray.train import UserCallback

    class ProgressFile(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as out:
                out.write(json.dumps(metrics[0]) + "\n")

    return ProgressFile()


def train_timings(state: TrainState, started_at: float, train_seconds: float) -> dict[str, float]:
    """This run's time by stage (`raydistill.records.TIME_STAGES`): rank 0's own, the wait before its
    loop started (`train_start`) and the rest of `train_seconds` (`train_end`). A model an earlier
    run had finished (its loop started before this one) is all `train_end`."""
    if state.loop_started_at is None or state.loop_started_at < started_at:
        return {"train_end": train_seconds}
    timings = {"train_start": state.loop_started_at - started_at, **state.timings}
    timings["train_end"] = max(0.0, train_seconds - sum(v for k, v in timings.items() if k not in CPU_STAGES))
    return timings
