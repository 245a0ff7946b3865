"""Trial and cell identity: everything that determines a result is in the hash, and an edit
changes exactly the hashes of what was built from it (the end-to-end rerun is in test_sweep_e2e)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from raydistill.spec import sweep_from_dict
from raydistill.sweep import identify_cell, identify_trial

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"


def _generating_sweep(tmp_path: Path, **extra):
    return sweep_from_dict({
        "name": "ids", "output_dir": str(tmp_path / "out"), "datasets": ["svamp"], "teachers": ["gpt"],
        "levels": [3, 5], "students": ["tiny-llama"], "train_limit": 8,
        "annotation": {"teachers": {"gpt": {"model": "openai/gpt-4o-mini"}}, "prompt_dir": str(tmp_path / "prompts"),
                       **extra},
    })


def _hashes(spec) -> dict[int, tuple[str, str]]:
    """level -> (identified cell hash, identified trial hash)."""
    out = {}
    for trial in spec.trials():
        cell = identify_cell(trial.cell, spec)
        out[trial.cell.level] = (cell.cell_hash, identify_trial(trial, cell, "w" * 64, {"test": "t"}).trial_hash)
    return out


def test_editing_a_prompt_file_changes_only_the_cells_that_use_it(tmp_path):
    shutil.copytree(PROMPTS, tmp_path / "prompts")
    spec = _generating_sweep(tmp_path)
    before = _hashes(spec)
    assert _hashes(spec) == before  # stable
    level3 = tmp_path / "prompts" / "levels" / "level3.md"
    level3.write_text(level3.read_text() + "\nKeep every step on its own line.\n")
    after = _hashes(spec)
    assert after[3][0] != before[3][0] and after[3][1] != before[3][1]  # cell and trial of level 3
    assert after[5] == before[5]  # level 5 does not read level3.md
    exemplar = tmp_path / "prompts" / "exemplars" / "math_numeric.yaml"
    exemplar.write_text(exemplar.read_text().replace("A baker made 48 muffins", "A baker made 48 rolls"))
    again = _hashes(spec)
    assert again[3] != after[3] and again[5] != after[5]  # the exemplar is in every level's prompt


def test_gold_hint_and_policy_are_part_of_a_generated_cell(tmp_path):
    shutil.copytree(PROMPTS, tmp_path / "prompts")
    plain = _hashes(_generating_sweep(tmp_path))
    hinted = _hashes(_generating_sweep(tmp_path, show_gold=True))
    correct = _hashes(_generating_sweep(tmp_path, policy="keep_correct"))
    assert plain[3][0] != hinted[3][0] and plain[3][0] != correct[3][0] and hinted[3][0] != correct[3][0]


def test_released_cells_carry_the_digests_of_their_files():
    spec = sweep_from_dict({"name": "r", "datasets": ["svamp"], "teachers": ["chatgpt", "answer_only"],
                            "levels": [1], "students": ["tiny-llama"]})
    cells = {c.teacher: identify_cell(c, spec) for c in spec.cells()}
    assert "distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json" in cells["chatgpt"].inputs
    assert "mammoth2-math-eval/SVAMP/SVAMP.json" in cells["chatgpt"].inputs  # test questions are removed
    assert "distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json" not in cells["answer_only"].inputs
    repaired = sweep_from_dict({"name": "r", "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1],
                                "students": ["tiny-llama"], "repair_targets": True})
    assert identify_cell(repaired.cells()[0], repaired).cell_hash != cells["chatgpt"].cell_hash


def test_trial_hash_covers_weights_test_data_grader_and_eval_overrides():
    base = {"name": "t", "datasets": ["svamp"], "teachers": ["chatgpt"], "levels": [1], "students": ["tiny-llama"]}
    spec = sweep_from_dict(base)
    (trial,) = spec.trials()
    cell = identify_cell(trial.cell, spec)
    reference = identify_trial(trial, cell, "a" * 64, {"test": "x"}).trial_hash
    assert identify_trial(trial, cell, "b" * 64, {"test": "x"}).trial_hash != reference  # other weights
    assert identify_trial(trial, cell, "a" * 64, {"test": "y"}).trial_hash != reference  # other test file
    for change in ({"grader": {"math_numeric_equality": True}}, {"eval": {"max_new_tokens": 256}},
                   {"eval": {"protocol": "none"}}, {"train": {"learning_rate": 1e-4}}, {"seeds": [1]}):
        other = sweep_from_dict({**base, **change})
        (changed,) = other.trials()
        assert identify_trial(changed, identify_cell(changed.cell, other), "a" * 64, {"test": "x"}).trial_hash \
            != reference, change
    # protocol: paper with the protocol's own value stated explicitly is recorded as an override
    explicit = sweep_from_dict({**base, "eval": {"max_new_tokens": 1024}})
    assert explicit.trials()[0].eval == trial.eval and explicit.trials()[0].eval_overrides == ["max_new_tokens"]


def test_a_padded_cell_pads_level_1_to_the_same_questions_level_5_length(tmp_path):
    """The length ablation from the release: each level-1 rationale is its own text plus "..." up
    to the word count of the same question's level-5 rationale, the final answer sentence last."""
    from raydistill.datasets import load_train
    from raydistill.sweep import cell_dir, replay_cell

    spec = sweep_from_dict({"name": "pad", "datasets": ["svamp"], "teachers": ["chatgpt"], "students": ["tiny-llama"],
                            "train_limit": 40, "grids": [{"levels": [1], "pad_to_level": 5}]})
    [cell] = spec.cells()
    identified = identify_cell(cell, spec)
    assert any("level1" in path for path in identified.inputs) and any("level5" in path for path in identified.inputs)
    info = replay_cell(identified, cell_dir(tmp_path, identified))
    rows = pq.read_table(info["train_path"]).to_pylist()
    level1 = {r["question_id"]: r for r in load_train("svamp", "chatgpt", level=1).to_pylist()}
    level5 = {r["question_id"]: r["rationale"] for r in load_train("svamp", "chatgpt", level=5).to_pylist()}
    assert len(rows) == 40
    grew = 0
    for row in rows:
        original = level1[row["question_id"]]["rationale"]
        target = len(level5[row["question_id"]].split()) if row["question_id"] in level5 else 0  # not in L5: unpadded
        words = row["rationale"].split()
        assert len(words) == max(len(original.split()), target)
        assert re.sub(r"\s+|\.\.\.", "", row["rationale"]) == re.sub(r"\s+|\.\.\.", "", original)  # no content added
        assert row["answer"] == level1[row["question_id"]]["answer"]
        if len(words) > len(original.split()) and re.search("[Tt]he answer is", original):
            assert re.search("[Tt]he answer is", row["rationale"].rsplit("...", 1)[-1])  # the answer sentence stays last
        grew += len(words) > len(original.split())
    assert grew > 30  # level-5 rationales are longer for nearly every question

