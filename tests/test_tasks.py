"""The task registry and the paper's evaluation protocol per task."""

from __future__ import annotations

import pytest

from raydistill import answers, datasets, prompts
from raydistill.spec import EvalSpec, sweep_from_dict
from raydistill.tasks import COMMONSENSE_PROTOCOL, MATH_PROTOCOL, TASK_NAMES, TASKS, get_task

MAMMOTH2_STOPS = ("USER:", "ASSISTANT:", "### Instruction:", "Response:", "\n\nProblem", "\nProblem",
                  "Problem:", "<|eot_id|>", "####")  # MAmmoTH2 math_eval/run_open.py, stop_tokens
REASONING_STOPS = ("USER:", "ASSISTANT:", "### Instruction:", "Response:", "<start_of_turn>", "[INST]",
                   "\n\nProblem", "\nProblem", "Problem:", "<|eot_id|>", "####")  # seed run_reasoning.py


def test_the_seven_paper_tasks_in_order():
    assert TASK_NAMES == ("svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa")
    assert [t.kind for t in TASKS.values()] == ["math"] * 4 + ["commonsense"] * 3


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="mawps") as err:
        get_task("mawps")
    assert all(name in str(err.value) for name in TASK_NAMES)


def test_the_paper_protocols():
    """Math: MAmmoTH2 greedy at --model_max_length 1024; commonsense: beam search (best_of=5,
    use_beam_search) at --model_max_length 640 (autoevaluate.py)."""
    assert (MATH_PROTOCOL.num_beams, MATH_PROTOCOL.max_new_tokens, MATH_PROTOCOL.stop_strings) == (1, 1024, MAMMOTH2_STOPS)
    assert (COMMONSENSE_PROTOCOL.num_beams, COMMONSENSE_PROTOCOL.max_new_tokens,
            COMMONSENSE_PROTOCOL.stop_strings) == (5, 640, REASONING_STOPS)
    for task in TASKS.values():
        assert task.protocol is (MATH_PROTOCOL if task.kind == "math" else COMMONSENSE_PROTOCOL)
        assert "run_open.py" in task.protocol.source or "run_reasoning.py" in task.protocol.source


def test_every_module_reads_the_registry():
    for name, task in TASKS.items():
        assert prompts.exemplar(name).family == task.exemplars
        assert datasets.train_file(name, "answer_only").path  # the release names find its files
        gold = datasets.load_test(name).slice(0, 1).column("answer")[0].as_py()
        assert answers.is_correct(name, task.answer_only(gold), gold)  # the answer-only form is gradable


@pytest.mark.parametrize(("task", "beams", "tokens", "stops"), [
    ("svamp", 1, 1024, MAMMOTH2_STOPS), ("math", 1, 1024, MAMMOTH2_STOPS),
    ("csqa", 5, 640, REASONING_STOPS), ("strategyqa", 5, 640, REASONING_STOPS)])
def test_eval_spec_resolves_the_protocol_per_task(task, beams, tokens, stops):
    resolved = EvalSpec().for_task(task)
    assert (resolved.num_beams, resolved.max_new_tokens, tuple(resolved.stop_strings)) == (beams, tokens, stops)
    assert resolved.resolved and not EvalSpec().resolved
    assert resolved.for_task(task) == resolved  # resolving twice changes nothing


def test_explicit_eval_fields_override_the_protocol_and_are_named():
    spec = EvalSpec(max_new_tokens=200, num_beams=1)
    resolved = spec.for_task("csqa")
    assert (resolved.num_beams, resolved.max_new_tokens, tuple(resolved.stop_strings)) == (1, 200, REASONING_STOPS)
    assert spec.overrides() == ["max_new_tokens", "num_beams"]
    assert "overridden: max_new_tokens, num_beams" in spec.protocol_note("csqa")
    none = EvalSpec(protocol="none").for_task("csqa")
    assert (none.num_beams, none.max_new_tokens, none.stop_strings) == (1, 640, [])


def test_a_sweep_gives_each_task_its_protocol():
    spec = sweep_from_dict({"name": "p", "datasets": ["gsm8k", "obqa"], "teachers": ["chatgpt"], "levels": [3],
                            "students": ["tiny-llama"], "eval": {"engine": "hf"}})
    by_task = {t.cell.dataset: t for t in spec.trials()}
    assert (by_task["gsm8k"].eval.num_beams, by_task["gsm8k"].eval.max_new_tokens) == (1, 1024)
    assert (by_task["obqa"].eval.num_beams, by_task["obqa"].eval.max_new_tokens) == (5, 640)
    assert by_task["gsm8k"].eval_overrides == []
