"""Rate limits shared by every teacher-calling actor: token buckets (requests and tokens per
minute) per teacher, held by one named Ray actor.
"""

from __future__ import annotations

import hashlib
import logging
import time

from raydistill.spec.annotation import TeacherSpec

log = logging.getLogger(__name__)


LIMITER_NAMESPACE = "raydistill"


class TokenBucket:
    """Reservation-style token bucket: ``reserve(n)`` takes n units now and returns how long the
    caller must wait before using them (0 when the bucket had them). Over any window of W seconds
    at most ``capacity + rate * W`` units start."""

    def __init__(self, rate_per_s: float, capacity: float, clock=time.monotonic):
        self.rate = rate_per_s
        self.capacity = max(capacity, 1.0)
        self.clock = clock
        self.level = self.capacity
        self.t = clock()

    def reserve(self, n: float) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) units after the fact, e.g. actual tokens."""
        self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Requests/min and tokens/min for one model, shared by every actor as a named Ray actor."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, burst_s: float = 1.0):
        self.req = None
        self.tok = None
        if requests_per_minute:
            r = requests_per_minute / 60.0
            self.req = TokenBucket(r, r * burst_s)
        if tokens_per_minute:
            r = tokens_per_minute / 60.0
            self.tok = TokenBucket(r, r * burst_s)

    def reserve(self, tokens: float) -> float:
        d = 0.0
        if self.req:
            d = max(d, self.req.reserve(1))
        if self.tok:
            d = max(d, self.tok.reserve(tokens))
        return d

    def adjust(self, delta_tokens: float) -> None:
        if self.tok:
            self.tok.adjust(delta_tokens)


def limiter_name(teacher: TeacherSpec) -> str:
    ident = f"{teacher.model}|{teacher.api_base or ''}"
    return "raydistill-ratelimit-" + hashlib.sha256(ident.encode()).hexdigest()[:16]
