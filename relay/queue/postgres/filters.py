"""The PostgreSQL dialect of relay.queue.sqlwhere: a MessageFilter as a WHERE clause
(ILIKE: ASCII case-insensitive as addresses compare, lists passed as arrays)."""

from __future__ import annotations

from typing import Any

from relay.queue import sqlwhere
from relay.queue.filters import MessageFilter
from relay.queue.sqlwhere import ORDER_BY as ORDER_BY

POSTGRES = sqlwhere.Dialect(
    mark="%s", like="ILIKE", everything="true", arrays=True,
    rcpt_rows="jsonb_array_elements(messages.recipients)", rcpt_address="r->>0")


def where(match: MessageFilter) -> tuple[str, list[Any]]:
    """The clause selecting ``match``'s messages ("true" for all) and its parameters."""
    return sqlwhere.where(match, POSTGRES)
