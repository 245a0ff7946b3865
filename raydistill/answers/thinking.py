"""A thinking student's generation: the think block and the answer after it.

A student trained on reasoning traces (supervision ``long`` or ``mix``, or a model that thinks
natively) writes ``<think> trace </think> answer``. Its answer is graded from the text after the
block only; a generation cut inside the block has no answer and is flagged, never graded from the
numbers of its trace (docs/grading.md).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_MARKERS: tuple[str, str] = ("<think>", "</think>")


@dataclass(frozen=True)
class ThinkSplit:
    think: str | None  # the trace; None when the generation has no think block
    answer: str  # the text to grade ("" when the block never closed)
    unfinished: bool  # the block opened and never closed: no answer


def split_think(text: str, markers: tuple[str, str] = THINK_MARKERS) -> ThinkSplit:
    """Split at the first close marker. No markers at all: the whole text is the answer (a mixed
    student may answer without thinking). A close marker without an open one: the open marker was
    in the prompt (chat templates of native thinkers put it there). An open marker without a close
    one: the generation ended inside its trace."""
    open_, close = markers
    start = text.find(open_)
    end = text.find(close, start + len(open_) if start >= 0 else 0)
    if end >= 0:
        trace_start = start + len(open_) if start >= 0 else 0
        return ThinkSplit(text[trace_start:end].strip(), text[end + len(close):].strip(), False)
    if start >= 0:
        return ThinkSplit(text[start + len(open_):].strip(), "", True)
    return ThinkSplit(None, text, False)
