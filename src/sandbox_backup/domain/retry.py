"""Retry decisions for failed backup attempts: bounded, exponential back-off with jitter."""

from __future__ import annotations

import dataclasses
import datetime
import random


@dataclasses.dataclass(frozen=True)
class RetryDecision:
    """Whether to queue another attempt, and not before when."""

    retry: bool
    next_attempt_at: datetime.datetime | None = None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Attempts per backup and the spacing between them.

    The delay before attempt n+1 is `base_delay_s * 2**(n-1)`, capped at `max_delay_s`, then
    scaled by a random factor in [1 - jitter, 1 + jitter] so that many sandboxes failing together
    do not retry together.
    """

    max_attempts: int = 5
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0
    jitter: float = 0.2

    def delay_s(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Return the back-off after failed attempt number `attempt` (1-based)."""
        # The exponent stops growing long before a float overflows; the cap applies far earlier.
        base = min(self.max_delay_s, self.base_delay_s * 2 ** min(max(0, attempt - 1), 60))
        factor = 1.0 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * factor)

    def decide(
        self, *, attempt: int, transient: bool, now: datetime.datetime, rng: random.Random | None = None
    ) -> RetryDecision:
        """Decide what follows failed attempt number `attempt`."""
        if not transient:
            return RetryDecision(False, reason="permanent error")

        if attempt >= self.max_attempts:
            return RetryDecision(False, reason=f"gave up after {attempt} attempts")

        delay = self.delay_s(attempt, rng=rng)
        return RetryDecision(True, next_attempt_at=now + datetime.timedelta(seconds=delay), reason=f"retry in {delay:.0f} s")
