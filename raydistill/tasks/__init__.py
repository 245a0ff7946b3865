"""The task registry: one module per dataset, each defining ``TASK`` (a `Task`).

Every stage reads a task from here: data files (`raydistill.datasets`), grading
(`raydistill.answers`), the paper's evaluation protocol (`raydistill.evaluate`), teacher
exemplars (`raydistill.prompts`) and answer-only targets. Adding a dataset is one new module
in this package and its name in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from raydistill.tasks.base import COMMONSENSE_PROTOCOL, MATH_PROTOCOL, EvalProtocol, Task, TestSet

__all__ = ["TASKS", "TASK_NAMES", "Task", "TestSet", "EvalProtocol", "MATH_PROTOCOL", "COMMONSENSE_PROTOCOL",
           "get_task"]

_MODULES = ("svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa")  # the paper's order

TASKS: dict[str, Task] = {}
for _module in _MODULES:
    _task = importlib.import_module(f"{__name__}.{_module}").TASK
    TASKS[_task.name] = _task
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The registry entry of ``name``; a ValueError names the known tasks."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
