"""A relay.queue.filters.MessageFilter as a PostgreSQL WHERE clause, a SortKey as an
ORDER BY: the same meaning as the SQLite store's (relay.queue.filters.matches).

Patterns become ILIKE patterns: a glob's * and ? become % and _, anything else matches
as a substring; ILIKE's own % and _ in the operator's text are escaped.
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
_ESCAPE = "ESCAPE '\\'"


def like_pattern(pattern: str) -> str:
    r"""The ILIKE pattern (ESCAPE '\') for a filter pattern.

    >>> like_pattern("50%_off"), like_pattern("*@example.?om")
    ('%50\\%\\_off%', '%@example._om')
    """
    escaped = _escape(pattern)
    if is_glob(pattern):
        return escaped.replace("*", "%").replace("?", "_")
    return f"%{escaped}%"


def where(match: MessageFilter) -> tuple[str, list[Any]]:
    """The clause selecting ``match``'s messages ("true" for all) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        clauses.append(clause)
        params.extend(values)

    if match.states is not None:
        add("state = ANY(%s)", sorted(str(s) for s in match.states))
    if match.ids:
        add("id = ANY(%s)", list(match.ids))
    rcpt = ("EXISTS (SELECT 1 FROM jsonb_array_elements(messages.recipients) AS r"
            f" WHERE r->>0 ILIKE %s {_ESCAPE})")
    simple: list[tuple[str, Any]] = [
        ("account = %s", match.account),
        (f"sender ILIKE %s {_ESCAPE}", _like(match.sender, like_pattern)),
        (rcpt, _like(match.rcpt, like_pattern)),
        ("created_at >= %s", match.since),
        ("created_at < %s", match.until),
        ("attempts >= %s", match.min_attempts),
        (f"last_error ILIKE %s {_ESCAPE}", _like(match.error, lambda t: f"%{_escape(t)}%")),
        ("updated_at >= %s", match.changed_since),
        ("updated_at < %s", match.updated_before),
    ]
    for clause, value in simple:
        if value is not None:
            add(clause, value)
    return " AND ".join(clauses) or "true", params


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(text: str | None, pattern: Callable[[str], str]) -> str | None:
    return None if text is None else pattern(text)
