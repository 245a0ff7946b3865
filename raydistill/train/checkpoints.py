"""Checkpoints: when they are written, the resumable DeepSpeed state every rank saves into a Ray
checkpoint and loads back after a failure, the train state next to it, the final HF folder, and the
final checkpoint as a local folder on the driver."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

from raydistill.records import RecordError, TrainState, UnreadableRecord
from raydistill.spec import TrainSpec
from raydistill.train.job import TrainInputError, TrainJob

TRAIN_STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def read_train_state(folder: str | os.PathLike) -> TrainState:
    """The train_state.json of a checkpoint folder; a missing, cut-short or incomplete file raises
    TrainInputError naming it and the folder to delete."""
    path = Path(folder) / TRAIN_STATE_FILE
    try:
        return TrainState.read(path)
    except UnreadableRecord as err:
        reason = str(err).removeprefix(f"{path}: ")[:200]
        raise TrainInputError(f"{path}: unreadable checkpoint state ({reason}); delete the checkpoint "
                              f"folder {Path(folder)} to resume from the one before it") from None
    except RecordError:
        raise TrainInputError(f"{path}: incomplete checkpoint state (needs step and history); delete the "
                              f"checkpoint folder {Path(folder)} to resume from the one before it") from None


def checkpoint_steps(spec: TrainSpec, total_steps: int) -> set[int]:
    """Optimizer steps after which a resumable checkpoint is written (the last step excluded:
    the final model is reported then)."""
    steps = {round(total_steps * k / spec.epochs) for k in range(1, math.ceil(spec.epochs) + 1)}
    if spec.checkpoint_every_steps:
        steps |= set(range(spec.checkpoint_every_steps, total_steps + 1, spec.checkpoint_every_steps))
    return {s for s in steps if 0 < s < total_steps}


def save_hf_folder(engine, tokenizer, zero_stage: int, out_dir: Path, rank: int) -> None:
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


def save_resume_checkpoint(engine, state: TrainState, rank: int, total_steps: int) -> None:
    """Every rank saves its DeepSpeed shard (model, optimizer, scheduler) into one Ray checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if rank == 0:
            state.write(Path(tmp) / TRAIN_STATE_FILE)
        metrics = {"train_loss": state.history[-1]["loss"], "step": state.step, "steps_total": total_steps}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{state.step:07d}")


def restore(engine) -> TrainState | None:
    """Load the latest Ray checkpoint into `engine`; returns its train state (None on a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        state = read_train_state(path)
        if not state.final:
            load_path, _ = engine.load_checkpoint(str(Path(path) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
            if load_path is None:
                raise RuntimeError(f"checkpoint {path} holds no DeepSpeed state to resume from")
    return state


def write_worker_info(job: TrainJob, rank: int, attempt_step: int) -> None:
    """Record this worker's host, PID and first step under <storage>/<run>/workers/, for operators."""
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(job.storage_path)
    folder = f"{base}/{job.run_name}/workers"
    fs.create_dir(folder)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start_step": attempt_step}
    with fs.open_output_stream(f"{folder}/rank{rank}.json") as out:
        out.write(json.dumps(info).encode())


def local_model_folder(checkpoint, download_to: str | os.PathLike | None) -> str:
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
