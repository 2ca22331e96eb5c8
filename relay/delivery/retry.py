"""Retry policy: what to do after a delivery attempt. Pure: time and randomness come in."""

from __future__ import annotations

import random
from dataclasses import dataclass

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
    """Plain values (seconds): the scheduler translates the config's retry block once."""

    initial_delay: float
    max_delay: float
    max_age: float
    jitter: float = 0.2

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
        age_now: float | None = None,
    ) -> Decision:
        """Fail permanent errors and expired messages; defer everything else.

        ``now`` places the next attempt (it is stored); ``age_now`` (default ``now``) is
        the clock the message's age is read on, so that a forward jump of the wall clock
        can be left out of it (AccountWorker.age_clock).
        """
        reason = error.reply_text()
        if not error.temporary:
            return Fail(reason)
        age = (now if age_now is None else age_now) - created_at
        delay = self.next_delay(attempts, rng)
        if age + delay > self.max_age:
            if age >= self.max_age:
                return Fail(f"expired after {attempts} attempts; last error: {reason}")
            # One last attempt right at the deadline rather than giving up early.
            delay = self.max_age - age
        return Defer(now + delay, reason)
