"""Tests for raydistill.answers: unit cases per rule (the paper's semantics and the opt-in
leniency), plus checks on the released data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raydistill.answers import GraderOptions, extract, is_correct, normalize_gold
from raydistill.tasks import TASK_NAMES as TASKS

LENIENT = GraderOptions(math_lenient_latex=True)
NUMERIC = GraderOptions(math_numeric_equality=True)

# ---------------------------------------------------------------------------- task names


def test_tasks_are_the_seven_paper_datasets():
    assert TASKS == ("svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa")


@pytest.mark.parametrize(
    "call",
    [
        lambda: extract("mawps", "The answer is 3"),
        lambda: is_correct("mawps", "The answer is 3", "3"),
        lambda: normalize_gold("mawps", "3"),
    ],
)
def test_unknown_task_names_the_task_and_the_valid_ones(call):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "mawps" in message
    assert all(task in message for task in TASKS)


# ----------------------------------------------------------------------- numeric answers


@pytest.mark.parametrize("task", ["svamp", "gsm8k"])
@pytest.mark.parametrize(
    "text",
    ["So 40 + 2. The answer is: 42", "So 40 + 2. The answer is 42", "so 40 + 2, the answer is 42"],
)
def test_every_trigger_selects_the_text_after_it(task, text):
    assert extract(task, text) == "42"


def test_hash_trigger_is_gsm8k_only():
    text = "She has 3 + 4 = 7 apples.\n#### 7 and then 9"
    assert extract("gsm8k", text) == "7"  # first number after '####'
    assert extract("svamp", text) == "9"  # no trigger for svamp: the last number


def test_first_number_after_trigger_last_number_without():
    assert extract("svamp", "The answer is 5 apples and 6 pears") == "5"
    assert extract("svamp", "5 apples and 6 pears") == "6"
    assert extract("svamp", "The answer is 5 - 3 = 2") == "5"  # upstream: first number wins


def test_last_of_several_different_triggers_wins():
    assert extract("svamp", "The answer is 3. Hmm, the answer is 4.") == "4"


def test_repeated_trigger_keeps_the_first_blank_line_chunk():
    text = "3 + 4 = 7\nThe answer is 7\n\nQuestion: what is 4 + 5?\nThe answer is 9"
    assert extract("svamp", text) == "7"
    # repeated, but no blank line: nothing is cut, the last piece wins
    assert extract("svamp", "The answer is 7. The answer is 9") == "9"
    # repeated, and the first chunk holds no trigger: its last number (upstream behaviour)
    assert extract("svamp", "We add 3 things\n\nThe answer is 7. The answer is 7") == "3"


def test_the_answer_is_colon_is_one_trigger_occurrence():
    # "The answer is:" contains "The answer is"; counted separately, each occurs once
    assert extract("svamp", "Thinking about 8.\nThe answer is: 12") == "12"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234,567.", "1234567"),
        ("The answer is -5", "-5"),
        ("The temperature fell to -3.50 degrees", "-3.5"),
        ("The answer is 3/4", "0.75"),
        ("The answer is 18.0", "18"),
        ("The answer is 18.", "18"),
        ("The answer is 18. ", "18"),
        ("The answer is $18.00.", "18"),
        ("The answer is 2.50 dollars", "2.5"),
        ("The answer is 007", "7"),
        ("The answer is 1/0", "1/0"),  # unparseable stays as written
        ("\n\nThe answer is 12\n", "12"),
    ],
)
def test_number_normalisation(text, expected):
    assert extract("svamp", text) == expected
    assert extract("gsm8k", text) == expected


@pytest.mark.parametrize("text", ["The answer is unknown.", "No idea at all", "", None])
def test_no_number_gives_none(text):
    assert extract("svamp", text) is None
    assert extract("gsm8k", text) is None


# ---------------------------------------------------------------------------- AQuA letters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (c)", "C"),
        ("The answer is B or maybe D", "B"),  # trigger: first letter
        ("Between A and D, I pick D", "D"),  # no trigger: last letter
        ("The answer is: E) 12 km", "E"),
        ("The answer is 42", None),
        ("Nothing BEACHES CAB", None),  # letters inside words do not count
    ],
)
def test_aqua_letters(text, expected):
    assert extract("aqua", text) == expected


def test_aqua_upper_cases_the_piece_as_upstream_does():
    # the article "a" becomes the letter A, exactly as in MAmmoTH's answer_clean
    assert extract("aqua", "The answer is a tricky one: C") == "A"


# --------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{{a}+{b}}", "{a}+{b}"),  # last box, balanced braces
        ("it is $\\boxed 5$", "5"),
        ("The answer is \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("The answer is \\tfrac{3}{4}", "\\frac{3}{4}"),
        ("The answer is \\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("The answer is \\frac12", "\\frac{1}{2}"),
        ("The answer is \\frac1{72}", "\\frac{1}{72}"),
        ("The answer is 3/4", "\\frac{3}{4}"),
        ("The answer is 2\\sqrt3", "2\\sqrt{3}"),
        ("The answer is x^2 = 16", "16"),  # after a trigger: text after the last '='
        ("The answer is 320000 acres", "320000"),  # number + words: just the number
        ("The answer is 10^\\circ", "10"),
        ("The answer is \\$5", "5"),
        ("The answer is 5\\$", "5\\"),  # strip('$') leaves the backslash, as upstream
        ("The answer is $$x+1$$", "x+1"),
        ("The answer is 50\\%", "50"),
        ("The answer is 52%.", "52%"),  # a bare % stays: "52%" is not "52" for the paper's grader
        ("The answer is .5", "0.5"),
        ("The answer is 5 \\text{ cm}", "5"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is \\(\\sqrt{2}\\)", "\\(\\sqrt{2}\\)"),  # \( \) only go with math_lenient_latex
        ("we get 12 and then 15", "15"),  # no trigger, no box: the last number
        ("The answer is \x0crac{2}{5}", "rac{2}{5}"),  # "\f" eaten by JSON: not repaired by default
        ("The answer is k = 3.0", "3.0"),
    ],
)
def test_math_extraction_and_latex_normalisation(text, expected):
    assert extract("math", text) == expected


@pytest.mark.parametrize("text", ["The answer is", "no digits here", ""])
def test_math_nothing_found(text):
    assert extract("math", text) is None


@pytest.mark.parametrize(
    ("text", "paper", "lenient"),
    [
        ("The answer is 52%.", "52%", "52"),
        ("The answer is \\(\\sqrt{2}\\)", "\\(\\sqrt{2}\\)", "\\sqrt{2}"),
        ("The answer is \x0crac{2}{5}", "rac{2}{5}", "\\frac{2}{5}"),
        ("so \x08oxed{\\frac{1}{3}}", "3", "\\frac{1}{3}"),  # "\b" of \boxed eaten: no box, last number
        ("The answer is 4 \\mbox{ cm}", "4", "4"),
    ],
)
def test_lenient_latex_is_opt_in(text, paper, lenient):
    assert extract("math", text) == paper
    assert extract("math", text, LENIENT) == lenient


# ---------------------------------------------------------------------- reasoning tasks


@pytest.mark.parametrize("task", ["csqa", "obqa"])
def test_choice_tasks_take_the_first_match(task):
    text = "The answer is B. On reflection, the answer is C."
    assert extract(task, text) == "B"
    assert is_correct(task, text, "B")
    assert not is_correct(task, text, "C")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the answer is C", "C"),
        ("The answer is b", None),  # case-sensitive letter
        ("The answer is (B)", None),  # the paper's pattern wants the bare letter
        ("Answer: B", None),
        ("The answer isB", None),
        ("<start_of_turn>The answer is A<end_of_turn>\nThe answer is D", "D"),  # chat debris
        ("The answer is ####C", "C"),  # stop phrases are cleaned out first
    ],
)
def test_choice_pattern(text, expected):
    assert extract("csqa", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bats fly. The answer is True", "True"),
        ("So no. The answer is False.", "False"),
        ("The answer is true", None),
        ("The answer is Yes", None),
        ("It is False. The answer is True", "True"),
    ],
)
def test_strategyqa_true_false(text, expected):
    assert extract("strategyqa", text) == expected


def test_strategyqa_grading_with_boolean_and_string_gold():
    assert is_correct("strategyqa", "The answer is True", True)
    assert is_correct("strategyqa", "The answer is False", "False")
    assert not is_correct("strategyqa", "The answer is False", True)
    assert not is_correct("strategyqa", "I think it is True", True)


# ------------------------------------------------------------------------- normalize_gold


@pytest.mark.parametrize(
    ("task", "raw", "expected"),
    [
        ("svamp", 51.0, "51"),
        ("svamp", 51, "51"),
        ("svamp", "51.50", "51.5"),
        ("svamp", 0.25, "0.25"),
        ("gsm8k", "He paid 2 + 3 = <<2+3=5>>5.\n#### 1,234", "1234"),
        ("gsm8k", "-7", "-7"),
        ("aqua", "A", "A"),
        ("aqua", "(b)", "B"),
        ("aqua", "C.", "C"),
        ("aqua", "Option D", "D"),
        ("aqua", "- E", "E"),
        ("aqua", "C16", "C"),
        ("csqa", "B", "B"),
        ("obqa", " d ", "D"),
        ("strategyqa", True, "True"),
        ("strategyqa", False, "False"),
        ("strategyqa", "true", "True"),
        ("strategyqa", "False", "False"),
        ("math", "\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("math", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("math", "Thus the area is $\\boxed{12\\sqrt{2}}$.", "12\\sqrt{2}"),
        ("math", "2\\sqrt{5", "2\\sqrt{5"),  # a cut released gold stays cut (repair is opt-in)
        ("math", "441\\text{ pounds", "441"),
        ("math", 7, "7"),
    ],
)
def test_normalize_gold(task, raw, expected):
    assert normalize_gold(task, raw) == expected


@pytest.mark.parametrize(
    ("task", "raw"),
    [
        ("svamp", "no number"),
        ("svamp", None),
        ("aqua", "none of the above"),
        ("obqa", "E"),
        ("csqa", "F"),
        ("strategyqa", "maybe"),
    ],
)
def test_normalize_gold_rejects_what_it_cannot_read(task, raw):
    with pytest.raises(ValueError, match=task):
        normalize_gold(task, raw)


@pytest.mark.parametrize(
    ("task", "raw"),
    [
        ("svamp", 51.0),
        ("svamp", 0.75),
        ("gsm8k", "#### 1,234"),
        ("gsm8k", -12),
        ("aqua", "(d)"),
        ("math", "\\dfrac{3}{4}"),
        ("math", "\\left[ -2, 5 \\right)"),
        ("csqa", "E"),
        ("obqa", "A"),
        ("strategyqa", False),
    ],
)
def test_gold_and_a_model_stating_it_agree(task, raw):
    gold = normalize_gold(task, raw)
    text = f"Some reasoning here. The answer is {gold}"
    assert extract(task, text) == gold
    assert is_correct(task, text, gold)
    assert is_correct(task, text, raw)  # raw gold is normalised on the way in
    assert normalize_gold(task, gold) == gold  # idempotent


# ------------------------------------------------------------------------------ grading


def test_numeric_tasks_have_no_tolerance():
    assert is_correct("svamp", "The answer is 51", 51.0)
    assert not is_correct("svamp", "The answer is 52", 51.0)
    assert not is_correct("gsm8k", "The answer is 51.5", "#### 51")
    assert not is_correct("gsm8k", "I cannot tell", "#### 51")


def test_aqua_is_case_insensitive():
    assert is_correct("aqua", "The answer is c", "C")
    assert not is_correct("aqua", "The answer is d", "C")


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("3.2", "3"),  # no tolerance, no rounding: MAmmoTH2 compares MATH answers as strings
        ("255.2", "255"),
        ("-3.8", "-4"),
        ("3.0", "3"),
        ("3%", "3"),
        ("2.59", "2.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("x+1", "x+2"),
    ],
)
def test_math_grading_is_exact_string_equality(pred, gold):
    assert not is_correct("math", f"The answer is {pred}", gold)


@pytest.mark.parametrize(
    ("pred", "gold", "numeric"),
    [
        ("3.0", "3", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "0.5", True),
        ("1,000", "1000", True),
        ("3.2", "3", False),  # equal values only: never a tolerance or rounding
        ("255.2", "255", False),
        ("-3.8", "-4", False),
        ("2.59", "2.5", False),
        ("x+1", "x+2", False),
    ],
)
def test_math_numeric_equality_is_opt_in(pred, gold, numeric):
    assert is_correct("math", f"The answer is {pred}", gold, NUMERIC) is numeric


def test_math_equal_strings_after_normalising_both_sides():
    assert is_correct("math", "The answer is \\dfrac{1}{2}", "\\frac12")
    assert is_correct("math", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})")
    assert is_correct("math", "The answer is 3", "3")


def test_grader_options_name_what_they_enable():
    assert GraderOptions().label() == "paper" and GraderOptions().enabled() == []
    both = GraderOptions(math_numeric_equality=True, math_lenient_latex=True)
    assert both.label() == "math_numeric_equality+math_lenient_latex"
    with pytest.raises(ValueError):
        GraderOptions(tolerance=0.04)


def test_math_text_wrapper_is_ignored_when_grading():
    assert is_correct("math", "The answer is \\text{A,B,E}", "A,B,E")
    assert is_correct("math", "The answer is A,B,E", "\\text{A,B,E")
    assert not is_correct("math", "The answer is A,B", "\\text{A,B,E}")


def test_math_string_equality_is_case_insensitive():
    assert is_correct("math", "\\boxed{\\text{Monday}}", "\\text{monday}")


def test_missing_answer_is_wrong():
    for task in TASKS:
        assert not is_correct(task, "", "A" if task in ("aqua", "csqa", "obqa") else "1")


# --------------------------------------------------------------- the paper's released data


def _data_dir() -> Path:
    env = os.environ.get("RAYDISTILL_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


TRAIN = "distilling-cot/train"

# (task, annotation file, answer-only file, least share of rows whose extraction must agree)
RELEASED = [
    ("svamp", "SVAMP_ChatGPT_level1_ranked.json", "SVAMP_only_ans.json", 0.95),
    ("gsm8k", "gsm8k_llama_level2_ranked.json", "gsm_train_onlyans.json", 0.95),
    ("aqua", "aqua_llama_level3_ranked.json", "aqua_only_ans.json", 0.95),
    ("strategyqa", "stqa_llama_level1_ranked.json", "strategyQA_onlyans.json", 0.95),
    ("obqa", "openbookQA_chatgpt_level_1_ranked.json", "openbookQA_onlyans.json", 0.95),
    ("csqa", "csqa_llama_level1_ranked.json", "commonsenseQA_onlyans.json", 0.95),
]


def _load(name: str) -> list[dict]:
    path = _data_dir() / TRAIN / name
    if not path.is_file():
        pytest.skip(f"data mirror file not found: {path} (set RAYDISTILL_DATA_DIR)")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("task", "annotated", "answers", "least"), RELEASED)
def test_released_rationales_end_in_their_gold_answer(task, annotated, answers, least):
    gold = {}
    for row in _load(answers):
        try:
            gold[row["instruction"]] = normalize_gold(task, row["output"])
        except ValueError:  # a handful of AQuA golds carry no letter at all
            pass
    rows = [r for r in _load(annotated) if r["instruction"] in gold]
    assert len(rows) >= 0.95 * len(_load(annotated)), "files no longer line up"
    agree = sum(extract(task, r["output"]) == gold[r["instruction"]] for r in rows)
    assert agree / len(rows) >= least, f"{task}: {agree}/{len(rows)} agree"
    # the checker grades: shuffling the golds must break the agreement
    shuffled = [gold[r["instruction"]] for r in rows[1:] + rows[:1]]
    chance = sum(extract(task, r["output"]) == g for r, g in zip(rows, shuffled))
    assert chance < agree * 0.8


def test_released_math_rationales_grade_against_their_gold():
    rows = _load("math_llama_level1_ranked.json")
    graded = [is_correct("math", r["llama_output"], r["output"]) for r in rows]
    # MATH teachers are wrong more often; about 97 % agree, 93 % keeps a margin
    assert sum(graded) / len(graded) >= 0.93
