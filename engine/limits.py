"""Per-owner (per API key) limits on generation requests: a rate (token bucket) and a number running
at once. The engine is one replica, so these hold for the whole deployment, however many ingress
replicas there are."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field

from .generation import RateLimited


class OwnerLimits(BaseModel):
    requests_per_s: float | None = Field(None, gt=0, description="sustained request rate per key; None = no limit")
    burst: int = Field(10, ge=1, description="requests a key may send at once above its rate")
    max_concurrent: int | None = Field(None, ge=1, description="requests of one key running at once; None = no limit")


@dataclass
class _Owner:
    tokens: float
    refilled_at: float
    running: int = 0


class OwnerGate:
    """`enter` before a request runs (raises RateLimited, with when to retry), `leave` after it."""

    def __init__(self, limits: OwnerLimits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self.owners: dict[str, _Owner] = {}

    def enter(self, owner: str) -> None:
        limits, now = self.limits, self.clock()
        state = self.owners.setdefault(owner, _Owner(tokens=limits.burst, refilled_at=now))
        if limits.max_concurrent is not None and state.running >= limits.max_concurrent:
            raise RateLimited(f"this key already has {state.running} requests running (at most "
                              f"{limits.max_concurrent}); try again when one finishes", 1.0)
        if limits.requests_per_s is not None:
            rate = limits.requests_per_s
            state.tokens = min(limits.burst, state.tokens + (now - state.refilled_at) * rate)
            state.refilled_at = now
            if state.tokens < 1:
                raise RateLimited(f"this key may send {rate:g} requests per second (bursts of {limits.burst})",
                                  (1 - state.tokens) / rate)
            state.tokens -= 1
        state.running += 1

    def leave(self, owner: str) -> None:
        state = self.owners[owner]
        state.running -= 1
        if state.running == 0 and (self.limits.requests_per_s is None or state.tokens >= self.limits.burst):
            del self.owners[owner]  # nothing to remember: a key that comes back starts full
