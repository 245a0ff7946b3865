"""SFT configuration without a cluster: DeepSpeed config files, checkpoint steps, overlong policy."""

import json

import pytest

from raydistill.spec import TrainSpec
from raydistill.train import (DEEPSPEED_CONFIG_DIR, checkpoint_steps, deepspeed_config,
                              tokenize_examples)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_shipped_deepspeed_files_fill_their_auto_values(name, stage):
    spec = TrainSpec(deepspeed_config=name, micro_batch_size=2, global_batch_size=8, learning_rate=1e-4,
                     precision="bf16", zero_stage=2)
    config = deepspeed_config(spec)
    assert config["zero_optimization"]["stage"] == stage  # an explicit file keeps its own stage
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["optimizer"]["params"]["lr"] == 1e-4
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"]["enabled"] is True


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
