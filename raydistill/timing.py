"""Seconds per stage, added up where the work happens (`Stopwatch`), for a trial's time breakdown
(`raydistill.records.TIME_STAGES`)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """``with clock("model_load"): ...`` adds the block's seconds to ``clock.seconds["model_load"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)
