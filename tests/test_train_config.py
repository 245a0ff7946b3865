"""SFT configuration without a cluster: DeepSpeed config files, checkpoint steps, overlong policy."""

import json
import re

import pytest

from raydistill.spec import TrainSpec
from raydistill.train import (DEEPSPEED_CONFIG_DIR, checkpoint_steps, deepspeed_config, load_train_spec,
                              precision_warning, tokenize_examples)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_shipped_deepspeed_files_fill_their_auto_values(name, stage):
    spec = TrainSpec(deepspeed_config=name, micro_batch_size=2, global_batch_size=8, learning_rate=1e-4,
                     precision="bf16", zero_stage=2)
    config = deepspeed_config(spec)
    assert config["zero_optimization"]["stage"] == stage  # an explicit file keeps its own stage
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["optimizer"]["params"]["lr"] == 1e-4
    # The offloaded optimizer steps on CPU: DeepSpeed's vectorised CPU Adam, not torch's AdamW.
    assert config["optimizer"]["params"]["torch_adam"] is ("offload" not in name)
    assert ("offload_optimizer" in config["zero_optimization"]) is ("offload" in name)
    assert config["bf16"]["enabled"] is True


def test_precision_and_checkpointing_follow_the_device_unless_set():
    cpu, gpu = TrainSpec(), TrainSpec(use_gpu=True)
    assert (cpu.precision, cpu.gradient_checkpointing) == ("fp32", False)
    assert (gpu.precision, gpu.gradient_checkpointing) == ("bf16", True)
    assert deepspeed_config(gpu)["bf16"]["enabled"] is True and deepspeed_config(cpu)["bf16"]["enabled"] is False
    explicit = TrainSpec(use_gpu=True, precision="fp32", gradient_checkpointing=False)
    assert (explicit.precision, explicit.gradient_checkpointing) == ("fp32", False)
    # stored resolved: the dump (part of a trial's identity) names what runs, and reads back the same
    assert gpu.model_dump()["precision"] == "bf16"
    assert TrainSpec.model_validate(gpu.model_dump()) == gpu
    assert precision_warning(explicit) and "fp32" in precision_warning(explicit)
    assert precision_warning(gpu) is None and precision_warning(TrainSpec(precision="fp32")) is None


def test_attention_follows_the_student_family():
    from raydistill.train import TrainJob, attention_of

    def job(student):
        return TrainJob(student=student, model_path="unused", data_path="unused", run_name="x",
                        storage_path="unused", spec={})

    assert attention_of(job("bloom-3b"), TrainSpec()) == "eager"  # BLOOM has no SDPA path
    assert attention_of(job("llama-3.2-3b"), TrainSpec()) == "sdpa"
    assert attention_of(job("gemma-2b"), TrainSpec()) == "sdpa"
    assert attention_of(job("bloom-3b"), TrainSpec(attn_implementation="sdpa")) == "sdpa"


def test_default_file_follows_zero_stage():
    assert deepspeed_config(TrainSpec(zero_stage=3))["zero_optimization"]["stage"] == 3
    assert deepspeed_config(TrainSpec(zero_stage=1))["zero_optimization"]["stage"] == 1


def test_user_file_by_path_keeps_explicit_values(tmp_path):
    base = json.loads((DEEPSPEED_CONFIG_DIR / "zero2.json").read_text())
    base["gradient_clipping"] = 0.5
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(base))
    assert deepspeed_config(TrainSpec(deepspeed_config=str(path)))["gradient_clipping"] == 0.5


def test_missing_or_unfillable_file_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.deepspeed_config"):
        deepspeed_config(TrainSpec(deepspeed_config="nope.json"))
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match="train.deepspeed_config.*reduce_bucket_size"):
        deepspeed_config(TrainSpec(deepspeed_config=str(path)))


def test_checkpoint_steps_cover_the_interval_and_epoch_ends_but_not_the_last_step():
    assert checkpoint_steps(TrainSpec(epochs=2, checkpoint_every_steps=3), 10) == {3, 5, 6, 9}
    assert checkpoint_steps(TrainSpec(epochs=1), 10) == set()


@pytest.mark.parametrize("overlong,kept", [("truncate", 3), ("drop", 2)])
def test_overlong_sequences_are_counted_and_truncated_or_dropped(model_cache, overlong, kept):
    from transformers import AutoTokenizer

    from raydistill.students import get_student, resolve_student

    tokenizer = AutoTokenizer.from_pretrained(resolve_student("tiny-llama"))
    template = get_student("tiny-llama").prompt_template
    template.fix_tokenizer(tokenizer)
    rows = [{"question": "1+1?", "rationale": "2"}, {"question": "2+2?", "rationale": "4"},
            {"question": "long " * 200, "rationale": "answer " * 200}]
    examples, over = tokenize_examples(rows, tokenizer, template, cutoff_len=64, overlong=overlong)
    assert over == 1
    assert len(examples) == kept
    assert all(len(e["input_ids"]) <= 64 for e in examples)


def test_cli_config_errors_name_the_field(tmp_path, capsys):
    from raydistill.train import main

    config = tmp_path / "train.yaml"
    config.write_text("zero_stage: 2\nlearning_rate: -1\n")
    with pytest.raises(SystemExit):
        main(["--student", "tiny-llama", "--data", "x.parquet", "--config", str(config)])
    assert "train.learning_rate" in capsys.readouterr().err


def test_train_cli_refuses_a_gpu_config_that_cannot_fit_and_suggests_a_micro_batch(tmp_path, model_cache):
    """`train.gpu_memory_gb` checks the estimate (raydistill.memory) at the cell's longest sequence on
    the driver: one line, exit 2, no worker started; the suggested micro-batch passes the same check."""
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    from raydistill.datasets import load_train
    from raydistill.students import resolve_student
    from raydistill.train import TrainJob, longest_sequence, memory_problem

    data = tmp_path / "math32.parquet"
    pq.write_table(load_train("math", "chatgpt", level=1).slice(0, 32), data)
    sets = ["use_gpu=true", "gpu_memory_gb=1.1", "micro_batch_size=8", "global_batch_size=64", "zero_stage=0",
            "gradient_checkpointing=false"]
    cli = Path(sys.executable).with_name("raydistill")
    out = subprocess.run([str(cli), "train", "--student", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "o"),
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "needs about" in line and "but the GPU has 1.1 GiB" in line, line
    suggested = int(re.search(r"set train.micro_batch_size: (\d+)", line).group(1))
    assert 1 <= suggested < 8 and 64 % suggested == 0
    assert not (tmp_path / "o").exists()  # nothing started

    spec = load_train_spec(None, {"use_gpu": True, "micro_batch_size": suggested, "global_batch_size": 64,
                                  "zero_stage": 0, "gradient_checkpointing": False})
    job = TrainJob(student="tiny-llama", model_path=str(resolve_student("tiny-llama")), data_path=str(data),
                   run_name="x", storage_path=str(tmp_path), spec=spec.model_dump())
    capacity = int(1.1 * 2**30)
    assert memory_problem(job, spec, longest_sequence(job, spec), capacity, 1) is None
    assert memory_problem(job, spec.model_copy(update={"micro_batch_size": suggested * 2}),
                          longest_sequence(job, spec), capacity, 1) is not None
