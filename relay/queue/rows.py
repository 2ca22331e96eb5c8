"""The columns both stores read, and their rows as the queue's types: a message as a
QueuedMessage, and what `relay queue export` writes (ExportedMessage with its attempts,
ExportedEvent, ExportedDedup). One mapping for SQLite and PostgreSQL: what differs is
only how a store's driver returns the recipients (SQLite: JSON text; PostgreSQL: jsonb,
already decoded), which each store names by passing its decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from relay.queue.types import (
    ExportedAttempt,
    ExportedDedup,
    ExportedEvent,
    ExportedMessage,
    MessageState,
    Priority,
    QueuedMessage,
    Recipient,
    RecipientState,
    unclaimed,
)

# The columns of a QueuedMessage, in the order row_to_message reads them.
COLUMNS = (
    "id, state, account, priority, sender, recipients, size, attempts, created_at,"
    " next_attempt_at, last_error, updated_at, mail_options"
)

# Every message with its body (NULL once dropped) last, for exported_message.
_BODY = "(SELECT data FROM bodies WHERE bodies.id = messages.id)"
EXPORT_MESSAGES_SQL = f"SELECT {COLUMNS}, {_BODY} FROM messages ORDER BY seq"
# An attempt record's columns, for attempts_by_message (each store says which messages).
ATTEMPT_COLUMNS = "message_id, at, account, outcome, reply, transcript"
# Every outbox event, a claimed one too (its owner: exported_event makes it due now).
EXPORT_EVENTS_SQL = ("SELECT id, webhook, type, body, created_at, next_attempt_at, attempts,"
                     " last_error, owner FROM events ORDER BY created_at, id, webhook")
# A dedup key's columns, for exported_dedup (each store says which keys).
DEDUP_COLUMNS = "key, message_id, expires_at"

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


def exported_message(row: Sequence[Any], attempts: dict[str, list[ExportedAttempt]],
                     now: float, recipients: RecipientsDecoder = as_decoded
                     ) -> ExportedMessage:
    """A row of EXPORT_MESSAGES_SQL with its attempt records (attempts_by_message), as
    an import will recreate it: a claim comes out unclaimed, due ``now``."""
    m = row_to_message(row, recipients)
    return unclaimed(ExportedMessage(
        id=m.id, state=m.state, account=m.account, priority=m.priority,
        sender=m.sender, recipients=tuple(m.recipients), size=m.size,
        attempts=m.attempts, created_at=m.created_at,
        next_attempt_at=m.next_attempt_at, last_error=m.last_error,
        updated_at=m.updated_at, mail_options=m.mail_options,
        attempts_log=tuple(attempts.get(m.id, ())),
        body=None if row[-1] is None else bytes(row[-1]),
    ), now)


def attempts_by_message(rows: Iterable[Sequence[Any]]) -> dict[str, list[ExportedAttempt]]:
    """Rows of ATTEMPT_COLUMNS as each message's attempt records, in the rows' order."""
    found: dict[str, list[ExportedAttempt]] = {}
    for message_id, at, account, outcome, reply, transcript in rows:
        lines = tuple(transcript.split("\n")) if transcript else ()
        found.setdefault(message_id, []).append(
            ExportedAttempt(at, account, outcome, reply, lines))
    return found


def exported_event(row: Sequence[Any], now: float) -> ExportedEvent:
    """A row of EXPORT_EVENTS_SQL; a claim comes out due ``now``, since its owner is
    not imported."""
    eid, webhook, kind, body, created, due, attempts, error, owner = row
    return ExportedEvent(str(eid), str(webhook), str(kind), str(body), float(created),
                         float(due if owner is None else min(due, now)), int(attempts),
                         str(error))


def exported_dedup(row: Sequence[Any]) -> ExportedDedup:
    """A row of DEDUP_COLUMNS."""
    key, message_id, expires_at = row
    return ExportedDedup(str(key), str(message_id), float(expires_at))
