"""MATH grading: MAmmoTH2's LaTeX answer normalisation (``_strip_string`` and its helpers, from
Hendrycks' MATH) and `MathGrader`.

There is no numeric tolerance for MATH: MAmmoTH2 uses one only where a numeric gold is passed
(TheoremQA); `GraderOptions.math_numeric_equality` opts into equal values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from raydistill.answers.graders import (
    PAPER_GRADING,
    TRIGGERS,
    GraderOptions,
    answer_piece,
    drop_text,
    pick,
    strings_equal,
)

_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")  # extract_math_answer's fallback pattern
_NUMERIC_REL_TOL = 1e-9  # GraderOptions.math_numeric_equality: equal values, not a tolerance


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
        piece, found = answer_piece(repair_escapes(text) if lenient else text, self.triggers)
        if "boxed" in piece:
            pred = find_box(piece)
        elif found:
            pred = piece.split("=")[-1].strip()
            if re.match(r"[\d\.]+\s\D+$", pred):
                pred = pred.split(" ")[0]
        else:
            numbers = _LAST_NUMBER_RE.findall(piece)
            pred = numbers[-1] if numbers else ""
        return pick([strip_string(pred, lenient)], found=True)

    def normalize_gold(self, raw: Any) -> str:
        """A LaTeX answer, or a solution with a boxed answer, in ``_strip_string`` form."""
        if isinstance(raw, bool):
            raise ValueError(f"boolean gold {raw!r}")
        s = str(raw).strip()
        return strip_string(find_box(s) if "boxed" in s else s)

    def equal(self, pred: str, gold: str, options: GraderOptions = PAPER_GRADING) -> bool:
        if strings_equal(pred, gold):
            return True
        if not options.math_numeric_equality:
            return False
        p, g = _to_number(drop_text(pred)), _to_number(drop_text(gold))
        return p is not None and g is not None and math.isclose(p, g, rel_tol=_NUMERIC_REL_TOL)
