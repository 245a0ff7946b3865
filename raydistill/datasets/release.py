"""The release's training cells: ``dataset_info.json`` parsed onto our axes.

Training files are not listed by hand: they are read from the release's ``dataset_info.json``
(LLaMA-Factory's dataset table) through each task's ``release_names`` and exposed on our axes:
teacher (chatgpt = GPT-4o, gemini, llama, human, answer_only), level 1-6 (none for human /
answer_only) and format (cot, bsm, rar, sym). ``available_cells`` says which are on this machine.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from raydistill.datasets.mirror import DATASET_INFO, MalformedData, local_path, resolve
from raydistill.tasks import TASKS, get_task

log = logging.getLogger("raydistill.datasets")  # one logger for the package

TEACHERS = ("chatgpt", "gemini", "llama")  # GPT-4o, Gemini-1.5-Flash, LLaMA-3-70B
LEVELLESS = ("human", "answer_only")
LEVELS = (1, 2, 3, 4, 5, 6)
FORMATS = ("cot", "bsm", "rar", "sym")


class CellNotReleased(ValueError):
    """The release has no file for this (task, teacher, level, format)."""


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TrainFile:
    """One training cell of a task and the upstream file (and columns) that holds it."""

    teacher: str
    level: int | None
    format: str
    path: str
    prompt: str
    response: str

    @property
    def cell(self) -> tuple[str, int | None, str]:
        return (self.teacher, self.level, self.format)


# ------------------------------------------------------------------- dataset_info cells

_CELL_PATTERNS = (  # rest of a dataset_info name after "<alias>_", lower-cased
    (re.compile(r"(chatgpt|gemini|llama)_level(\d)"), lambda m, lv: (m[1], int(m[2]), "cot")),
    (re.compile(r"human"), lambda m, lv: ("human", None, "cot")),
    (re.compile(r"only_?ans"), lambda m, lv: ("answer_only", None, "cot")),
    # format runs: "level5_sym", or "gemma_sym"/"bloom_sym" whose level is in the file name
    (re.compile(r"(?:level\d|gemma|bloom)_(bsm|rar|sym)"), lambda m, lv: ("chatgpt", lv, m[1])),
)


def _parse_info_name(name: str, file_name: str) -> tuple[str, tuple] | None:
    """(task, cell) for one dataset_info entry, or None when no task claims it."""
    level = re.search(r"level_?(\d)", file_name, re.IGNORECASE)
    found = None
    for task in TASKS.values():
        for alias in task.release_names:
            if not name.lower().startswith(alias + "_"):
                continue
            rest = name.lower()[len(alias) + 1:]
            for pattern, cell in _CELL_PATTERNS:
                m = pattern.fullmatch(rest)
                if m:
                    if found:
                        raise MalformedData(f"{DATASET_INFO}: {name!r} matches two tasks")
                    found = (task.name, cell(m, int(level[1]) if level else None))
    return found


@lru_cache(maxsize=8)
def _train_files(info_path: Path) -> dict[str, dict[tuple, TrainFile]]:
    info = json.loads(info_path.read_text())
    by_task: dict[str, dict[tuple, TrainFile]] = {name: {} for name in TASKS}
    for name, entry in info.items():
        parsed = _parse_info_name(name, entry["file_name"])
        if parsed is None:
            log.debug("%s: entry %r maps to no registered task", DATASET_INFO, name)
            continue
        task, cell = parsed
        columns = entry.get("columns", {})
        tf = TrainFile(*cell, path="distilling-cot/train/" + entry["file_name"],
                       prompt=columns.get("prompt", "instruction"),
                       response=columns.get("response", "output"))
        if cell in by_task[task]:
            raise MalformedData(f"{DATASET_INFO}: {name!r} repeats {task} cell {cell}")
        by_task[task][cell] = tf
    return by_task


def _cell_order(cell: tuple) -> tuple:
    teacher, level, fmt = cell
    return ((TEACHERS + LEVELLESS).index(teacher), level or 0, FORMATS.index(fmt))


def train_files(task: str) -> list[TrainFile]:
    """Every training cell of ``task`` that the release lists, in axis order."""
    files = _train_files(resolve(DATASET_INFO))[get_task(task).name]
    return [files[c] for c in sorted(files, key=_cell_order)]


def train_file(task: str, teacher: str, level: int | None = None, fmt: str = "cot") -> TrainFile:
    """The file of one cell; a ValueError lists the task's cells when it does not exist."""
    if teacher in TEACHERS and level not in LEVELS:
        raise ValueError(f"teacher {teacher!r} needs a level in 1-6, got {level!r}")
    if teacher in LEVELLESS and level is not None:
        raise ValueError(f"teacher {teacher!r} has no levels, got level={level!r}")
    if teacher not in TEACHERS + LEVELLESS or fmt not in FORMATS:
        raise ValueError(f"unknown teacher/format {teacher!r}/{fmt!r}; "
                         f"teachers {TEACHERS + LEVELLESS}, formats {FORMATS}")
    for tf in train_files(task):
        if tf.cell == (teacher, level, fmt):
            return tf
    cells = ", ".join(cell_name(tf.cell) for tf in train_files(task))
    raise CellNotReleased(f"{task} has no released cell {cell_name((teacher, level, fmt))}; cells: {cells}")


def cell_name(cell: tuple) -> str:
    teacher, level, fmt = cell
    return teacher + (f"/L{level}" if level else "") + ("" if fmt == "cot" else f"/{fmt}")


# ------------------------------------------------------------------------- availability


@dataclass(frozen=True)
class CellStatus:
    """A training cell the release lists, and where its file is (None: upstream only)."""

    teacher: str
    level: int | None
    format: str
    path: str
    where: str | None  # "mirror" | "cache" | None

    @property
    def offline(self) -> bool:
        return self.where is not None


def available_cells(task: str) -> list[CellStatus]:
    """Every (teacher, level, format) of ``task`` upstream, and which are on this machine."""
    out = []
    for tf in train_files(task):
        found = local_path(tf.path)
        out.append(CellStatus(tf.teacher, tf.level, tf.format, tf.path,
                              found[1] if found else None))
    return out
