"""Sliding-window rate limits: no more than N sends in any window of length W.

Pure: the caller passes the time. Every window is exact (it keeps the send times that
fall inside it), so limits hold over *any* window, not just aligned buckets.

A send counts from its claim (``reserve``) to its end (``complete``), and is recorded at
the time it *ended*: the upstream counts a message when it arrives, which is after the
claim by the connection set-up and the transaction, so a send recorded at its claim
could leave its window before it had even arrived and let the next batch in beside it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from relay.delivery.throttle import scaled

# Float tolerance: waiting exactly wait_time() must make the next send allowed.
_EPSILON = 1e-6
# Sends are recorded when they end, at or after their arrival upstream; each window is
# held this much longer still, for the upstream's own clock and processing.
SAFETY_MARGIN_S = 0.05
# wait_time() when every allowed send is still under way: until one ends (it wakes us).
UNTIL_A_SEND_ENDS = float("inf")


def share_for_others(limit: int, reserve_for_high: float) -> int:
    """What normal and low-priority mail may use of a window of ``limit`` sends when
    ``reserve_for_high`` (a fraction) is kept for high priority: rounded down, but at
    least 1 (a window of 1 cannot be shared; the longer windows keep the reserve)."""
    if reserve_for_high <= 0:
        return limit
    return max(1, int(limit * (1 - reserve_for_high) + 1e-9))


class RateLimiter:
    def __init__(self, windows: Iterable[tuple[float, int]], reserve_for_high: float = 0.0
                 ) -> None:
        self._nominal = [(float(w), int(n)) for w, n in windows]
        self._windows = [(w + SAFETY_MARGIN_S, n, deque[float]()) for w, n in self._nominal]
        self.in_flight = 0  # reserved, not yet complete: counts in every window
        # rate_limit.reserve_for_high: the share of each window only high priority may use.
        self.reserve_for_high = reserve_for_high
        # Adaptive throttling (relay.delivery.throttle): the share of each limit in use.
        self.factor = 1.0

    def _limit(self, limit: int, others: bool) -> int:
        limit = scaled(limit, self.factor)
        return share_for_others(limit, self.reserve_for_high) if others else limit

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    @property
    def windows(self) -> list[tuple[float, int]]:
        """(seconds, limit) of each window, safety margin included: what a claim checks
        against the queue's record of every process's sends (QueueStore.claim_due), at
        the throttle's factor."""
        return [(w, scaled(n, self.factor)) for w, n, _ in self._windows]

    def _prune(self, now: float) -> None:
        for window, _, sent in self._windows:
            while sent and sent[0] + window <= now + _EPSILON:
                sent.popleft()

    def wait_time(self, now: float, *, others: bool = False) -> float:
        """Seconds until one more send is allowed (0.0: now; UNTIL_A_SEND_ENDS: when one
        of the sends under way ends). ``others``: a send of normal or low priority, which
        may not use the share reserved for high priority."""
        self._prune(now)
        wait = 0.0
        for window, limit, sent in self._windows:
            over = len(sent) + self.in_flight - self._limit(limit, others)  # must leave
            if over >= len(sent):
                return UNTIL_A_SEND_ENDS
            if over >= 0:
                wait = max(wait, sent[over] + window - now)
        return wait

    def available(self, now: float, *, others: bool = False) -> int:
        """How many sends are allowed right now, all windows considered (``others``: of
        normal or low priority)."""
        self._prune(now)
        room = [self._limit(limit, others) - len(sent) - self.in_flight
                for _, limit, sent in self._windows]
        return max(min(room), 0) if room else 1_000_000

    def reserve(self, count: int = 1) -> None:
        """Sends claimed: they count in every window until they end or are cancelled."""
        self.in_flight += count

    def complete(self, now: float) -> None:
        """A reserved send ended (delivered or not): it counts from ``now``."""
        self.in_flight = max(self.in_flight - 1, 0)
        self.record(now)

    def cancel(self, count: int = 1) -> None:
        """Reserved sends given back unsent: they do not count."""
        self.in_flight = max(self.in_flight - count, 0)

    def record(self, now: float) -> None:
        for _, _, sent in self._windows:
            sent.append(now)

    def restore(self, times: Iterable[float], now: float) -> None:
        """Load past send times (from the queue file) so limits hold across restarts."""
        for t in sorted(times):
            if t <= now:
                self.record(t)
        self._prune(now)

    def window_capacity(self) -> int | None:
        """How many sends all limits together allow over the longest window (None: no limit).

        per_second 10 alone: 10; per_minute 100 with per_day 2000: 2000. A backlog larger
        than this is 'more than one window's worth behind' (rate_limit.on_limit: reject).
        """
        if not self._nominal:
            return None
        longest = max(w for w, _ in self._nominal)
        return min(int(limit * longest / window + 1e-9) for window, limit in self._nominal)

    @property
    def longest_window(self) -> float:
        return max((w for w, _, _ in self._windows), default=0.0)
