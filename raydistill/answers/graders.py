"""The paper's graders for numbers, choice letters and labels, and the options every grader takes.

* `NumberGrader` (svamp, gsm8k) and `ChoiceGrader` (aqua) mirror MAmmoTH2's ``answer_clean`` and
  ``compare_answer_with_groundtruth`` (TIGER-AI-Lab/MAmmoTH2 at 9c67cb1, ``math_eval/utils.py``):
  the text after the last "The answer is" trigger (`answer_piece`), then numbers or a choice
  letter; gold and prediction are equal as strings, case ignored (`strings_equal`). `MathGrader`
  (`raydistill.answers.latex`) builds on the same helpers.
* `LabelGrader` (csqa, obqa, strategyqa) mirrors the seed paper's reasoning evaluator
  (EIT-NLP/Distilling-CoT-Reasoning, ``Evaluation/reasoning_eval/run_reasoning.py``).
* `GraderOptions`: opt-in leniency on top of the paper's grading (`PAPER_GRADING`: none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

TRIGGERS: tuple[str, ...] = ("The answer is:", "The answer is", "the answer is")  # run_open.py
_NUMBER_RE = re.compile(r"-?\d+/?\.?\d*")  # answer_clean's number pattern
_LABEL_RE = re.compile(r"[Tt]he answer is ([A-E]|True|False)")  # run_reasoning.extract_answer_label


class GraderOptions(BaseModel):
    """Opt-in leniency on top of the paper's grading (all off = the paper's semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    math_numeric_equality: bool = False
    """MATH: also accept a prediction whose value equals the gold's ("0.5" for "\\frac{1}{2}",
    "3.0" for "3"); plain numbers, a/b and \\frac{a}{b} only, compared to 1e-9 relative."""
    math_lenient_latex: bool = False
    """MATH: also drop \\( \\) delimiters, a bare "%", "\\mbox{ units}", and undo LaTeX escapes
    eaten by JSON ("\\f" of "\\frac", "\\b" of "\\boxed") before extracting."""

    def enabled(self) -> list[str]:
        """Names of the options switched on; [] for the paper's grading."""
        return [name for name, on in self.model_dump().items() if on]

    def label(self) -> str:
        return "+".join(self.enabled()) or "paper"


PAPER_GRADING = GraderOptions()


# =========================================================================== MAmmoTH2 side


def answer_piece(text: str, triggers: tuple[str, ...]) -> tuple[str, bool]:
    """The text after the last trigger, and whether a trigger was found (``answer_clean``).

    A trigger occurring more than once means the model ran on into a new example, so only the
    first blank-line chunk is kept.
    """
    pred = text.strip("\n")
    if any(pred.count(t) > 1 for t in triggers):
        pred = pred.split("\n\n")[0]
    pieces = re.split("|".join(map(re.escape, triggers)), pred)
    found = len(pieces) > 1
    if found:
        pred = pieces[-1]
    return pred.strip("\n").rstrip(".").rstrip("/").strip(" "), found


def pick(candidates: list[str], found: bool) -> str | None:
    """First candidate after a trigger, else the last one; None when there is none."""
    if not candidates:
        return None
    pred = (candidates[0] if found else candidates[-1]).rstrip(".").rstrip("/")
    return pred or None


def _format_number(value: float) -> str:
    """``delete_extra_zero``'s float branch: 18.0 -> '18', 0.50 -> '0.5'."""
    s = str(float(value)).rstrip("0")
    return str(int(s.rstrip("."))) if s.endswith(".") else str(float(s))


def _normalize_number(s: str) -> str:
    """``delete_extra_zero``, its ``eval`` fallback limited to 'a/b'; unparsable text unchanged."""
    try:
        return _format_number(float(s))
    except ValueError:
        pass
    num, sep, den = s.partition("/")
    if sep:
        try:
            return _format_number(int(num) / float(den))
        except (ValueError, ZeroDivisionError):
            pass
    return s


def _numbers(piece: str) -> list[str]:
    """Every number in ``piece``, commas dropped, normalised (the gsm8k/svamp branch)."""
    return [_normalize_number(m) for m in _NUMBER_RE.findall(piece.replace(",", ""))]


def drop_text(s: str) -> str:
    r"""``\text{A,B}`` -> ``A,B``, as ``compare_answer_with_groundtruth`` does on both sides."""
    return s.replace("\\text{", "").rstrip("}") if "\\text{" in s else s


def strings_equal(pred: str, gold: str) -> bool:
    """``compare_answer_with_groundtruth`` without a numeric gold: case-insensitive equality."""
    return drop_text(pred).lower() == drop_text(gold).lower()


@dataclass(frozen=True)
class NumberGrader:
    """svamp, gsm8k: the first number after the last trigger, else the last number."""

    triggers: tuple[str, ...] = TRIGGERS

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        piece, found = answer_piece(text, self.triggers)
        return pick(_numbers(piece), found)

    def normalize_gold(self, raw: Any) -> str:
        """51.0 -> "51"; "... #### 1,234" -> "1234" (the number after a gsm8k "####")."""
        if isinstance(raw, bool):
            raise ValueError(f"boolean gold {raw!r}")
        numbers = _numbers(str(raw).strip().split("####")[-1])
        if not numbers:
            raise ValueError(f"no number in gold {raw!r}")
        return numbers[0].rstrip(".").rstrip("/")

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        return strings_equal(pred, gold)


_LETTER_RE = re.compile(r"\b(A|B|C|D|E)\b")


@dataclass(frozen=True)
class ChoiceGrader:
    """aqua: standalone letters A-E of the upper-cased piece; first after a trigger, else last.

    MAmmoTH2 falls back to the raw piece when no letter is found; here that is None (the raw
    piece never equals a gold letter after upper-casing anyway, except a bare letter).
    """

    triggers: tuple[str, ...] = TRIGGERS

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        piece, found = answer_piece(text, self.triggers)
        return pick(_LETTER_RE.findall(piece.upper()), found)

    def normalize_gold(self, raw: Any) -> str:
        return gold_letter(raw, "ABCDE")

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        return strings_equal(pred, gold)


# =========================================================================== reasoning-eval side


def _clean_generation(text: str) -> str:
    """``clean_generated_output`` of run_reasoning.py (chat debris, stop phrases)."""
    s = re.sub(r"<start_of_turn>.*?<end_of_turn>", "", text, flags=re.DOTALL)
    s = re.sub(r"\n+", "\n", s).strip()
    s = re.sub(r"(?:\bedReader\b|\bmodel\b)+", "", s).strip()
    for stop in ("USER:", "ASSISTANT:", "### Instruction:", "Response:", "<start_of_turn>",
                 "[INST]", "<|eot_id|>", "####"):
        s = s.replace(stop, "").strip()
    return s


@dataclass(frozen=True)
class LabelGrader:
    """csqa, obqa (letters), strategyqa (True/False): the first 'The answer is X' of the cleaned
    generation, X in A-E/True/False (case-sensitive), equal to the label."""

    labels: str = "ABCDE"  # gold letters; "bool" for True/False

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        m = _LABEL_RE.search(_clean_generation(text))
        return m.group(1) if m else None

    def normalize_gold(self, raw: Any) -> str:
        """"B", "(b)" -> "B"; True / "true" / "yes" -> "True"."""
        if self.labels != "bool":
            return gold_letter(raw, self.labels)
        if isinstance(raw, bool):
            return str(raw)
        label = {"true": "True", "yes": "True", "false": "False", "no": "False"}.get(str(raw).strip().lower())
        if label is None:
            raise ValueError(f"gold {raw!r} is not True/False")
        return label

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        return pred == gold


def gold_letter(raw: Any, letters: str) -> str:
    """The choice letter in a gold string: "B", "(b)", "B.", "Option C", "- D", "is 7=D"."""
    if isinstance(raw, bool):
        raise ValueError(f"boolean gold {raw!r}")
    s = str(raw).strip()
    m = (re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", s)
         or re.search(rf"(?i)option\s*\(?([{letters}])\b", s)
         or re.fullmatch(rf"[\W_]*([{letters.lower()}])[\W_]*", s))
    if not m:
        raise ValueError(f"no choice letter ({letters}) in gold {s!r}")
    return m.group(1).upper()
