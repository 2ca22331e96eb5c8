"""The messages table's columns as both stores read them, and a row of them as a
QueuedMessage: one mapping for SQLite and PostgreSQL. What differs is only how a store's
driver returns the recipients (SQLite: JSON text; PostgreSQL: jsonb, already decoded),
which each store names by passing its decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from relay.queue.types import MessageState, Priority, QueuedMessage, Recipient, RecipientState

# The columns of a QueuedMessage, in the order row_to_message reads them.
COLUMNS = (
    "id, state, account, priority, sender, recipients, size, attempts, created_at,"
    " next_attempt_at, last_error, updated_at, mail_options"
)

# The recipients column as the driver returns it -> [[address, state, reply], ...].
RecipientsDecoder = Callable[[Any], Any]


def as_decoded(value: Any) -> Any:
    """The recipients of a driver that decodes JSON itself (psycopg's jsonb)."""
    return value


def row_to_message(row: Sequence[Any], recipients: RecipientsDecoder = as_decoded
                   ) -> QueuedMessage:
    """A row that starts with COLUMNS as a message."""
    return QueuedMessage(
        id=row[0],
        state=MessageState(row[1]),
        account=row[2],
        priority=Priority(row[3]),
        sender=row[4],
        recipients=[Recipient(a, RecipientState(s), r) for a, s, r in recipients(row[5])],
        size=row[6],
        attempts=row[7],
        created_at=row[8],
        next_attempt_at=row[9],
        last_error=row[10],
        updated_at=row[11],
        mail_options=tuple(row[12].split()) if row[12] else (),
    )
