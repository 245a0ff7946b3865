"""Sweep configs: grid expansion, hashing and the errors a bad config gets."""

from pathlib import Path

import pytest

from raydistill.spec import SpecError, load_sweep, sweep_from_dict

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
