"""SFT on Ray Train + DeepSpeed with 2 CPU workers: ZeRO-2/3 (and ZeRO-3 with CPU offload), full and LoRA,
and resume after a worker is SIGKILLed mid-run, with checkpoints in a local folder or on S3."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydistill.spec import LoraSpec, TrainSpec
from raydistill.train import TRAIN_STATE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svamp_small(tmp_path_factory) -> Path:
    """The first 16 SVAMP level-1 ChatGPT rationales: a fixed small training set."""
    from raydistill.datasets import load_train

    path = tmp_path_factory.mktemp("data") / "svamp16.parquet"
    pq.write_table(load_train("svamp", "chatgpt", level=1).slice(0, 16), path)
    return path


@pytest.fixture(scope="module")
def ray_module():
    """One local 2-CPU Ray cluster for the training runs of this module (a start and stop is 10 to
    25 s here): conftest's ray_local, with the local S3 endpoint's credentials in the workers'
    environment, so that runs with checkpoints on S3 share it too."""
    import ray

    from conftest import S3_TEST_ENV

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"], **S3_TEST_ENV}})
    yield ray
    ray.shutdown()


def _job(tmp_path: Path, data: Path, name: str, **spec):
    from raydistill.students import resolve_student
    from raydistill.train import TrainJob

    base = dict(learning_rate=2e-3, epochs=4, global_batch_size=4, micro_batch_size=2, num_workers=2,
                cutoff_len=256, seed=7)
    train_spec = TrainSpec(**{**base, **spec})
    return TrainJob(student="tiny-llama", model_path=str(resolve_student("tiny-llama")), data_path=str(data),
                    run_name=name, storage_path=str(tmp_path / "ray"), spec=train_spec.model_dump(mode="json"))


def _losses(model_path: str) -> list[float]:
    from raydistill.train import read_train_state

    return [point["loss"] for point in read_train_state(model_path).history]


def _set_loss(model_path: str, data: Path) -> float:
    """Mean response-token loss of the model at `model_path` on the training rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.students import get_student
    from raydistill.train import collate, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = get_student("tiny-llama").prompt_template
    template.fix_tokenizer(tokenizer)
    examples, _ = tokenize_examples(pq.read_table(data).to_pylist(), tokenizer, template, 256)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        losses = [model(**collate(examples, [i], pad_id)).loss.item() for i in range(len(examples))]
    return sum(losses) / len(losses)


def _assert_plain_hf_folder(model_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (Path(model_path) / "adapter_config.json").exists(), "LoRA adapter was not merged"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer("Tom has 3 apples.", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("zero_stage,lora,deepspeed_config,offload,workers,checkpointing", [
    (2, None, None, "none", 2, False),
    (3, LoraSpec(r=8, alpha=16), None, "none", 2, True),
    (3, None, "zero3_offload.json", "cpu", 2, False),
    (0, None, None, "none", 1, False),
], ids=["zero2-full", "zero3-lora-checkpointing", "zero3-offload-full", "zero0-one-worker"])
def test_loss_decreases_and_model_is_a_plain_hf_folder(tmp_path, model_cache, ray_module, svamp_small, zero_stage,
                                                       lora, deepspeed_config, offload, workers, checkpointing):
    """ZeRO stage 0 on one worker runs without DeepSpeed's gradient all-reduce (nothing to average);
    the offloaded optimizer is DeepSpeed's CPU Adam; LoRA learns under gradient checkpointing."""
    from raydistill.train import fit, read_train_state

    lr, drop = (2e-3, 0.9) if lora is None else (1e-2, 0.97)  # LoRA on a random tiny model learns slowly
    job = _job(tmp_path, svamp_small, f"sft-z{zero_stage}", zero_stage=zero_stage, lora=lora, learning_rate=lr,
               deepspeed_config=deepspeed_config, num_workers=workers, gradient_checkpointing=checkpointing)
    result = fit(job)

    state = read_train_state(result.model_path)
    setup = state.deepspeed
    assert {key: setup[key] for key in ("zero_stage", "offload_optimizer", "offload_param")} == \
        {"zero_stage": zero_stage, "offload_optimizer": offload, "offload_param": offload}
    assert setup["gradient_allreduce"] is not (zero_stage == 0 and workers == 1)
    assert setup["optimizer"] == ("DeepSpeedCPUAdam" if offload == "cpu" else "AdamW")
    assert setup["accelerator"] == "cpu"
    assert (state.precision, state.gradient_checkpointing, state.attn_implementation) == \
        ("fp32", checkpointing, "sdpa")

    assert result.steps == 4 * 16 // 4
    losses = _losses(result.model_path)
    assert len(losses) == result.steps
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    before, after = _set_loss(job.model_path, svamp_small), _set_loss(result.model_path, svamp_small)
    assert after < drop * before, (before, after)
    assert result.resumed_at == ()
    # the optimizer steps' CPU seconds, every worker's (summed over ranks when there are several)
    assert 0 < state.timings["optimizer_cpu"] <= state.timings["optimizer_steps"] * workers * os.cpu_count()
    _assert_plain_hf_folder(result.model_path)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    """Where checkpoints go: a local folder, or a pyarrow URI on a local S3 endpoint."""
    return str(tmp_path / "ray") if request.param == "local" else request.getfixturevalue("s3_storage")


def test_sigkilled_worker_resumes_from_the_last_checkpoint(tmp_path, model_cache, ray_module, storage, svamp_small):
    """ZeRO-3, full fine-tuning: kill rank 1 once a checkpoint exists; the run must restore the
    DeepSpeed state from storage, finish with the planned number of steps and not redo the saved
    ones. With S3 storage the final model comes back as a local HF folder."""
    from raydistill.train import fit, read_train_state

    job = replace(_job(tmp_path, svamp_small, "sft-kill", zero_stage=3, epochs=8, checkpoint_every_steps=4,
                       max_failures=2), storage_path=storage)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_after_checkpoints, args=(storage, job.run_name, 1, killed),
                              daemon=True)
    killer.start()
    result = fit(job, download_to=tmp_path / "downloaded")
    killer.join(timeout=5)

    assert killed, "no worker was killed: the run ended before a checkpoint appeared"
    assert result.steps == 8 * 16 // 4
    assert len(result.resumed_at) == 1 and result.resumed_at[0] >= 4 and result.resumed_at[0] % 4 == 0
    steps = [point["step"] for point in read_train_state(result.model_path).history]
    assert steps == list(range(1, result.steps + 1))
    restarted = _read_json(storage, f"{job.run_name}/workers/rank1.json")
    assert restarted["pid"] != killed[0] and restarted["start_step"] == result.resumed_at[0]
    _assert_plain_hf_folder(result.model_path)
    if storage.startswith("s3://"):
        final = Path(result.model_path)
        assert final.parent == tmp_path / "downloaded" and final.name.endswith("_final")
        stored = _list(storage, job.run_name)
        assert f"{job.run_name}/{final.name}/{TRAIN_STATE_FILE}" in stored
        assert f"{job.run_name}/{final.name}/model.safetensors" in stored
        assert not (tmp_path / "ray").exists()


def _kill_rank_after_checkpoints(storage: str, run_name: str, rank: int, killed: list[int],
                                 timeout: float = 300) -> None:
    """SIGKILL `rank` once Ray's controller has registered a (non-final) checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = _read_json(storage, f"{run_name}/checkpoint_manager_snapshot.json") or {}
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and latest.endswith("_final"):
            return  # the run finished first: nothing left to interrupt
        info = _read_json(storage, f"{run_name}/workers/rank{rank}.json")
        if latest and info:
            os.kill(info["pid"], signal.SIGKILL)
            killed.append(info["pid"])
            return
        time.sleep(0.1)


@functools.lru_cache
def _filesystem(storage: str):
    """(pyarrow file system, base path) of a storage path or URI, opened once per storage."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def _read_json(storage: str, relative: str) -> dict | None:
    """A JSON file under the storage (local folder or URI); None while it is missing or half-written."""
    fs, base = _filesystem(storage)
    try:
        with fs.open_input_stream(f"{base}/{relative}") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


def _list(storage: str, relative: str) -> set[str]:
    """Paths of the files under `relative` in the storage, relative to the storage root."""
    import pyarrow.fs

    fs, base = _filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/{relative}", recursive=True))
    return {info.path[len(base) + 1:] for info in infos if info.type == pyarrow.fs.FileType.File}


def test_cpu_run_stays_on_cpu_where_deepspeed_would_pick_cuda(tmp_path, model_cache, svamp_small):
    """On a GPU machine DeepSpeed picks CUDA by itself; `DS_ACCELERATOR=cuda` in the workers'
    environment stands for that here. A run with use_gpu false must still train on CPU over gloo."""
    import ray

    from raydistill.train import fit, read_train_state

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAYDISTILL_DATA_DIR": os.environ["RAYDISTILL_DATA_DIR"],
                                       "DS_ACCELERATOR": "cuda"}})
    try:
        job = _job(tmp_path, svamp_small, "sft-cpu-on-gpu-machine", zero_stage=2, num_workers=2, epochs=1)
        result = fit(job)
    finally:
        ray.shutdown()
    state = read_train_state(result.model_path)
    assert state.deepspeed["accelerator"] == "cpu"
    assert result.steps == 16 // 4


def test_a_workers_input_error_reaches_the_caller_as_its_own_line(tmp_path, model_cache, ray_local, svamp_small):
    """A problem only a worker can see (here the damaged state of the checkpoint it resumes from)
    comes back from `fit` as that worker's TrainInputError, not inside Ray Train's failure report."""
    from raydistill.train import TrainInputError, fit

    job = _job(tmp_path, svamp_small, "sft-damaged-state", zero_stage=0, num_workers=1, epochs=1)
    first = fit(job)
    state = Path(first.model_path) / TRAIN_STATE_FILE  # the final checkpoint, where a rerun resumes
    state.write_text('{"step": 4, "hist')
    with pytest.raises(TrainInputError) as err:
        fit(job)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{state}: unreadable checkpoint state"), message
