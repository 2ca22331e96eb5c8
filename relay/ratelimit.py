"""Sliding-window rate limits: no more than N sends in any window of length W.

Pure: the caller passes the time. Every window is exact (it keeps the send times that
fall inside it), so limits hold over *any* window, not just aligned buckets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class RateLimiter:
    def __init__(self, windows: Iterable[tuple[float, int]]) -> None:
        self._windows = [(float(w), int(n), deque[float]()) for w, n in windows]

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    def _prune(self, now: float) -> None:
        for window, _, sent in self._windows:
            while sent and sent[0] <= now - window:
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

    def backlog_windows(self, queued: int) -> bool:
        """True when more than one full window's worth is waiting (for on_limit: reject)."""
        return any(queued > limit for _, limit, _ in self._windows)

    @property
    def longest_window(self) -> float:
        return max((w for w, _, _ in self._windows), default=0.0)
