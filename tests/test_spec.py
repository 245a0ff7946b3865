"""Sweep configs: grid expansion, hashing and the errors a bad config gets."""

from pathlib import Path

import pytest

from raydistill.spec import EvalSpec, SpecError, load_sweep, sweep_from_dict

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1, 3], "students": ["tiny-llama"]}


def test_grid_expands_levels_students_seeds():
    spec = sweep_from_dict({**BASE, "students": ["tiny-llama", "tiny-llama-alpaca"], "seeds": [1, 2]})
    trials = spec.trials()
    assert len(trials) == 2 * 2 * 2
    assert len({t.trial_hash for t in trials}) == len(trials)
    assert {t.train.seed for t in trials} == {1, 2}


def test_levelless_teachers_appear_once_per_dataset():
    spec = sweep_from_dict({**BASE, "teachers": ["chatgpt", "human", "answer_only"], "levels": [1, 2, 3]})
    cells = spec.cells()
    assert [c.level for c in cells if c.teacher == "human"] == [None]
    assert len(cells) == 3 + 1 + 1


def test_hash_changes_with_any_hyperparameter():
    a = sweep_from_dict(BASE).trials()[0]
    b = sweep_from_dict({**BASE, "train": {"learning_rate": 1e-4}}).trials()[0]
    assert a.trial_hash != b.trial_hash
    assert a.trial_hash == sweep_from_dict(BASE).trials()[0].trial_hash


def test_gradient_accumulation_keeps_global_batch():
    spec = sweep_from_dict({**BASE, "train": {"global_batch_size": 64, "micro_batch_size": 4, "num_workers": 2}})
    assert spec.train.grad_accum_steps == 8


@pytest.mark.parametrize(
    "change, words",
    [
        ({"datasets": ["svampp"]}, ["datasets", "svampp"]),
        ({"levels": [0, 7]}, ["levels", "1 to 6"]),
        ({"formats": ["poem"]}, ["formats", "poem"]),
        ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, ["train", "multiple"]),
        ({"train": {"learning_rate": -1}}, ["train.learning_rate"]),
        ({"trian": {}}, ["trian"]),
        ({"name": "has space"}, ["name"]),
    ],
)
def test_bad_config_names_field(change, words):
    with pytest.raises(SpecError) as err:
        sweep_from_dict({**BASE, **change}, source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml:") and "\n" not in message
    for word in words:
        assert word in message


def test_shipped_sweep_configs_validate():
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        assert load_sweep(path).trials(), path


def test_unreadable_yaml_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml"):
        load_sweep(bad)


def test_a_padded_grid_adds_its_own_cells_and_leaves_the_others_as_they_were():
    plain = sweep_from_dict(BASE)
    padded = sweep_from_dict({**BASE, "grids": [{}, {"levels": [1], "pad_to_level": 5}]})
    assert [c.label for c in padded.cells()] == ["svamp/chatgpt/L1/cot", "svamp/chatgpt/L3/cot",
                                                 "svamp/chatgpt/L1+pad5/cot"]
    hashes = {t.trial_hash for t in padded.trials()}
    assert {t.trial_hash for t in plain.trials()} < hashes and len(hashes) == 3  # unpadded trials keep their hash
    [ablation] = [t for t in padded.trials() if t.cell.pad_to_level == 5]
    assert ablation.axes()["level"] == "1+pad5" and ablation.cell.level == 1
    assert "pad_to_level" not in plain.cells()[0].model_dump()


@pytest.mark.parametrize("grid, words", [
    ({"levels": [5], "pad_to_level": 5}, ["grids[0]", "pad_to_level 5", "another level"]),
    ({"teachers": ["human"], "levels": [1], "pad_to_level": 5}, ["grids[0]", "['human'] have no level"]),
    ({"levels": [1], "pad_to_level": 7}, ["grids.0.pad_to_level", "less than or equal to 6"]),
])
def test_bad_padding_names_the_grid(grid, words):
    with pytest.raises(SpecError) as err:
        sweep_from_dict({**BASE, "grids": [grid]}, source="bad.yaml")
    for word in words:
        assert word in str(err.value)



def test_overrides_leave_the_callers_config_as_it_was_and_name_a_scalar_in_the_path():
    raw = {**BASE, "train": {"epochs": 2}}
    spec = sweep_from_dict(raw, overrides={"train.epochs": 1, "train.lora.r": 4})
    assert spec.train.epochs == 1 and spec.train.lora.r == 4
    assert raw["train"] == {"epochs": 2}  # the caller's mapping is not changed
    with pytest.raises(SpecError, match="'train.epochs.x': 'epochs' holds int, not a mapping"):
        sweep_from_dict(raw, source="x.yaml", overrides={"train.epochs.x": 1})


@pytest.mark.parametrize("eval_, words", [
    ({"tensor_parallel_size": 0}, ["eval.tensor_parallel_size", "greater than or equal to 1"]),
    ({"tensor_parallel_size": 2}, ["tensor_parallel_size 2", "2 GPUs", "use_gpu: true"]),
    ({"gpu_memory_utilization": 1.5}, ["eval.gpu_memory_utilization", "less than or equal to 1"]),
    ({"gpu_memory_utilization": 0}, ["eval.gpu_memory_utilization", "greater than 0"]),
    ({"enable_prefix_caching": "sometimes"}, ["eval.enable_prefix_caching", "boolean"]),
    ({"max_num_seqs": 0}, ["eval.max_num_seqs", "greater than or equal to 1"]),
    ({"timeout_s": 0}, ["eval.timeout_s", "greater than 0"]),
    ({"timeout_s": "soon"}, ["eval.timeout_s", "number"]),
    ({"shared_engines": True, "engine": "hf", "use_gpu": True}, ["shared_engines", "HF engines on GPU", "engine: vllm"]),
    ({"shared_engines": True, "engine": "vllm", "use_gpu": True, "tensor_parallel_size": 2},
     ["shared_engines", "tensor_parallel_size 2", "per trial"]),
    ({"max_loras": 0}, ["eval.max_loras", "greater than or equal to 1"]),
    ({"engine": "hf", "max_num_seqs": 64, "enable_prefix_caching": False},
     ["engine: hf ignores", "max_num_seqs 64", "enable_prefix_caching False", "engine: auto or vllm"]),
], ids=["tp-0", "tp-without-gpu", "gpu-memory-above-1", "gpu-memory-0", "prefix-caching-not-bool", "max-num-seqs-0",
        "timeout-0", "timeout-not-a-number", "shared-hf-engines-on-gpu", "shared-sharded-engines", "max-loras-0",
        "vllm-options-on-hf"])
def test_a_bad_engine_option_is_rejected_in_one_line(tmp_path, capsys, eval_, words):
    """`raydistill sweep` as a user runs it: exit 2, one line on stderr naming the file and the field."""
    import yaml

    from raydistill.sweep import main

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({**BASE, "eval": eval_}))
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {config}: eval"), err
    for word in words:
        assert word in err[0]
    assert not (tmp_path / "o").exists()


def test_engine_settings_are_dumped_when_set_and_never_change_a_trial_hash():
    """Throughput settings and the timeout leave a trial's identity alone (a sweep written before
    they existed keeps its hashes); set, they are kept in the dump the trial and its record carry."""
    plain = sweep_from_dict(BASE).trials()[0]
    shared = sweep_from_dict({**BASE, "eval": {"shared_engines": True}}).trials()[0]
    assert shared.trial_hash == plain.trial_hash and shared.eval.model_dump()["shared_engines"] is True
    settings = {"use_gpu": True, "tensor_parallel_size": 4, "gpu_memory_utilization": 0.8,
                "enable_prefix_caching": False, "max_num_seqs": 64, "timeout_s": 900}
    gpu = sweep_from_dict({**BASE, "eval": {"use_gpu": True}}).trials()[0]
    tuned = sweep_from_dict({**BASE, "eval": settings}).trials()[0]
    assert tuned.trial_hash == gpu.trial_hash != plain.trial_hash
    assert not (set(settings) - {"use_gpu"}) & set(plain.eval.model_dump())  # at their defaults: left out
    dumped = tuned.eval.model_dump(mode="json")
    assert {k: dumped[k] for k in settings} == settings
    assert type(tuned).model_validate(tuned.model_dump(mode="json")).eval == tuned.eval


def test_a_grid_can_repeat_some_cells_with_more_seeds():
    one_seed = sweep_from_dict(BASE)
    spec = sweep_from_dict({**BASE, "grids": [{}, {"levels": [3], "seeds": [100, 101, 102]}]})
    seeds = sorted((t.cell.label, t.seed) for t in spec.trials())
    assert seeds == [("svamp/chatgpt/L1/cot", 100), ("svamp/chatgpt/L3/cot", 100),
                     ("svamp/chatgpt/L3/cot", 101), ("svamp/chatgpt/L3/cot", 102)]
    assert {t.trial_hash for t in one_seed.trials()} < {t.trial_hash for t in spec.trials()}
    assert spec.axis_values("seeds") == [100, 101, 102]


def test_a_thinking_evaluation_has_its_own_identity_and_older_specs_keep_theirs():
    plain, thinking = EvalSpec(), EvalSpec(think=True)
    assert "think" not in plain.model_dump() and thinking.model_dump()["think"] is True
    assert plain.identity() != thinking.identity()
    assert thinking.for_task("svamp").result_fields()["think"] is True
