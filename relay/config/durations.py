"""Durations in config: a number of seconds, or a string: '500ms', '30s', '5m', '2h', '2d'."""

from __future__ import annotations

import calendar
import math
import re
import time

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds; raise ValueError with a message fit for a config error."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m, 2h or a number of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):  # YAML's .inf or .nan: no duration, and no "never"
            raise ValueError(f"must be a finite duration, not {value}")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            number, unit = match.groups()
            return float(number) * _UNITS[unit or "s"]
    raise ValueError(
        f"must be a duration such as 500ms, 30s, 5m, 2h, 2d or a number of seconds, not {value!r}"
    )


def format_duration(seconds: float) -> str:
    """The shortest exact form: 1800 -> '30m', 0.5 -> '500ms'."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_since(text: str, now: float) -> float:
    """A point in time given as an age ('2h': two hours ago) or a UTC time
    ('2026-11-30T10:00:00Z', '2026-11-30 10:00', '2026-11-30'); epoch seconds."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    cleaned = text.strip().rstrip("Zz").replace("T", " ")
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(cleaned, form)))
        except ValueError:
            continue
    raise ValueError(f"must be an age such as 2h or 1d, or a UTC time such as"
                     f" 2026-11-30T10:00:00Z, not {text!r}")
