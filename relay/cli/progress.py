"""A progress bar for long `relay queue` operations: drawn on a terminal, silent when piped.

Standard library only, like the rest of the CLI (argparse): the store reports once per
window of thousands of messages, so all that is needed is one line redrawn with ``\\r``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

MIN_REDRAW_S = 0.1  # at most ten redraws a second, however fast the store reports
DEFAULT_WIDTH = 80


def render(label: str, done: int, total: int | None, elapsed: float, width: int,
           fill: str = "#", empty: str = "-") -> str:
    """One line of at most ``width - 1`` characters (the last column would wrap).

    >>> render("delete", 50, 200, 1.5, 40)
    'delete  25% [###---------]  50/200 1.5s'
    """
    tail = f" {elapsed:.1f}s"
    if total is None:  # nothing to measure against: a count
        return f"{label}: {done} done{tail}"[: width - 1]
    total = max(total, done)
    fraction = done / total if total else 1.0
    count = f" {done:>{len(str(total))}}/{total}"
    head = f"{label} {fraction:4.0%} "
    room = width - 1 - len(head) - len(count) - len(tail) - 2
    if room < 5:  # too narrow for a bar: the numbers alone
        return f"{head}{count.strip()}{tail}"[: width - 1]
    filled = int(room * fraction)
    return f"{head}[{fill * filled}{empty * (room - filled)}]{count}{tail}"


class ProgressBar:
    """Call it with the number done so far (``relay.queue.store.Progress``); use it as a context.

    Draws only when ``stream`` is a terminal, and clears its line when done, so the
    command's own result line is all that stays.
    """

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._clock = clock
        self._started = clock()
        self._drawn_at: float | None = None
        self._shown = ""
        self.done = 0
        encoding = (getattr(self.stream, "encoding", None) or "").lower().replace("-", "")
        self._chars = ("\u2588", "\u2591") if encoding == "utf8" else ("#", "-")

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or DEFAULT_WIDTH
        except (OSError, ValueError):
            return DEFAULT_WIDTH

    def _draw(self, force: bool = False) -> None:
        if self.total == 0 and self.done == 0:  # nothing to do: no bar for it
            return
        now = self._clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < MIN_REDRAW_S:
            return
        self._drawn_at = now
        line = render(self.label, self.done, self.total, now - self._started, self._width(),
                      *self._chars)
        self.stream.write("\r" + line.ljust(len(self._shown)))
        self.stream.flush()
        self._shown = line

    def __call__(self, done: int) -> None:
        self.done = done
        if self.enabled:
            self._draw()

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._draw(force=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.enabled or not self._shown:
            return
        if kind is None:
            self._draw(force=True)  # the final count, however quick the last window was
        self.stream.write("\r" + " " * len(self._shown) + "\r")
        self.stream.flush()
