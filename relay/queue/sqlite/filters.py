"""A relay.queue.filters.MessageFilter as a WHERE clause, a SortKey as an ORDER BY.

Patterns become LIKE patterns (ASCII case-insensitive, as addresses compare): a glob's
* and ? become % and _, anything else matches as a substring; LIKE's own % and _ in the
operator's text are escaped, so they match themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.queue.filters import MessageFilter, SortKey, is_glob

ORDER_BY = {
    SortKey.CREATED: "seq",  # seq is the order of arrival
    SortKey.NEXT_ATTEMPT: "next_attempt_at, seq",
    SortKey.ATTEMPTS: "attempts DESC, seq",
}


def like_pattern(pattern: str) -> str:
    r"""The LIKE pattern (ESCAPE '\') for a filter pattern.

    >>> like_pattern("50%_off"), like_pattern("*@example.?om")
    ('%50\\%\\_off%', '%@example._om')
    """
    escaped = _escape(pattern)
    if is_glob(pattern):
        return escaped.replace("*", "%").replace("?", "_")
    return f"%{escaped}%"


def where(match: MessageFilter) -> tuple[str, list[Any]]:
    """The clause selecting ``match``'s messages ("1" for all) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        clauses.append(clause)
        params.extend(values)

    if match.states is not None:
        states = sorted(str(s) for s in match.states)
        add(f"state IN ({','.join('?' * len(states))})", *states)
    if match.ids:
        add(f"id IN ({','.join('?' * len(match.ids))})", *match.ids)
    # recipients is a JSON list of [address, state, reply]
    rcpt = ("EXISTS (SELECT 1 FROM json_each(messages.recipients) AS r"
            " WHERE json_extract(r.value, '$[0]') LIKE ? ESCAPE '\\')")
    simple: list[tuple[str, Any]] = [
        ("account = ?", match.account),
        ("sender LIKE ? ESCAPE '\\'", _like(match.sender, like_pattern)),
        (rcpt, _like(match.rcpt, like_pattern)),
        ("created_at >= ?", match.since),
        ("created_at < ?", match.until),
        ("attempts >= ?", match.min_attempts),
        ("last_error LIKE ? ESCAPE '\\'", _like(match.error, lambda t: f"%{_escape(t)}%")),
        ("updated_at >= ?", match.changed_since),
        ("updated_at < ?", match.updated_before),
    ]
    for clause, value in simple:
        if value is not None:
            add(clause, value)
    return " AND ".join(clauses) or "1", params


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(text: str | None, pattern: Callable[[str], str]) -> str | None:
    return None if text is None else pattern(text)
