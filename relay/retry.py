"""Retry policy: what to do after a delivery attempt. Pure: time and randomness come in."""

from __future__ import annotations

import random
from dataclasses import dataclass

from relay.config import RetryConfig
from relay.errors import DeliveryError


@dataclass(frozen=True)
class Defer:
    until: float
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


Decision = Defer | Fail


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float
    max_delay: float
    max_age: float
    jitter: float = 0.2

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(cfg.initial_delay, cfg.max_delay, cfg.max_age, cfg.jitter)

    def next_delay(self, attempts: int, rng: random.Random) -> float:
        """Delay after the given number of failed attempts (1 = after the first)."""
        exponent = max(attempts - 1, 0)
        base = self.max_delay if exponent >= 64 else self.initial_delay * (2**exponent)
        base = min(base, self.max_delay)
        if self.jitter:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)

    def decide(
        self,
        error: DeliveryError,
        *,
        attempts: int,
        created_at: float,
        now: float,
        rng: random.Random,
    ) -> Decision:
        """Fail permanent errors and expired messages; defer everything else."""
        reason = error.reply_text()
        if not error.temporary:
            return Fail(reason)
        until = now + self.next_delay(attempts, rng)
        if until - created_at > self.max_age:
            if now - created_at >= self.max_age:
                return Fail(f"expired after {attempts} attempts; last error: {reason}")
            # One last attempt right at the deadline rather than giving up early.
            until = created_at + self.max_age
        return Defer(until, reason)
