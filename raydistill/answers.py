"""Answer extraction and grading with the paper's semantics, rule by rule (docs/grading.md).

Each task of the registry (`raydistill.tasks`) names one grader; the same grader verifies teacher
rationales (annotate), measures a cell's target ceiling and grades students (evaluate).

* `NumberGrader` (svamp, gsm8k), `ChoiceGrader` (aqua) and `MathGrader` (math) mirror MAmmoTH2's
  ``answer_clean`` and ``compare_answer_with_groundtruth`` (TIGER-AI-Lab/MAmmoTH2 at 9c67cb1,
  ``math_eval/utils.py``), the evaluator the seed paper names for its math sets: the text after
  the last "The answer is" trigger, then numbers, a choice letter or a LaTeX expression
  normalised by ``_strip_string``; gold and prediction are equal as strings, case ignored.
  There is no numeric tolerance for MATH: MAmmoTH2 uses one only where a numeric gold is passed
  (TheoremQA).
* `LabelGrader` (csqa, obqa, strategyqa) mirrors the seed paper's reasoning evaluator
  (EIT-NLP/Distilling-CoT-Reasoning, ``Evaluation/reasoning_eval/run_reasoning.py``): the first
  "[Tt]he answer is (A-E|True|False)" of the cleaned generation, exact equality with the label.

Anything more lenient is an opt-in `GraderOptions` flag; the options are part of a trial's
identity and named in the report.

Public API: ``extract``, ``normalize_gold``, ``is_correct`` (by task name), the grader classes,
``GraderOptions``, ``PAPER_GRADING`` and ``repair_escapes``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

TRIGGERS: tuple[str, ...] = ("The answer is:", "The answer is", "the answer is")  # run_open.py
_NUMBER_RE = re.compile(r"-?\d+/?\.?\d*")  # answer_clean's number pattern
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")  # extract_math_answer's fallback pattern
_LABEL_RE = re.compile(r"[Tt]he answer is ([A-E]|True|False)")  # run_reasoning.extract_answer_label
_NUMERIC_REL_TOL = 1e-9  # GraderOptions.math_numeric_equality: equal values, not a tolerance


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


def _answer_piece(text: str, triggers: tuple[str, ...]) -> tuple[str, bool]:
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


def _pick(candidates: list[str], found: bool) -> str | None:
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


def _drop_text(s: str) -> str:
    r"""``\text{A,B}`` -> ``A,B``, as ``compare_answer_with_groundtruth`` does on both sides."""
    return s.replace("\\text{", "").rstrip("}") if "\\text{" in s else s


def _strings_equal(pred: str, gold: str) -> bool:
    """``compare_answer_with_groundtruth`` without a numeric gold: case-insensitive equality."""
    return _drop_text(pred).lower() == _drop_text(gold).lower()


@dataclass(frozen=True)
class NumberGrader:
    """svamp, gsm8k: the first number after the last trigger, else the last number."""

    triggers: tuple[str, ...] = TRIGGERS

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        piece, found = _answer_piece(text, self.triggers)
        return _pick(_numbers(piece), found)

    def normalize_gold(self, raw: Any) -> str:
        """51.0 -> "51"; "... #### 1,234" -> "1234" (the number after a gsm8k "####")."""
        if isinstance(raw, bool):
            raise ValueError(f"boolean gold {raw!r}")
        numbers = _numbers(str(raw).strip().split("####")[-1])
        if not numbers:
            raise ValueError(f"no number in gold {raw!r}")
        return numbers[0].rstrip(".").rstrip("/")

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        return _strings_equal(pred, gold)


_LETTER_RE = re.compile(r"\b(A|B|C|D|E)\b")


@dataclass(frozen=True)
class ChoiceGrader:
    """aqua: standalone letters A-E of the upper-cased piece; first after a trigger, else last.

    MAmmoTH2 falls back to the raw piece when no letter is found; here that is None (the raw
    piece never equals a gold letter after upper-casing anyway, except a bare letter).
    """

    triggers: tuple[str, ...] = TRIGGERS

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        piece, found = _answer_piece(text, self.triggers)
        return _pick(_LETTER_RE.findall(piece.upper()), found)

    def normalize_gold(self, raw: Any) -> str:
        return gold_letter(raw, "ABCDE")

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        return _strings_equal(pred, gold)


# ----- MATH LaTeX normalisation (MAmmoTH2 ``_strip_string`` and helpers, from Hendrycks' MATH)


def find_box(s: str) -> str:
    """Content of the last ``boxed{...}`` with balanced braces (``find_box``)."""
    ans = s.split("boxed")[-1]
    if not ans:
        return ""
    if ans[0] != "{":
        return ans.split("$")[0].strip()
    depth, out = 1, []
    for c in ans[1:]:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(c)
    return "".join(out)


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{7}`` -> ``\frac{1}{7}`` (``_fix_fracs``)."""
    head, *rest = s.split("\\frac")
    out = head
    for sub in rest:
        out += "\\frac"
        if not sub or sub[0] == "{":
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b, post = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + (b if b == "{" else "{" + b + "}") + post
    return out


def _fix_a_slash_b(s: str) -> str:
    r"""``3/4`` -> ``\frac{3}{4}`` for plain integers (``_fix_a_slash_b``)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt3`` -> ``\sqrt{3}`` (``_fix_sqrt``)."""
    head, *rest = s.split("\\sqrt")
    return head + "".join(
        "\\sqrt" + (sub if not sub or sub[0] == "{" else "{" + sub[0] + "}" + sub[1:]) for sub in rest)


def strip_string(s: str, lenient: bool = False) -> str:
    """MATH answer normalisation, step for step MAmmoTH2's ``_strip_string``.

    ``lenient`` (``GraderOptions.math_lenient_latex``) also drops \\( \\) delimiters around the
    whole answer, "\\mbox{ units}" and a bare "%".
    """
    s = s.replace("\n", "")
    if lenient:
        s = re.sub(r"^\s*\\\((.*)\\\)\s*$", r"\1", s).strip()
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.strip("$")
    s = s.replace("\\$", "")
    s = s.split("\\text{ ")[0]  # _remove_right_units
    if lenient:
        s = s.split("\\mbox{ ")[0].replace("%", "")
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2:  # "k = 5" -> " 5"
        s = parts[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    return _fix_a_slash_b(s)


def repair_escapes(s: str) -> str:
    r"""Undo LaTeX escapes eaten by JSON: ``\frac`` read as form feed + "rac", ``\boxed`` as
    backspace + "oxed", ``\times``/``\text`` as tab, ``\right`` as carriage return.

    Seen in the released MATH files; \b and \f never occur in real text, \t and \r only count
    when a letter follows. Used by the opt-in target repair and by lenient MATH grading.
    """
    s = s.replace("\f", "\\f").replace("\b", "\\b")
    return re.sub(r"[\t\r](?=[a-z])", lambda m: "\\t" if m.group() == "\t" else "\\r", s)


def _to_number(s: str) -> float | None:
    r"""A plain, comma-grouped, a/b or \frac{a}{b} number; None otherwise."""
    s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    num, sep, den = s.partition("/")
    try:
        value = float(num) / float(den) if sep else float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class MathGrader:
    """math: ``extract_math_answer`` on ``answer_clean``'s piece, then ``_strip_string``.

    The boxed content if any; else, after a trigger, the text after the last "=" (a number
    followed by words keeps just the number); else the last number.
    """

    triggers: tuple[str, ...] = TRIGGERS

    def extract(self, text: str, options: GraderOptions = PAPER_GRADING) -> str | None:
        lenient = options.math_lenient_latex
        piece, found = _answer_piece(repair_escapes(text) if lenient else text, self.triggers)
        if "boxed" in piece:
            pred = find_box(piece)
        elif found:
            pred = piece.split("=")[-1].strip()
            if re.match(r"[\d\.]+\s\D+$", pred):
                pred = pred.split(" ")[0]
        else:
            numbers = _LAST_NUMBER_RE.findall(piece)
            pred = numbers[-1] if numbers else ""
        return _pick([strip_string(pred, lenient)], found=True)

    def normalize_gold(self, raw: Any) -> str:
        """A LaTeX answer, or a solution with a boxed answer, in ``_strip_string`` form."""
        if isinstance(raw, bool):
            raise ValueError(f"boolean gold {raw!r}")
        s = str(raw).strip()
        return strip_string(find_box(s) if "boxed" in s else s)

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        if _strings_equal(pred, gold):
            return True
        if not options.math_numeric_equality:
            return False
        p, g = _to_number(_drop_text(pred)), _to_number(_drop_text(gold))
        return p is not None and g is not None and math.isclose(p, g, rel_tol=_NUMERIC_REL_TOL)


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


# =========================================================================== by task name


def _grader(task: str):
    from raydistill.tasks import get_task

    return get_task(task).grader


def extract(task: str, text: str | None, options: GraderOptions = PAPER_GRADING) -> str | None:
    """The normalised answer in a model's output for ``task``; None when nothing is found."""
    return _grader(task).extract(text or "", options)


def normalize_gold(task: str, raw: Any) -> str:
    """A dataset's raw gold answer in the form ``extract`` produces; ValueError when it cannot."""
    grader = _grader(task)
    if raw is None:
        raise ValueError(f"{task}: gold answer is None")
    try:
        return grader.normalize_gold(raw)
    except ValueError as err:
        raise ValueError(f"{task}: {err}") from None


def is_correct(task: str, text: str | None, gold: Any, options: GraderOptions = PAPER_GRADING) -> bool:
    """Whether the answer extracted from ``text`` matches ``gold`` (raw or normalised)."""
    return grade(task, text, gold, options)[1]


def grade(task: str, text: str | None, gold: Any, options: GraderOptions = PAPER_GRADING) -> tuple[str | None, bool]:
    """(extracted answer, correct) of one output against its gold."""
    grader = _grader(task)
    pred = grader.extract(text or "", options)
    if pred is None or gold is None:
        return pred, False
    try:
        gold_s = grader.normalize_gold(gold)
    except ValueError:
        gold_s = str(gold).strip()
    return pred, grader.equal(pred, gold_s, options)
