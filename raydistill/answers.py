"""The one answer checker: extract, normalise and grade answers for every task.

Used both to verify teacher rationales (annotate) and to grade students (evaluate).

* svamp / gsm8k / aqua / math mirror MAmmoTH's ``answer_clean``
  (TIGER-AI-Lab/MAmmoTH, ``math_eval/utils.py``) and the MATH LaTeX normalisation it uses
  (``_strip_string`` and helpers, from Hendrycks et al.'s MATH code).
* csqa / obqa / strategyqa mirror the seed paper's reasoning evaluator
  (EIT-NLP/Distilling-CoT-Reasoning, ``Evaluation/reasoning_eval/run_reasoning.py``).

Public API: ``TASKS``, ``extract``, ``normalize_gold``, ``is_correct``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

TASKS: tuple[str, ...] = ("svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa")

_MATH_TASKS = ("svamp", "gsm8k", "aqua", "math")
_TRIGGERS = ("The answer is:", "The answer is", "the answer is")
_NUMBER_RE = re.compile(r"-?\d+/?\.?\d*")  # answer_clean's number pattern
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")  # extract_math_answer's fallback pattern
_LETTER_RE = re.compile(r"\b(A|B|C|D|E)\b")
_LABEL_RE = re.compile(r"[Tt]he answer is ([A-E]|True|False)")  # run_reasoning.extract_answer_label
_REL_TOL = 0.04  # MAmmoTH within_eps


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


# --------------------------------------------------------------------------- MAmmoTH side


def _triggers(task: str) -> tuple[str, ...]:
    """Mirrors MAmmoTH ``get_seperation_trigger``: gsm8k also splits on '####'."""
    return _TRIGGERS + ("####",) if task == "gsm8k" else _TRIGGERS


def _answer_piece(task: str, text: str) -> tuple[str, bool]:
    """The text after the last trigger, and whether a trigger was found.

    Mirrors the first half of MAmmoTH ``answer_clean``: a trigger occurring more than once
    means the model ran on into a new example, so only the first blank-line chunk is kept.
    """
    triggers = _triggers(task)
    pred = text.strip("\n")
    if any(pred.count(t) > 1 for t in triggers):
        pred = pred.split("\n\n")[0]
    pieces = re.split("|".join(map(re.escape, triggers)), pred)
    found = len(pieces) > 1
    if found:
        pred = pieces[-1]
    # Upstream strips only "\n" before the trailing "."; all whitespace here, so "5. " -> "5".
    return pred.strip().rstrip(".").rstrip("/").strip(), found


def _pick(candidates: list[str], found: bool) -> str | None:
    """First candidate after a trigger, else the last one (MAmmoTH ``answer_clean``)."""
    if not candidates:
        return None
    pred = candidates[0] if found else candidates[-1]
    pred = pred.rstrip(".").rstrip("/")
    return pred or None


def _format_number(value: float) -> str:
    """Mirrors MAmmoTH ``delete_extra_zero``'s float branch: 18.0 -> '18', 0.50 -> '0.5'."""
    s = str(float(value)).rstrip("0")
    return str(int(s.rstrip("."))) if s.endswith(".") else str(float(s))


def _normalize_number(s: str) -> str:
    """Mirrors MAmmoTH ``delete_extra_zero``, with its ``eval`` fallback limited to 'a/b'.

    Anything that does not parse is returned unchanged, as upstream does.
    """
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
    """Every number in ``piece``, commas dropped, normalised (MAmmoTH gsm8k/svamp branch)."""
    return [_normalize_number(m) for m in _NUMBER_RE.findall(piece.replace(",", ""))]


def _extract_number(task: str, text: str) -> str | None:
    piece, found = _answer_piece(task, text)
    return _pick(_numbers(piece), found)


def _extract_letter(task: str, text: str) -> str | None:
    """Mirrors MAmmoTH's aqua branch: standalone letters A-E of the upper-cased piece.

    Upstream falls back to the raw piece when no letter is found; here that is None.
    """
    piece, found = _answer_piece(task, text)
    return _pick(_LETTER_RE.findall(piece.upper()), found)


# ----- MATH LaTeX normalisation (MAmmoTH ``_strip_string`` and helpers, from Hendrycks MATH)


def _find_box(s: str) -> str:
    """Content of the last ``boxed{...}`` with balanced braces (MAmmoTH ``find_box``)."""
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
        "\\sqrt" + (sub if not sub or sub[0] == "{" else "{" + sub[0] + "}" + sub[1:])
        for sub in rest
    )


def _remove_right_units(s: str) -> str:
    r"""Drop trailing ``\text{ units}`` (``_remove_right_units``; also ``\mbox{ units}``)."""
    return re.split(r"\\(?:text|mbox)\{ ", s)[0]


def _strip_string(s: str) -> str:
    """MATH answer normalisation, step for step MAmmoTH ``_strip_string``.

    Additions: surrounding ``$`` / ``\\(`` ``\\)`` math delimiters are dropped first, so
    "The answer is $\\frac{1}{2}$" normalises like the boxed form; a bare "%" goes too.
    """
    s = s.replace("\n", "").strip()
    s = re.sub(r"^\\\((.*)\\\)$", r"\1", s)
    s = re.sub(r"^\$+|(?<!\\)\$+$", "", s).strip()  # "$x$" -> "x", but "5\$" stays
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")  # bare "%" too: "52%" -> "52"
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:  # "k = 5" -> "5"
        s = rhs
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    return _fix_a_slash_b(s)


def _repair_escapes(s: str) -> str:
    r"""Undo JSON escapes eaten from LaTeX: ``\frac`` read as form feed + "rac", etc.

    Seen in the released MATH teacher outputs; \b and \f never occur in real text, \t and
    \r only count when a letter follows (``\times``, ``\text``, ``\right``).
    """
    s = s.replace("\f", "\\f").replace("\b", "\\b")
    return re.sub(r"[\t\r](?=[a-z])", lambda m: "\\t" if m.group() == "\t" else "\\r", s)


def _extract_math(task: str, text: str) -> str | None:
    """Mirrors MAmmoTH ``extract_math_answer`` applied to ``answer_clean``'s piece.

    boxed content if any; else, after a trigger, the text after the last '=' (a leading
    number followed by words keeps just the number); else the last number.
    """
    piece, found = _answer_piece(task, _repair_escapes(text))
    if "boxed" in piece:
        pred = _find_box(piece)
    elif found:
        pred = piece.split("=")[-1].strip()
        if re.match(r"[\d\.]+\s\D+$", pred):
            pred = pred.split(" ")[0]
    else:
        numbers = _LAST_NUMBER_RE.findall(piece)
        pred = numbers[-1] if numbers else ""
    return _pick([_strip_string(pred)], found=True)


# ------------------------------------------------------------------- reasoning-eval side


def _clean_generation(text: str) -> str:
    """Mirrors run_reasoning ``clean_generated_output`` (chat debris, stop phrases)."""
    s = re.sub(r"<start_of_turn>.*?<end_of_turn>", "", text, flags=re.DOTALL)
    s = re.sub(r"\n+", "\n", s).strip()
    s = re.sub(r"(?:\bedReader\b|\bmodel\b)+", "", s).strip()
    for stop in ("USER:", "ASSISTANT:", "### Instruction:", "Response:", "<start_of_turn>",
                 "[INST]", "<|eot_id|>", "####"):
        s = s.replace(stop, "").strip()
    return s


def _extract_label(task: str, text: str) -> str | None:
    """First 'The answer is X' with X in A-E/True/False (run_reasoning ``extract_answer_label``)."""
    m = _LABEL_RE.search(_clean_generation(text))
    return m.group(1) if m else None


_EXTRACTORS: dict[str, Callable[[str, str], str | None]] = {
    "svamp": _extract_number,
    "gsm8k": _extract_number,
    "aqua": _extract_letter,
    "math": _extract_math,
    "csqa": _extract_label,
    "obqa": _extract_label,
    "strategyqa": _extract_label,
}


# ---------------------------------------------------------------------------- public API


def extract(task: str, text: str) -> str | None:
    """The normalised answer in a model's output for ``task``; None when nothing is found."""
    return _EXTRACTORS[_check_task(task)](task, text or "")


def normalize_gold(task: str, raw: Any) -> str:
    """A dataset's raw gold answer in the form ``extract`` produces.

    svamp/gsm8k: 51.0 -> "51", "... #### 1,234" -> "1234"; aqua/csqa/obqa: "(b)" -> "B";
    math: a LaTeX answer (or a solution with a boxed answer) -> ``_strip_string`` form;
    strategyqa: True / "true" / "yes" -> "True". Raises ValueError when it cannot.
    """
    _check_task(task)
    if raw is None:
        raise ValueError(f"{task}: gold answer is None")
    if task == "strategyqa":
        if isinstance(raw, bool):
            return str(raw)
        label = {"true": "True", "yes": "True", "false": "False", "no": "False"}.get(
            str(raw).strip().lower())
        if label is None:
            raise ValueError(f"strategyqa: gold {raw!r} is not True/False")
        return label
    if isinstance(raw, bool):
        raise ValueError(f"{task}: boolean gold {raw!r}")
    s = str(raw).strip()
    if task in ("svamp", "gsm8k"):
        numbers = _numbers(s.split("####")[-1])
        if not numbers:
            raise ValueError(f"{task}: no number in gold {raw!r}")
        return numbers[0].rstrip(".").rstrip("/")
    if task == "math":
        s = _repair_escapes(s)
        if "boxed" in s:
            s = _find_box(s)
        s += "}" * (s.count("{") - s.count("}"))  # released MATH golds cut at the first "}"
        return _strip_string(s)
    return _gold_letter(task, s, "ABCD" if task == "obqa" else "ABCDE")


def _gold_letter(task: str, s: str, letters: str) -> str:
    """The choice letter in a gold string: "B", "(b)", "B.", "Option C", "- D", "is 7=D"."""
    m = (re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", s)
         or re.search(rf"(?i)option\s*\(?([{letters}])\b", s)
         or re.fullmatch(rf"[\W_]*([{letters.lower()}])[\W_]*", s))
    if not m:
        raise ValueError(f"{task}: no choice letter ({letters}) in gold {s!r}")
    return m.group(1).upper()


def _to_number(s: str) -> float | None:
    r"""MAmmoTH ``number_it`` without eval: plain, comma-grouped, a/b and \frac{a}{b}."""
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


def _numbers_match(pred: float, gold: float) -> bool:
    """MAmmoTH ``compare_two_numbers``: integer gold -> round(pred) == gold, else 4 %."""
    if gold.is_integer():
        return round(pred) == gold
    return abs(pred - gold) <= abs(gold) * _REL_TOL


def _drop_text(s: str) -> str:
    r"""``\text{A,B}`` -> ``A,B``, as MAmmoTH ``compare_answer_with_groundtruth`` does."""
    return s.replace("\\text{", "").rstrip("}") if "\\text{" in s else s


def is_correct(task: str, text: str, gold: Any) -> bool:
    """Whether the answer extracted from ``text`` matches ``gold`` (raw or normalised).

    svamp/gsm8k/aqua/math: case-insensitive equality (MAmmoTH
    ``compare_answer_with_groundtruth``); math also accepts numeric agreement
    (``compare_two_numbers``). csqa/obqa/strategyqa: exact equality with the label.
    """
    pred = extract(task, text)
    if pred is None:
        return False
    try:
        gold_s = normalize_gold(task, gold)
    except ValueError:
        gold_s = str(gold).strip()
    if task not in _MATH_TASKS:
        return pred == gold_s
    pred, gold_s = _drop_text(pred), _drop_text(gold_s)
    if pred.lower() == gold_s.lower():
        return True
    if task == "math":
        p, g = _to_number(pred), _to_number(gold_s)
        return p is not None and g is not None and _numbers_match(p, g)
    return False
