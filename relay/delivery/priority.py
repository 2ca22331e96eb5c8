"""Message priority from its headers.

Precedence: X-Priority (1..5, also '1 (Highest)'), then Priority (RFC 2156:
urgent | normal | non-urgent), then Importance (RFC 2156: high | normal | low).
"""

from __future__ import annotations

import re

from relay.queue.types import Priority
from relay.smtp.headers import get_header

_X_PRIORITY = re.compile(r"^\s*([1-5])\b")
_PRIORITY = {"urgent": Priority.HIGH, "normal": Priority.NORMAL, "non-urgent": Priority.LOW}
_IMPORTANCE = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}


def priority_from_headers(fields: list[tuple[str, str]]) -> Priority:
    """The first header that names a priority decides; none (or nonsense) is normal."""
    value = get_header(fields, "X-Priority")
    if value is not None:
        match = _X_PRIORITY.match(value)
        if match:
            level = int(match.group(1))
            return Priority.HIGH if level <= 2 else Priority.NORMAL if level == 3 else Priority.LOW
    for name, table in (("Priority", _PRIORITY), ("Importance", _IMPORTANCE)):
        value = get_header(fields, name)
        if value is not None and value.strip().lower() in table:
            return table[value.strip().lower()]
    return Priority.NORMAL
