"""The spending cap of a run (`annotation.max_spend_usd`, `raydistill annotate --max-spend`).

Before each request an actor asks the run's `SpendGate` (one Ray actor per run) for room: the
request goes out only if what the run has spent plus the bound of every request in flight, this
one included, stays within the cap. A request's bound is its input tokens (litellm's
``token_counter`` on the real messages) at the input price plus ``max_tokens`` at the output
price: the most it can cost, since a reply is never longer than ``max_tokens``. When a reply comes
back its bound is released and its real price is added to what was spent. The first request that
does not fit closes the gate: nothing new is sent after it, what is in flight finishes, and the
driver writes every answered row and stops with `SpendCapReached`.

The cap is per run of the command, over all its cells: what earlier runs paid (rows now served
from the cache) does not count, and cached rows cost nothing.
"""

from __future__ import annotations

import time
from typing import Any

from raydistill.spec.annotation import TeacherSpec
from raydistill.spec.base import SpecError


class SpendCapReached(RuntimeError):
    """The run stopped at its spending cap; every answered row is written (cells with rows left
    have ``complete: false`` in their summary.json) and the cache holds every reply."""

    def __init__(self, spent: float, cap: float, rows_left: int, cells_left: int, run: Any = None):
        self.spent, self.cap, self.rows_left, self.cells_left, self.run = spent, cap, rows_left, cells_left, run
        super().__init__(
            f"stopped at the spending cap: spent ${spent:.4f} of ${cap:.4f} in this run; {rows_left} row(s) left "
            f"in {cells_left} cell(s); rerun with a higher --max-spend (annotation.max_spend_usd) to continue: "
            "answered requests come from the cache")


def token_prices(t: TeacherSpec) -> tuple[float, float] | None:
    """(USD per input token, USD per output token) of a teacher's synchronous requests: the
    declared prices, else litellm's price table; None when neither prices it."""
    if t.input_cost_per_token is not None or t.output_cost_per_token is not None:
        return float(t.input_cost_per_token or 0.0), float(t.output_cost_per_token or 0.0)
    info = _model_info(t.model)
    if info is None or info.get("input_cost_per_token") is None or info.get("output_cost_per_token") is None:
        return None
    return float(info["input_cost_per_token"]), float(info["output_cost_per_token"])


def _model_info(model: str) -> dict[str, Any] | None:
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    try:
        return dict(litellm.get_model_info(model))
    except Exception:  # noqa: BLE001 - litellm raises several kinds for a model it does not know
        return None


def check_priced(teachers: list[TeacherSpec], cap: float | None, field: str = "max_spend_usd") -> None:
    """A cap on a teacher without a price could never be kept: refuse it before any request."""
    if cap is None:
        return
    for t in teachers:
        if token_prices(t) is None:
            raise SpecError(
                f"{field}: teacher {t.model} has no price in litellm's table, so a spending cap "
                "cannot be kept; set teacher.input_cost_per_token and teacher.output_cost_per_token, or drop the cap")


def request_bound(t: TeacherSpec, prices: tuple[float, float], messages: list[dict[str, str]]) -> float:
    """The most one request can cost: its input tokens priced, plus max_tokens priced as output."""
    import litellm

    try:
        tokens_in = int(litellm.token_counter(model=t.model, messages=messages))
    except Exception:  # noqa: BLE001 - no tokenizer: every byte a token, an upper bound
        tokens_in = sum(len(m["content"].encode()) for m in messages) + 8 * len(messages)
    return tokens_in * prices[0] + t.max_tokens * prices[1]


class SpendGate:
    """Ray actor (one per run): spent + bounds in flight <= cap, checked before every request."""

    def __init__(self, cap: float):
        self.cap = float(cap)
        self.spent = 0.0
        self.reserved = 0.0
        self.in_flight = 0
        self.closed_at: float | None = None
        self.in_flight_at_close = 0
        self.refused = 0

    def reserve(self, bound: float) -> bool:
        """Room for a request of this bound? Once one is refused, every later one is too."""
        if self.closed_at is None and self.spent + self.reserved + bound > self.cap:
            self.closed_at = time.time()
            self.in_flight_at_close = self.in_flight
        if self.closed_at is not None:
            self.refused += 1
            return False
        self.reserved += bound
        self.in_flight += 1
        return True

    def settle(self, bound: float, cost: float) -> None:
        """A request that was let through has finished: its bound is released, its price spent."""
        self.reserved = max(0.0, self.reserved - bound)
        self.in_flight -= 1
        self.spent += float(cost)

    def state(self) -> dict[str, Any]:
        return {"cap": self.cap, "spent": self.spent, "reserved": self.reserved, "in_flight": self.in_flight,
                "closed_at": self.closed_at, "in_flight_at_close": self.in_flight_at_close,
                "refused": self.refused}
