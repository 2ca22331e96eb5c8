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

from relay.errors import StoreError
from relay.queue.sqlite.schema import CLAIM_SQL, COLUMNS, recipients_json, row_to_message
from relay.queue.types import (
    AttemptResult,
    Claim,
    MessageState,
    NewMessage,
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
    message: NewMessage = field(kw_only=True)


@dataclass
class ClaimDue(Op):
    account: str = field(kw_only=True)
    now: float = field(kw_only=True)
    limit: int = field(kw_only=True)
    lease_s: float = field(kw_only=True)
    owner: str = field(kw_only=True)
    windows: tuple[tuple[float, int], ...] = field(default=(), kw_only=True)


@dataclass
class Finish(Op):
    attempt: AttemptResult = field(kw_only=True)
    bounce: NewMessage | None = field(default=None, kw_only=True)


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


def apply(db: sqlite3.Connection, batch: list[Op]) -> None:
    enqueues = [op.message for op in batch if isinstance(op, Enqueue)]
    if enqueues:
        _insert(db, enqueues)
    finishes = [op for op in batch if isinstance(op, Finish)]
    if finishes:
        _apply_finishes(db, finishes)
    for op in batch:
        if isinstance(op, ClaimDue):
            op.result = _claim(db, op)
        elif isinstance(op, Statements):
            op.result = [db.execute(sql, params).rowcount for sql, params in op.statements]
        elif isinstance(op, Transact):
            op.result = op.run(db)


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
    # A bounce is committed with the outcome that causes it: one cannot be lost
    # without the other.
    bounces = [op.bounce for op in ops if op.result and op.bounce is not None]
    if bounces:
        _insert(db, bounces)
    db.executemany(
        # Only for rows that still exist (an operator may have deleted one mid-send).
        "INSERT INTO attempts (message_id, account, at, outcome, reply)"
        " SELECT ?,?,?,?,? WHERE EXISTS (SELECT 1 FROM messages WHERE id=?)",
        [(a.id, a.account, a.at, a.outcome, a.reply, a.id) for a in accepted],
    )
    db.executemany(
        "INSERT INTO sends (account, at) VALUES (?, ?)",
        [(op.attempt.account, op.attempt.at) for op in ops],
    )
    # A delivered body is not needed again; failed ones stay for `queue retry`.
    delivered = [(a.id,) for a in accepted if a.state is MessageState.DELIVERED]
    if delivered:
        db.executemany("DELETE FROM bodies WHERE id=?", delivered)


def _room(db: sqlite3.Connection, op: ClaimDue) -> int:
    """How many sends the account's rate windows still allow, counted over every process:
    sends recorded in each window, plus every claim not yet finished (a send counts from
    its claim to its end, as in relay.delivery.ratelimit). Inside the claim's write
    transaction, so two workers cannot both take the last place."""
    room = op.limit
    if not op.windows:
        return room
    (in_flight,) = db.execute("SELECT count(*) FROM messages WHERE state='sending'"
                              " AND account=?", (op.account,)).fetchone()
    for span, most in op.windows:
        (sent,) = db.execute("SELECT count(*) FROM sends WHERE account=? AND at>?",
                             (op.account, op.now - span)).fetchone()
        room = min(room, most - sent - in_flight)
    return room


def _claim(db: sqlite3.Connection, op: ClaimDue) -> list[QueuedMessage]:
    room = _room(db, op)
    if room <= 0:
        return []
    params = {"a": op.account, "now": op.now, "n": room, "lease": op.now + op.lease_s,
              "owner": op.owner}
    rows = db.execute(CLAIM_SQL, params).fetchall()
    messages = [row_to_message(r) for r in rows]
    for m in messages:
        m.claim = Claim(op.owner, op.now + op.lease_s)
    messages.sort(key=lambda m: (m.priority, m.next_attempt_at, m.created_at))
    return messages
