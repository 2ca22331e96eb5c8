"""SIGHUP from the moment the `relay` command starts, before the event loop is up.

Importing the command line takes ~0.4 s (pydantic, yaml...), and a SIGHUP's default
action then is to end the process (exit 129): a `systemctl reload` right after a start
killed relay. This module is imported first and only notes the signal; `relay serve`
applies a noted one as a reload once it has started, every other command gets the
default action back (and a SIGHUP noted meanwhile)."""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType

_noted = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _noted
    _noted = True


def hold() -> None:
    """Note SIGHUP instead of dying of it (until ``taken`` or ``release``)."""
    # (ValueError: imported outside the main thread, so not as the `relay` command)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGHUP, _note)


def taken() -> bool:
    """Whether a SIGHUP was noted; forgets it (the caller now owns the signal)."""
    global _noted
    noted, _noted = _noted, False
    return noted


def release() -> None:
    """Not `relay serve`: the default action again, and a noted SIGHUP delivered now."""
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    except ValueError:  # main() run outside the main thread (tests): not ours to change
        return
    if taken():
        os.kill(os.getpid(), signal.SIGHUP)
