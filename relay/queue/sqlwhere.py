"""A relay.queue.filters.MessageFilter as an SQL WHERE clause, a SortKey as an ORDER BY,
for both stores: what differs between SQLite and PostgreSQL (placeholders, LIKE or ILIKE,
how a list is passed, the JSON recipients as rows) is a ``Dialect`` each store names.

Patterns become LIKE patterns (ASCII case-insensitive, as addresses compare): a glob's
* and ? become % and _, anything else matches as a substring; LIKE's own % and _ in the
operator's text are escaped, so they match themselves. The meaning is the one of
relay.queue.filters.MessageFilter.matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from relay.queue.filters import MessageFilter, SortKey, is_glob

ORDER_BY = {
    SortKey.CREATED: "seq",  # seq is the order of arrival
    SortKey.NEXT_ATTEMPT: "next_attempt_at, seq",
    SortKey.ATTEMPTS: "attempts DESC, seq",
}
_ESCAPE = "ESCAPE '\\'"


@dataclass(frozen=True)
class Dialect:
    mark: str  # a parameter's placeholder
    like: str  # the case-insensitive (for ASCII) LIKE
    everything: str  # the clause that selects every row
    rcpt_rows: str  # the JSON list of [address, state, reply] as rows r...
    rcpt_address: str  # ...and one row's address
    arrays: bool  # a list is one parameter (= ANY), else one parameter per value (IN)

    def any_of(self, column: str, values: Iterable[Any]) -> tuple[str, list[Any]]:
        """``column`` is one of ``values``: the clause and its parameters."""
        listed = list(values)
        if self.arrays:
            return f"{column} = ANY({self.mark})", [listed]
        return f"{column} IN ({','.join([self.mark] * len(listed))})", listed


def like_pattern(pattern: str) -> str:
    r"""The LIKE pattern (ESCAPE '\') for a filter pattern.

    >>> like_pattern("50%_off"), like_pattern("*@example.?om")
    ('%50\\%\\_off%', '%@example._om')
    """
    escaped = _escape(pattern)
    if is_glob(pattern):
        return escaped.replace("*", "%").replace("?", "_")
    return f"%{escaped}%"


def where(match: MessageFilter, d: Dialect) -> tuple[str, list[Any]]:
    """The clause selecting ``match``'s messages (``d.everything`` for all) and its
    parameters."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        clauses.append(clause)
        params.extend(values)

    if match.states is not None:
        add(*_flat(d.any_of("state", sorted(str(s) for s in match.states))))
    if match.ids:
        add(*_flat(d.any_of("id", match.ids)))
    m, like = d.mark, d.like
    rcpt = (f"EXISTS (SELECT 1 FROM {d.rcpt_rows} AS r"
            f" WHERE {d.rcpt_address} {like} {m} {_ESCAPE})")
    simple: list[tuple[str, Any]] = [
        (f"account = {m}", match.account),
        (f"sender {like} {m} {_ESCAPE}", _like(match.sender, like_pattern)),
        (rcpt, _like(match.rcpt, like_pattern)),
        (f"created_at >= {m}", match.since),
        (f"created_at < {m}", match.until),
        (f"attempts >= {m}", match.min_attempts),
        (f"last_error {like} {m} {_ESCAPE}", _like(match.error, lambda t: f"%{_escape(t)}%")),
        (f"updated_at >= {m}", match.changed_since),
        (f"updated_at < {m}", match.updated_before),
    ]
    for clause, value in simple:
        if value is not None:
            add(clause, value)
    return " AND ".join(clauses) or d.everything, params


def _flat(clause: tuple[str, list[Any]]) -> tuple[Any, ...]:
    return (clause[0], *clause[1])


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(text: str | None, pattern: Callable[[str], str]) -> str | None:
    return None if text is None else pattern(text)
