"""The SQLite dialect of relay.queue.sqlwhere: a MessageFilter as a WHERE clause."""

from __future__ import annotations

from typing import Any

from relay.queue import sqlwhere
from relay.queue.filters import MessageFilter
from relay.queue.sqlwhere import ORDER_BY as ORDER_BY

SQLITE = sqlwhere.Dialect(
    mark="?", like="LIKE", everything="1", arrays=False,
    rcpt_rows="json_each(messages.recipients)", rcpt_address="json_extract(r.value, '$[0]')")


def where(match: MessageFilter) -> tuple[str, list[Any]]:
    """The clause selecting ``match``'s messages ("1" for all) and its parameters."""
    return sqlwhere.where(match, SQLITE)
