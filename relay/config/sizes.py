"""Sizes in config: a whole number of bytes, or a string: '64MB', '512KiB', '1GB'."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Return bytes; raise ValueError with a message fit for a config error."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"must be a size such as 64MB, 512KiB, 1GB or a number of bytes,"
                     f" not {value!r}")


def format_size(size: int) -> str:
    """A short, readable form: 67108864 -> '64MiB', 1500 -> '1500B'."""
    for unit in ("GiB", "MiB", "KiB"):
        scale = _UNITS[unit.lower()]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    if size >= 1000**2:
        return f"{size / 1000**2:.1f}MB"
    return f"{size}B"
