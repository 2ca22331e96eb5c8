"""Failed logins per client address, like Postfix's anvil: too many, and the address waits.

Pure: time comes in as ``now`` (monotonic seconds); the listener applies the answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import MutableMapping
from typing import Any

# Addresses remembered at most; beyond it the longest-known is forgotten, so a scan from
# many addresses cannot grow the table without bound.
MAX_CLIENTS = 10_000


class FailureThrottle:
    """After ``limit`` failures within ``window`` seconds, a key is locked for ``lockout``."""

    def __init__(self, limit: int, window: float, lockout: float) -> None:
        self.limit, self.window, self.lockout = limit, window, lockout
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def configure(self, limit: int, window: float, lockout: float) -> None:
        """New limits (a reload); failures and lockouts so far are kept."""
        self.limit, self.window, self.lockout = limit, window, lockout

    def locked(self, key: str, now: float) -> bool:
        until = self._locked_until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._locked_until[key]
        return False

    def failed(self, key: str, now: float) -> bool:
        """Record a failure; True when it locks the key."""
        times = self._failures.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            self._locked_until[key] = now + self.lockout
            self._forget_oldest(self._locked_until)
            return True
        self._failures[key] = times  # re-inserted: the dict stays in order of last failure
        self._forget_oldest(self._failures)
        return False

    @staticmethod
    def _forget_oldest(table: MutableMapping[str, Any]) -> None:
        if len(table) > MAX_CLIENTS:
            del table[next(iter(table))]
