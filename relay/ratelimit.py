"""Sliding-window rate limits: no more than N sends in any window of length W.

Pure: the caller passes the time. Every window is exact (it keeps the send times that
fall inside it), so limits hold over *any* window, not just aligned buckets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

# Float tolerance: waiting exactly wait_time() must make the next send allowed.
_EPSILON = 1e-6
# Limits are counted when a send starts, but the upstream counts arrivals, which lag by
# the transaction's varying latency; each window is held this much longer so the limit
# holds at the upstream's end too.
SAFETY_MARGIN_S = 0.05


class RateLimiter:
    def __init__(self, windows: Iterable[tuple[float, int]]) -> None:
        self._nominal = [(float(w), int(n)) for w, n in windows]
        self._windows = [(w + SAFETY_MARGIN_S, n, deque[float]()) for w, n in self._nominal]

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    def _prune(self, now: float) -> None:
        for window, _, sent in self._windows:
            while sent and sent[0] + window <= now + _EPSILON:
                sent.popleft()

    def wait_time(self, now: float) -> float:
        """Seconds until one more send is allowed (0.0: now)."""
        self._prune(now)
        wait = 0.0
        for window, limit, sent in self._windows:
            if len(sent) >= limit:
                wait = max(wait, sent[len(sent) - limit] + window - now)
        return wait

    def available(self, now: float) -> int:
        """How many sends are allowed right now, all windows considered."""
        self._prune(now)
        room = [limit - len(sent) for _, limit, sent in self._windows]
        return max(min(room), 0) if room else 1_000_000

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
