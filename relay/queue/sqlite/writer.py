"""What the SQLite store's writer does with a batch of writes, on its own thread: apply
every statement of the batch in one transaction, then answer each waiter.

The store (store.SQLiteStore) owns the thread, the connection and the commit; these are
the statements and the answers, kept apart so they read on their own.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.delivery.ratelimit import share_for_others
from relay.errors import StoreError
from relay.queue.sqlite.schema import (
    CLAIM_HIGH_SQL,
    CLAIM_ONE_SQL,
    CLAIM_SQL,
    COLUMNS,
    recipients_json,
    row_to_message,
)
from relay.queue.types import (
    AttemptResult,
    Claim,
    ExportedMessage,
    MessageState,
    NewEvent,
    NewMessage,
    PendingEvent,
    QueuedMessage,
    Recipient,
)


@dataclass
class Op:
    future: asyncio.Future[Any] = field(init=False)
    result: Any = None
    error: StoreError | None = None  # refused without being written (see settle)
    submitted: float = 0.0  # monotonic


@dataclass
class Enqueue(Op):
    messages: tuple[NewMessage, ...] = field(kw_only=True)  # one op: all or none


@dataclass
class ClaimDue(Op):
    account: str = field(kw_only=True)
    now: float = field(kw_only=True)
    limit: int = field(kw_only=True)
    lease_s: float = field(kw_only=True)
    owner: str = field(kw_only=True)
    windows: tuple[tuple[float, int], ...] = field(default=(), kw_only=True)
    message_id: str | None = field(default=None, kw_only=True)  # just this one (limit 1)
    reserve_for_high: float = field(default=0.0, kw_only=True)
    held_until: float = field(default=0.0, kw_only=True)  # with message_id: due till then


@dataclass
class Finish(Op):
    attempt: AttemptResult = field(kw_only=True)
    bounce: NewMessage | None = field(default=None, kw_only=True)
    events: tuple[NewEvent, ...] = field(default=(), kw_only=True)


@dataclass
class ClaimEvents(Op):
    now: float = field(kw_only=True)
    limit: int = field(kw_only=True)
    lease_s: float = field(kw_only=True)
    owner: str = field(kw_only=True)


@dataclass
class Import(Op):
    """Messages of an export, as they were; ``result``: (imported, skipped)."""

    messages: list[ExportedMessage] = field(kw_only=True)


@dataclass
class Statements(Op):
    statements: list[tuple[str, tuple[Any, ...]]] = field(kw_only=True)


@dataclass
class Transact(Op):
    """A read-then-write decided inside the batch's transaction (a connection slot, an
    account's probe): ``run(db)`` is the result; no other process writes in between."""

    run: Callable[[sqlite3.Connection], Any] = field(kw_only=True)


def settle(batch: list[Op], error: StoreError | None) -> None:
    for op in batch:
        if op.future.done():
            continue
        if op.error is not None:
            op.future.set_exception(op.error)
        elif error is None:
            op.future.set_result(op.result)
        else:
            op.future.set_exception(error)


def _insert(db: sqlite3.Connection, messages: list[NewMessage]) -> None:
    db.executemany(
        f"INSERT INTO messages ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            (
                m.id, "queued", m.account, int(m.priority), m.sender,
                recipients_json(Recipient(r) for r in m.recipients), len(m.body),
                0, m.created_at, m.not_before, "", m.created_at,
                " ".join(m.mail_options),
            )
            for m in messages
        ],
    )
    db.executemany(
        "INSERT INTO bodies (id, data) VALUES (?, ?)", [(m.id, m.body) for m in messages]
    )


def _first_of(db: sqlite3.Connection, m: NewMessage) -> str | None:
    """(dedup) The id of the message already accepted with m's key within its window,
    or None after recording m's own key: in the enqueue's transaction, under the write
    lock, so of two submissions with one key (any processes) exactly one is queued."""
    if m.dedup is None:
        return None
    row = db.execute("SELECT message_id FROM dedup WHERE key=? AND expires_at>?",
                     (m.dedup.key, m.created_at)).fetchone()
    if row is not None:
        return str(row[0])
    db.execute("INSERT INTO dedup (key, message_id, expires_at) VALUES (?,?,?)"
               " ON CONFLICT (key) DO UPDATE SET message_id=excluded.message_id,"
               " expires_at=excluded.expires_at",
               (m.dedup.key, m.id, m.created_at + m.dedup.window_s))
    return None


def _new_messages(db: sqlite3.Connection, batch: list[Op]) -> list[NewMessage]:
    """The batch's enqueued messages to insert: each Enqueue's result is the id holding
    each of its messages (with dedup, maybe one accepted before: then not inserted)."""
    enqueues = []
    for op in batch:
        if isinstance(op, Enqueue):
            op.result = []
            for m in op.messages:
                first = _first_of(db, m)
                op.result.append(first or m.id)
                if first is None:
                    enqueues.append(m)
    return enqueues


def apply(db: sqlite3.Connection, batch: list[Op]) -> None:
    enqueues = _new_messages(db, batch)
    if enqueues:
        _insert(db, enqueues)
    finishes = [op for op in batch if isinstance(op, Finish)]
    if finishes:
        _apply_finishes(db, finishes)
    for op in batch:
        if isinstance(op, ClaimDue):
            op.result = _claim(db, op)
        elif isinstance(op, ClaimEvents):
            op.result = _claim_events(db, op)
        elif isinstance(op, Statements):
            op.result = [db.execute(sql, params).rowcount for sql, params in op.statements]
        elif isinstance(op, Import):
            op.result = _import(db, op.messages)
        elif isinstance(op, Transact):
            op.result = op.run(db)


def _import(db: sqlite3.Connection, messages: list[ExportedMessage]) -> tuple[int, int]:
    """Insert each message with its body and attempt records, unless its id is already
    queued (then none of it: the one there stays as it is)."""
    imported = 0
    for m in messages:
        row = (m.id, str(m.state), m.account, int(m.priority), m.sender,
               recipients_json(m.recipients), m.size, m.attempts, m.created_at,
               m.next_attempt_at, m.last_error, m.updated_at, " ".join(m.mail_options))
        if db.execute(f"INSERT INTO messages ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                      " ON CONFLICT(id) DO NOTHING", row).rowcount != 1:
            continue
        imported += 1
        if m.body is not None:
            db.execute("INSERT OR REPLACE INTO bodies (id, data) VALUES (?, ?)", (m.id, m.body))
        db.executemany("INSERT INTO attempts (message_id, account, at, outcome, reply,"
                       " transcript) VALUES (?, ?, ?, ?, ?, ?)",
                       [(m.id, a.account, a.at, a.outcome, a.reply, "\n".join(a.transcript))
                        for a in m.attempts_log])
    return imported, len(messages) - imported


_SETTLE = (
    "UPDATE messages SET state=?, recipients=?, attempts=?, next_attempt_at=?,"
    " last_error=?, lease_until=NULL, owner=NULL, updated_at=? WHERE id=?"
)


def _apply_finishes(db: sqlite3.Connection, ops: list[Finish]) -> None:
    """Record each outcome if its claim still holds the row (``op.result``: accepted).

    A result that names a claim is accepted only while that owner still holds the
    message: a worker whose lease ran out and whose message another process claimed
    meanwhile cannot overwrite the new owner's outcome. Its send still counts against
    the rate limit (it reached the upstream), but its bounce is not queued: the outcome
    that is recorded brings its own.
    """
    accepted: list[AttemptResult] = []
    for op in ops:
        a = op.attempt
        params = (str(a.state), recipients_json(a.recipients), a.attempts,
                  a.next_attempt_at, a.last_error, a.at, a.id)
        if a.claim is None:  # not from a claim (tests, tools): as before owners existed
            db.execute(_SETTLE, params)
            op.result = True
        else:
            op.result = db.execute(_SETTLE + " AND state='sending' AND owner=?",
                                   (*params, a.claim.owner)).rowcount == 1
        if op.result:
            accepted.append(a)
    # A refusal the client was given as its answer: the submission was not accepted, so
    # its dedup key goes with the outcome (a retry is queued and tried again).
    forgotten = [(a.forget_dedup, a.id) for a in accepted if a.forget_dedup is not None]
    if forgotten:
        db.executemany("DELETE FROM dedup WHERE key=? AND message_id=?", forgotten)
    # A bounce is committed with the outcome that causes it: one cannot be lost
    # without the other.
    bounces = [op.bounce for op in ops if op.result and op.bounce is not None]
    if bounces:
        _insert(db, bounces)
    db.executemany(
        # Only for rows that still exist (an operator may have deleted one mid-send).
        "INSERT INTO attempts (message_id, account, at, outcome, reply, transcript)"
        " SELECT ?,?,?,?,?,? WHERE EXISTS (SELECT 1 FROM messages WHERE id=?)",
        [(a.id, a.account, a.at, a.outcome, a.reply, "\n".join(a.transcript), a.id)
         for a in accepted],
    )
    # Webhook events go to the outbox with the outcome they report: neither is
    # committed without the other.
    db.executemany(
        "INSERT INTO events (id, webhook, type, body, created_at, next_attempt_at)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
        [(e.id, e.webhook, e.type, e.body, e.created_at, e.created_at)
         for op in ops if op.result for e in op.events],
    )
    db.executemany(
        "INSERT INTO sends (account, at) VALUES (?, ?)",
        [(op.attempt.account, op.attempt.at) for op in ops if op.attempt.offered],
    )
    # A group message's hold on its member's windows ends as its send is counted above
    # (one transaction: the send is never counted twice, nor missed in between). Only the
    # claim's own: a stale claim's outcome leaves the new owner's hold alone.
    db.executemany(
        "DELETE FROM group_sends WHERE message_id=? AND owner=coalesce(?, owner)",
        [(op.attempt.id, None if op.attempt.claim is None else op.attempt.claim.owner)
         for op in ops],
    )
    # A delivered body is not needed again; failed ones stay for `queue retry`.
    delivered = [(a.id,) for a in accepted if a.state is MessageState.DELIVERED]
    if delivered:
        db.executemany("DELETE FROM bodies WHERE id=?", delivered)


def window_room(db: sqlite3.Connection, account: str, now: float, limit: int,
                windows: tuple[tuple[float, int], ...], reserve_for_high: float,
                exclude: str | None = None) -> tuple[int, int]:
    """How many sends the account's rate windows still allow, counted over every process:
    sends recorded in each window, plus every claim not yet finished (a send counts from
    its claim to its end, as in relay.delivery.ratelimit), the group messages going
    through it included (group_sends; ``exclude``: the one asking). Inside the write
    transaction of the claim, so two workers cannot both take the last place. Two
    answers: for high priority, and for the rest, which may not use the share
    reserve_for_high keeps."""
    room = others = limit
    if not windows:
        return room, others
    (in_flight,) = db.execute(
        "SELECT (SELECT count(*) FROM messages WHERE state='sending' AND account=?)"
        " + (SELECT count(*) FROM group_sends WHERE account=? AND lease_until>=?"
        " AND message_id IS NOT ?)", (account, account, now, exclude)).fetchone()
    for span, most in windows:
        (sent,) = db.execute("SELECT count(*) FROM sends WHERE account=? AND at>?",
                             (account, now - span)).fetchone()
        room = min(room, most - sent - in_flight)
        others = min(others, share_for_others(most, reserve_for_high) - sent - in_flight)
    return room, min(room, others)


def _claim(db: sqlite3.Connection, op: ClaimDue) -> list[QueuedMessage]:
    room, others = window_room(db, op.account, op.now, op.limit, op.windows,
                               op.reserve_for_high)
    if room <= 0:
        return []
    params: dict[str, Any] = {"a": op.account, "now": op.now, "n": room,
                              "lease": op.now + op.lease_s, "owner": op.owner,
                              "id": op.message_id}
    rows = []
    if op.message_id is not None:  # one by id (ack: after_upstream), on the same shares
        rows = db.execute(CLAIM_ONE_SQL, {**params, "any": others > 0,
                                          "held": op.held_until}).fetchall()
    else:
        if others < room:  # high priority first, up to the whole room; the rest up to theirs
            rows = db.execute(CLAIM_HIGH_SQL, params).fetchall()
            params["n"] = min(others, room - len(rows))
        if params["n"] > 0:
            rows += db.execute(CLAIM_SQL, params).fetchall()
    messages = [row_to_message(r) for r in rows]
    for m in messages:
        m.claim = Claim(op.owner, op.now + op.lease_s)
    messages.sort(key=lambda m: (m.priority, m.next_attempt_at, m.created_at))
    return messages


_CLAIM_EVENTS = (
    "UPDATE events SET owner=:owner, lease_until=:lease WHERE rowid IN"
    " (SELECT rowid FROM events WHERE next_attempt_at<=:now"
    " AND (owner IS NULL OR lease_until<:now) ORDER BY next_attempt_at LIMIT :n)"
    " RETURNING id, webhook, type, body, created_at, attempts"
)


def _claim_events(db: sqlite3.Connection, op: ClaimEvents) -> list[PendingEvent]:
    """Due outbox rows nobody holds (or whose holder's lease ran out), now this owner's:
    of several workers, one sends each event."""
    lease = op.now + op.lease_s
    rows = db.execute(_CLAIM_EVENTS, {"owner": op.owner, "lease": lease, "now": op.now,
                                      "n": op.limit}).fetchall()
    events = [PendingEvent(r[0], r[1], r[2], r[3], r[4], r[5], Claim(op.owner, lease))
              for r in rows]
    events.sort(key=lambda e: e.created_at)
    return events
