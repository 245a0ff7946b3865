"""Teacher prompts for the annotation stage: granularity levels, formats and one-shot exemplars.

The prompt texts live in files under ``raydistill/data/prompts/`` (override with ``prompt_dir``)::

    system.md                 the system message; {level_instruction}, {format_instruction}, {answer_rule}
    answer_only.md            the system message of the answer-only probe (hybrid granularity)
    gold_hint.md              a user turn that also shows the gold answer ({question}, {answer}); only
                              with ``show_gold`` (opt-in: the released annotations suggest the
                              paper's teachers saw it)
    levels/level1..6.md       one instruction per granularity level (1 = minimal, 6 = very detailed)
    formats/<format>.md       one instruction per format: cot, least_to_most, rar, bsm, sym
    exemplars/<family>.yaml   the one-shot example per task family (math_numeric, multiple_choice,
                              yes_no, math_latex); exemplars/<task>.yaml overrides it for a task

A request is a chat: system message (level + format instructions), the exemplar question as a
user turn, the exemplar's solution at the requested level (cot) or in the requested format
(other formats) as the assistant turn, then the real question as the last user turn. The
exemplar family of a task comes from the task registry (`raydistill.tasks`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from raydistill.resources import package_data
from raydistill.tasks import TASK_NAMES, get_task

LEVELS = (1, 2, 3, 4, 5, 6)
FORMATS = ("cot", "least_to_most", "rar", "bsm", "sym")
TASKS = TASK_NAMES

DEFAULT_PROMPT_DIR = package_data("prompts")

_STEP = re.compile(r"^\d+\.\s")


class PromptError(ValueError):
    """A prompt file is missing or malformed."""


def unwrap(text: str) -> str:
    """Re-join a hard-wrapped block.

    Wrapped lines join with a space; a line starting with "N. " or following a blank line starts
    a new line.
    """
    out: list[str] = []
    new_line = True
    for raw in str(text).strip().splitlines():
        line = raw.strip()
        if not line:
            new_line = True
            continue
        if out and not new_line and not _STEP.match(line):
            out[-1] = out[-1] + " " + line
        else:
            out.append(line)
        new_line = False
    return "\n".join(out)


@dataclass(frozen=True)
class Exemplar:
    family: str
    question: str
    answer: str
    answer_rule: str
    levels: dict[int, str]
    formats: dict[str, str]
    source: str  # file name the exemplar came from


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {path}") from None


def _stamp(path: Path) -> int:
    """The file's mtime, so the caches below read an edited prompt file again."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@functools.lru_cache(maxsize=64)
def _exemplar(path: Path, stamp: int, family: str) -> Exemplar:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"no exemplar of family {family!r}: {path} not found") from None
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: invalid YAML: {e}") from None
    missing = [k for k in ("question", "answer", "answer_rule", "levels", "formats") if k not in data]
    if missing:
        raise PromptError(f"{path}: missing keys {missing}")
    levels = {int(k): unwrap(v) for k, v in data["levels"].items()}
    if sorted(levels) != list(LEVELS):
        raise PromptError(f"{path}: levels must be exactly 1..6, got {sorted(levels)}")
    formats = {str(k): unwrap(v) for k, v in data["formats"].items()}
    need = set(FORMATS) - {"cot"}
    if not need <= set(formats):
        raise PromptError(f"{path}: formats missing {sorted(need - set(formats))}")
    return Exemplar(
        family=str(data.get("family", family)),
        question=unwrap(data["question"]),
        answer=str(data["answer"]),
        answer_rule=str(data["answer_rule"]),
        levels=levels,
        formats=formats,
        source=path.name,
    )


def exemplar(task: str, prompt_dir: str | Path | None = None) -> Exemplar:
    """The one-shot exemplar of ``task``: exemplars/<task>.yaml, else its family's file."""
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    root = Path(prompt_dir or DEFAULT_PROMPT_DIR) / "exemplars"
    family = get_task(task).exemplars
    path = root / f"{task}.yaml"
    if not path.exists():
        path = root / f"{family}.yaml"
    return _exemplar(path, _stamp(path), family)


def _file(prompt_dir: str, rel: str) -> str:
    path = Path(prompt_dir) / rel
    return _read_file(path, _stamp(path))


@functools.lru_cache(maxsize=256)
def _read_file(path: Path, stamp: int) -> str:
    return _read(path)


def _check(level: int, fmt: str) -> None:
    if level not in LEVELS:
        raise PromptError(f"granularity level must be one of {LEVELS}, got {level!r}")
    if fmt not in FORMATS:
        raise PromptError(f"format must be one of {FORMATS}, got {fmt!r}")


def system_message(task: str, level: int, fmt: str, prompt_dir: str | Path | None = None) -> str:
    _check(level, fmt)
    d = str(prompt_dir or DEFAULT_PROMPT_DIR)
    ex = exemplar(task, d)
    return _file(d, "system.md").format(
        level_instruction=_file(d, f"levels/level{level}.md"),
        format_instruction=_file(d, f"formats/{fmt}.md"),
        answer_rule=ex.answer_rule,
    )


def build_messages(
    task: str, level: int, fmt: str, question: str, prompt_dir: str | Path | None = None,
    gold: str | None = None,
) -> list[dict[str, str]]:
    """The chat for one teacher request at granularity ``level`` in format ``fmt``.

    With ``gold`` the user turns also show the answer (``gold_hint.md``): the exemplar's own
    answer in the one-shot turn, ``gold`` in the real one.
    """
    _check(level, fmt)
    ex = exemplar(task, prompt_dir)
    shot = ex.levels[level] if fmt == "cot" else ex.formats[fmt]
    return [
        {"role": "system", "content": system_message(task, level, fmt, prompt_dir)},
        {"role": "user", "content": _user_turn(ex.question, ex.answer if gold is not None else None, prompt_dir)},
        {"role": "assistant", "content": shot},
        {"role": "user", "content": _user_turn(question.strip(), gold, prompt_dir)},
    ]


def _user_turn(question: str, gold: str | None, prompt_dir: str | Path | None) -> str:
    if gold is None:
        return question
    hint = _file(str(prompt_dir or DEFAULT_PROMPT_DIR), "gold_hint.md")
    return hint.replace("{question}", question).replace("{answer}", str(gold))


def answer_only_messages(task: str, question: str, prompt_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The chat of the answer-only probe: the teacher answers without reasoning."""
    d = str(prompt_dir or DEFAULT_PROMPT_DIR)
    ex = exemplar(task, d)
    return [
        {"role": "system", "content": _file(d, "answer_only.md").format(answer_rule=ex.answer_rule)},
        {"role": "user", "content": ex.question},
        {"role": "assistant", "content": f"The answer is {ex.answer}"},
        {"role": "user", "content": question.strip()},
    ]


def template_fingerprint(task: str, level: int | None, fmt: str, prompt_dir: str | Path | None = None,
                         show_gold: bool = False) -> str:
    """sha256 of the prompt texts a (task, level, format) request uses; part of a cell's identity.

    ``level=None`` fingerprints the answer-only probe; ``show_gold`` the variant with the gold hint.
    """
    if level is None:
        msgs = answer_only_messages(task, "{question}", prompt_dir)
    else:
        msgs = build_messages(task, level, fmt, "{question}", prompt_dir, gold="{answer}" if show_gold else None)
    return hashlib.sha256(json.dumps(msgs, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
