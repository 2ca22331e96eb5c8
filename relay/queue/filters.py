"""Which messages an operator means: the filter shared by `relay queue list`, the bulk
actions and the stores, and the order of a listing. Pure values.

A store turns a ``MessageFilter`` into its own query (SQLite: a WHERE clause), so a second
store implements the same filter; ``matches`` is the reference meaning both must agree with.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace

from relay.queue.types import MessageState, QueuedMessage

GLOB_CHARS = "*?"


class SortKey(enum.StrEnum):
    """The order of `relay queue list`; ties keep the order of arrival."""

    CREATED = "created"
    NEXT_ATTEMPT = "next-attempt"
    ATTEMPTS = "attempts"  # most attempts first: the troubled messages on top


def is_glob(pattern: str) -> bool:
    """A pattern with * or ? matches a whole address; without, any part of it."""
    return any(c in pattern for c in GLOB_CHARS)


def text_matches(pattern: str, value: str) -> bool:
    """Case-insensitive: a glob (* and ?) against the whole value, else a substring."""
    value, pattern = value.lower(), pattern.lower()
    if is_glob(pattern):
        # fnmatch would also read [...] as a class; only * and ? are wildcards here.
        return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))
    return pattern in value


@dataclass(frozen=True)
class MessageFilter:
    """Every field narrows; the empty filter is every message. Times are epoch seconds."""

    states: frozenset[MessageState] | None = None  # None: any state
    ids: tuple[str, ...] = ()
    account: str | None = None
    sender: str | None = None  # substring, or a glob with * / ?
    rcpt: str | None = None  # any recipient: substring, or a glob with * / ?
    since: float | None = None  # accepted at or after
    until: float | None = None  # accepted before
    min_attempts: int | None = None
    error: str | None = None  # substring of the last error, case-insensitive
    changed_since: float | None = None  # last changed at or after (a failure, a retry)
    updated_before: float | None = None  # last changed before (purge)

    def within(self, states: Iterable[MessageState]) -> MessageFilter:
        """This filter, limited to ``states`` (an operation's sources)."""
        allowed = frozenset(states)
        return replace(self, states=allowed if self.states is None else self.states & allowed)

    def matches(self, m: QueuedMessage) -> bool:
        """The filter's meaning, one message at a time (stores do the same in a query)."""
        checks = (
            self.states is None or m.state in self.states,
            not self.ids or m.id in self.ids,
            self.account is None or m.account == self.account,
            self.sender is None or text_matches(self.sender, m.sender),
            self.rcpt is None or any(text_matches(self.rcpt, r.address) for r in m.recipients),
            self.since is None or m.created_at >= self.since,
            self.until is None or m.created_at < self.until,
            self.min_attempts is None or m.attempts >= self.min_attempts,
            self.error is None or self.error.lower() in m.last_error.lower(),
            self.changed_since is None or m.updated_at >= self.changed_since,
            self.updated_before is None or m.updated_at < self.updated_before,
        )
        return all(checks)
