"""The durable queue: SQLite in WAL mode with synchronous=FULL, behind ``QueueStore``.

One writer task owns every write. It takes all the writes that are waiting, applies them
in one transaction and commits once (group commit): one sync covers every session that
was waiting, and each waiter is answered only after the commit that holds its write.
The write connection lives on a thread of its own, and a whole batch (every statement,
then the commit) is one call to it: with aiosqlite each statement would be a round trip
through the event loop, and under load those waits, not the sync, made a commit slow.
Reads (bodies, counts, listings) use a second connection through aiosqlite; WAL lets
them run beside the writer.

The file stays bounded: the server prunes delivered records and old send times a small
batch at a time (``start_pruning``), and per-state counts live in a table kept by
triggers, so nothing on a hot or periodic path reads every row.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.errors import StoreError, StoreFullError, StoreLockedError
from relay.queue.store import OPERATOR_CHUNK, Progress
from relay.queue.types import (
    AttemptResult,
    Claim,
    MessageState,
    NewMessage,
    Priority,
    QueuedMessage,
    Recipient,
    RecipientState,
)

log = logging.getLogger("relay.store")
T = TypeVar("T")
# The same settings for both connections.
PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    # FULL: the WAL is synced at every commit, so a commit survives power loss.
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
)
APPLICATION_ID = 0x52454C59  # 'RELY': marks a file as a relay queue
FLUSH_KEY = "flush_requested_at"  # meta: written by `relay queue flush`, read by the server
HEALTH_KEY = "account_health"  # meta: the server's account health, read by `relay status`
SCHEMA_VERSION = 3  # 2: the sends table; 3: per-state counts, index of delivered rows
READY = "('queued', 'deferred')"
SENDS_KEPT_S = 2 * 86400.0  # longer than the longest rate-limit window (per_day)
# Pruning deletes at most this many messages (or sends) per transaction: a batch holds
# the write lock for a few milliseconds, so sessions waiting for a commit barely notice.
PRUNE_BATCH = 500
PRUNE_INTERVAL_S = 60.0  # how often the pruner looks once it has caught up

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    account TEXT NOT NULL,
    priority INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    mail_options TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_ready
    ON messages (account, priority, next_attempt_at) WHERE state IN {READY};
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, account);
CREATE TABLE IF NOT EXISTS bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    message_id TEXT NOT NULL,
    account TEXT NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    reply TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts (message_id);
CREATE INDEX IF NOT EXISTS attempts_account_at ON attempts (account, at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- When each account sent, for rate limits across restarts. Kept apart from attempts so
-- that deleting or purging messages never makes a restarted relay forget recent sends.
CREATE TABLE IF NOT EXISTS sends (account TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sends_account_at ON sends (account, at);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at);
-- Delivered messages by age, for pruning without reading every delivered row.
CREATE INDEX IF NOT EXISTS messages_delivered ON messages (updated_at) WHERE state='delivered';
-- Messages per account and state, kept by triggers in the transaction of every change
-- (the server's and the CLI's alike), so /metrics reads a few rows instead of counting
-- the whole messages table on every scrape.
CREATE TABLE IF NOT EXISTS counts (
    account TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (account, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS counts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO counts (account, state, n) VALUES (NEW.account, NEW.state, 1)
        ON CONFLICT (account, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS counts_delete AFTER DELETE ON messages BEGIN
    UPDATE counts SET n = n - 1 WHERE account = OLD.account AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS counts_update AFTER UPDATE OF state, account ON messages
    WHEN OLD.state IS NOT NEW.state OR OLD.account IS NOT NEW.account BEGIN
    UPDATE counts SET n = n - 1 WHERE account = OLD.account AND state = OLD.state;
    INSERT INTO counts (account, state, n) VALUES (NEW.account, NEW.state, 1)
        ON CONFLICT (account, state) DO UPDATE SET n = n + 1;
END;
"""
# From any older schema: what SCHEMA adds, and the counts of the rows already there.
MIGRATE = f"""
BEGIN;
{SCHEMA}
DELETE FROM counts;
INSERT INTO counts (account, state, n)
    SELECT account, state, count(*) FROM messages GROUP BY account, state;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

COLUMNS = (
    "id, state, account, priority, sender, recipients, size, attempts, created_at,"
    " next_attempt_at, last_error, updated_at, mail_options"
)
# SQLite result codes that mean "cannot write now, try later" (sqlite3.h).
_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 13, 8, 10, 14


def _recipients_json(recipients: Iterable[Recipient]) -> str:
    return json.dumps([[r.address, str(r.state), r.reply] for r in recipients])


def _row_to_message(row: Sequence[Any]) -> QueuedMessage:
    return QueuedMessage(
        id=row[0],
        state=MessageState(row[1]),
        account=row[2],
        priority=Priority(row[3]),
        sender=row[4],
        recipients=[Recipient(a, RecipientState(s), r) for a, s, r in json.loads(row[5])],
        size=row[6],
        attempts=row[7],
        created_at=row[8],
        next_attempt_at=row[9],
        last_error=row[10],
        updated_at=row[11],
        mail_options=tuple(row[12].split()) if row[12] else (),
    )


def map_sqlite_error(exc: sqlite3.Error) -> StoreError:
    """One place that turns sqlite errors into the store's temporary/fatal split."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in (
        _SQLITE_FULL,
        _SQLITE_READONLY,
        _SQLITE_IOERR,
        _SQLITE_CANTOPEN,
    ):
        return StoreFullError(f"queue not writable: {exc}")
    return StoreError(f"queue error: {exc}")


# One range scan of the partial index per priority level: strict priority, then
# readiness order within a level (FIFO for new messages).
_PER_LEVEL = (
    "SELECT * FROM (SELECT seq FROM messages WHERE account=:a AND priority={p}"
    f" AND state IN {READY} AND next_attempt_at<=:now ORDER BY next_attempt_at, seq LIMIT :n)"
)
CLAIM_SQL = (
    "UPDATE messages SET state='sending', lease_until=:lease, updated_at=:now WHERE seq IN"
    " (SELECT seq FROM ("
    + " UNION ALL ".join(_PER_LEVEL.format(p=int(p)) for p in Priority)
    + f") LIMIT :n) RETURNING {COLUMNS}"
)


@dataclass
class _Op:
    future: asyncio.Future[Any] = field(init=False)
    result: Any = None


@dataclass
class _Enqueue(_Op):
    message: NewMessage = field(kw_only=True)


@dataclass
class _Claim(_Op):
    account: str = field(kw_only=True)
    now: float = field(kw_only=True)
    limit: int = field(kw_only=True)
    lease_s: float = field(kw_only=True)
    owner: str = field(kw_only=True)


@dataclass
class _Finish(_Op):
    attempt: AttemptResult = field(kw_only=True)
    bounce: NewMessage | None = field(default=None, kw_only=True)


@dataclass
class _Statements(_Op):
    statements: list[tuple[str, tuple[Any, ...]]] = field(kw_only=True)


class SQLiteStore:
    """The embedded queue. ``commit='per-message'`` syncs each write on its own."""

    def __init__(self, path: Path, *, commit: str = "group", lock: bool = True,
                 owner: str | None = None) -> None:
        self.path = Path(path)
        # Only one process claims from a SQLite queue today (the lock); the owner is kept
        # in each Claim for the multi-process stores, not yet in a column.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._group = commit == "group"
        self._lock = lock
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None  # used only on the writer thread
        self._write_thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: asyncio.Queue[_Op | None] = asyncio.Queue()  # None: stop
        self._writer: asyncio.Task[None] | None = None
        self._data_version: int | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.commits = 0  # for the benchmark: writes per sync
        self.on_internal_error: Callable[[], None] | None = None  # counted by the app

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        # Messages are private: a new queue directory and file are for relay's user only
        # (SQLite gives its -wal and -shm files the database file's permissions).
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        if self._lock:
            self._take_lock()
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
        try:
            self._db = await self._in_writer(self._open_writer)
            self._reader = await self._connect()
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"cannot open queue {self.path}: {exc}") from None
        except StoreError:
            await self.close()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="queue-writer")

    async def _in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._write_thread is None:
            raise StoreError("queue is not open")
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, timeout=10)
        try:
            for pragma in PRAGMAS:
                await db.execute(pragma)
        except BaseException:
            # Close it here: aiosqlite's worker thread is not a daemon, so a connection
            # left open on a corrupt file would keep the process from ever exiting.
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
            raise
        return db

    def _open_writer(self) -> sqlite3.Connection:
        """(writer thread) Connect, check the file, create the schema if needed."""
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        try:
            for pragma in PRAGMAS:
                db.execute(pragma)
            if self._check_file(db) != SCHEMA_VERSION:
                # Only when needed: a write here would wake a running server for nothing
                # each time `relay queue list` opens the file. One transaction: a crash
                # mid-way leaves the old schema, and the next open migrates again.
                db.executescript(MIGRATE)
        except BaseException:
            db.close()
            raise
        return db

    def _check_file(self, db: sqlite3.Connection) -> int:
        """Refuse foreign or newer files; return the file's schema version."""
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is not a relay queue file (it holds other data)")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer relay (schema {version}); upgrade relay"
            )
        return int(version)

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"another relay is already using {self.path} (lock {lock_path} is held)"
            ) from None
        self._lock_fd = fd

    async def close(self) -> None:
        """Commit and answer every write already submitted, then close.

        Cancelling the writer instead would leave a batch committed by the writer thread
        with its callers never told: a session would get no 250 for a queued message and
        its client would send it again. Writes submitted from now on are refused.
        """
        cancelled = False
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self._pending.put_nowait(None)  # the writer stops once it reaches this
            try:
                await asyncio.wait({writer})  # (never raises the writer's own exception)
            except asyncio.CancelledError:  # still close the files (and release the lock)
                writer.cancel()
                cancelled = True
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                log.error("queue writer had stopped: %r", writer.exception())
            while not self._pending.empty():  # only if the writer died: fail, never hang
                op = self._pending.get_nowait()
                if op is not None:
                    self._settle([op], StoreError("queue closed before this write"))
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._reader.close()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._in_writer(self._db.close)
        if self._write_thread is not None:
            self._write_thread.shutdown(wait=True)
        self._reader = self._db = None
        self._write_thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if cancelled:
            raise asyncio.CancelledError

    # -- the writer -------------------------------------------------------------
    @property
    def writer_alive(self) -> bool:
        """False when the task that commits every write is not running (see /readyz)."""
        return self._writer is not None and not self._writer.done()

    async def _submit(self, op: _Op) -> Any:
        if self._writer is None:
            raise StoreError("queue is not open")
        if self._writer.done():
            # Answer at once (451 to DATA, /readyz fails) rather than wait forever.
            raise StoreError("queue writer is not running")
        op.future = asyncio.get_running_loop().create_future()
        self._pending.put_nowait(op)
        return await op.future

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._pending.get()
            batch = [] if first is None else [first]
            stopping = first is None
            while self._group and not stopping and not self._pending.empty():
                op = self._pending.get_nowait()
                if op is None:
                    stopping = True
                else:
                    batch.append(op)
            if not batch:
                continue
            try:
                await self._write_batch(batch)
            except Exception as exc:  # a bug: fail this batch, keep the writer running
                log.exception("queue writer failed; it goes on with the next write")
                if self.on_internal_error is not None:
                    self.on_internal_error()
                self._settle(batch, StoreError(f"queue write failed: {type(exc).__name__}"))

    async def _write_batch(self, batch: list[_Op]) -> None:
        error = await self._commit(batch)
        if error is not None and len(batch) > 1 and not isinstance(error, StoreFullError):
            # One bad write must not fail the others: each again on its own.
            for op in batch:
                self._settle([op], await self._commit([op]))
            return
        self._settle(batch, error)

    async def _commit(self, batch: list[_Op]) -> StoreError | None:
        """Apply and commit a batch; never raises (the writer must outlive any bad write)."""
        return await self._in_writer(self._commit_now, batch)

    def _commit_now(self, batch: list[_Op]) -> StoreError | None:
        """(writer thread) The batch's statements and the commit, or a rollback."""
        db = self._db
        assert db is not None
        try:
            self._apply(db, batch)
            db.commit()
        except Exception as exc:  # sqlite3 errors, and e.g. text sqlite cannot encode
            with contextlib.suppress(sqlite3.Error):
                db.rollback()
            if isinstance(exc, sqlite3.Error):
                return map_sqlite_error(exc)
            log.exception("queue write failed")
            return StoreError(f"queue write failed: {type(exc).__name__}")
        self.commits += 1
        return None

    @staticmethod
    def _settle(batch: list[_Op], error: StoreError | None) -> None:
        for op in batch:
            if op.future.done():
                continue
            if error is None:
                op.future.set_result(op.result)
            else:
                op.future.set_exception(error)

    def _apply(self, db: sqlite3.Connection, batch: list[_Op]) -> None:
        enqueues = [op.message for op in batch if isinstance(op, _Enqueue)]
        # A bounce is committed with the outcome that causes it: one cannot be lost
        # without the other.
        enqueues += [op.bounce for op in batch if isinstance(op, _Finish) and op.bounce]
        if enqueues:
            db.executemany(
                f"INSERT INTO messages ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        m.id, "queued", m.account, int(m.priority), m.sender,
                        _recipients_json(Recipient(r) for r in m.recipients), len(m.body),
                        0, m.created_at, m.not_before, "", m.created_at,
                        " ".join(m.mail_options),
                    )
                    for m in enqueues
                ],
            )
            db.executemany(
                "INSERT INTO bodies (id, data) VALUES (?, ?)", [(m.id, m.body) for m in enqueues]
            )
        finishes = [op.attempt for op in batch if isinstance(op, _Finish)]
        if finishes:
            self._apply_finishes(db, finishes)
        for op in batch:
            if isinstance(op, _Claim):
                op.result = self._claim(db, op)
            elif isinstance(op, _Statements):
                op.result = [db.execute(sql, params).rowcount for sql, params in op.statements]

    @staticmethod
    def _apply_finishes(db: sqlite3.Connection, done: list[AttemptResult]) -> None:
        db.executemany(
            "UPDATE messages SET state=?, recipients=?, attempts=?, next_attempt_at=?,"
            " last_error=?, lease_until=NULL, updated_at=? WHERE id=?",
            [
                (str(a.state), _recipients_json(a.recipients), a.attempts, a.next_attempt_at,
                 a.last_error, a.at, a.id)
                for a in done
            ],
        )
        db.executemany(
            # Only for rows that still exist (an operator may have deleted one mid-send).
            "INSERT INTO attempts (message_id, account, at, outcome, reply)"
            " SELECT ?,?,?,?,? WHERE EXISTS (SELECT 1 FROM messages WHERE id=?)",
            [(a.id, a.account, a.at, a.outcome, a.reply, a.id) for a in done],
        )
        db.executemany(
            "INSERT INTO sends (account, at) VALUES (?, ?)", [(a.account, a.at) for a in done]
        )
        # A delivered body is not needed again; failed ones stay for `queue retry`.
        delivered = [(a.id,) for a in done if a.state is MessageState.DELIVERED]
        if delivered:
            db.executemany("DELETE FROM bodies WHERE id=?", delivered)

    @staticmethod
    def _claim(db: sqlite3.Connection, op: _Claim) -> list[QueuedMessage]:
        params = {"a": op.account, "now": op.now, "n": op.limit, "lease": op.now + op.lease_s}
        rows = db.execute(CLAIM_SQL, params).fetchall()
        messages = [_row_to_message(r) for r in rows]
        for m in messages:
            m.claim = Claim(op.owner, op.now + op.lease_s)
        messages.sort(key=lambda m: (m.priority, m.next_attempt_at, m.created_at))
        return messages

    # -- the scheduler's side ----------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        """Return only once the message is committed and synced."""
        await self._submit(_Enqueue(message=message))

    async def claim_due(
        self, account: str, now: float, limit: int, lease_s: float
    ) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        result: list[QueuedMessage] = await self._submit(
            _Claim(account=account, now=now, limit=limit, lease_s=lease_s, owner=self.owner)
        )
        return result

    async def finish(self, result: AttemptResult, bounce: NewMessage | None = None) -> None:
        """Record an attempt's outcome and queue its bounce, if any, in one transaction."""
        await self._submit(_Finish(attempt=result, bounce=bounce))

    async def check_writable(self) -> None:
        """An empty transaction through the writer: raises StoreError if it cannot commit."""
        await self.execute([])

    async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run writes in one transaction; return each statement's row count."""
        counts: list[int] = await self._submit(_Statements(statements=statements))
        return counts

    async def requeue(self, ids: Sequence[str], now: float, *, due_at: float | None = None
                      ) -> None:
        """Give claimed messages back: due again at once (shutdown), or deferred until
        ``due_at`` (their account backs off; no attempt is counted)."""
        if not ids:
            return
        lead: tuple[float, ...] = ()
        if due_at is None:
            sql = "state='queued'"
        else:
            sql, lead = "state='deferred', next_attempt_at=max(next_attempt_at, ?)", (due_at,)
        await self.execute(
            [
                (f"UPDATE messages SET {sql}, lease_until=NULL, updated_at=?"
                 " WHERE id=? AND state='sending'", (*lead, now, i))
                for i in ids
            ]
        )

    async def shift_times(self, delta: float) -> int:
        """The wall clock jumped by ``delta`` seconds: move the stored times of unfinished
        messages with it, so their age, retry delay and lease keep their real length.

        A time a client asked for (Deferred-Delivery: never tried, due after arrival) is
        a time of day and stays.
        """
        counts = await self.execute([(
            "UPDATE messages SET created_at = created_at + ?, lease_until = lease_until + ?,"
            " next_attempt_at = CASE WHEN attempts = 0 AND next_attempt_at > created_at"
            " THEN next_attempt_at ELSE next_attempt_at + ? END"
            " WHERE state IN ('queued', 'deferred', 'held', 'sending')",
            (delta, delta, delta),
        )])
        return counts[0]

    async def requeue_expired(self, now: float, *, keep: Sequence[str] = ()) -> int:
        """Messages still 'sending' after their lease ran out (a delivery that died without
        a restart) are queued again, except ``keep`` (this process is still on them)."""
        rows = await self._fetch(
            "SELECT id FROM messages WHERE state='sending' AND lease_until < ?", (now,))
        ids = [r[0] for r in rows if r[0] not in set(keep)]
        if not ids:
            return 0
        counts = await self.execute(
            [("UPDATE messages SET state='queued', lease_until=NULL, updated_at=?"
              " WHERE id=? AND state='sending' AND lease_until < ?", (now, i, now)) for i in ids]
        )
        return sum(counts)

    async def recover(self, now: float) -> int:
        """At start: messages left 'sending' by a crash go back to the queue. (Old send
        times are left to the pruner: one big delete here would hold up the start.)"""
        [count] = await self.execute(
            [
                (
                    "UPDATE messages SET state='queued', lease_until=NULL, updated_at=?"
                    " WHERE state='sending'",
                    (now,),
                ),
            ]
        )
        return count

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreError("queue is not open")
        try:
            # Execute and fetch in one call on aiosqlite's thread. As two awaits, another
            # task's read could run between them, inside this statement's read snapshot,
            # and miss a commit made before it started (a 250'd message "not found").
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc) from None

    async def next_due_at(self, account: str) -> float | None:
        per_level = " UNION ALL ".join(
            f"SELECT min(next_attempt_at) AS t FROM messages WHERE account=? AND priority={int(p)}"
            f" AND state IN {READY}"
            for p in Priority
        )
        rows = await self._fetch(f"SELECT min(t) FROM ({per_level})", (account,) * len(Priority))
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def waiting_count(self, account: str) -> int:
        """Messages of an account not yet finished (queued, deferred or being sent)."""
        rows = await self._fetch(
            "SELECT count(*) FROM messages WHERE account=? AND state IN"
            " ('queued', 'deferred', 'sending')",
            (account,),
        )
        return int(rows[0][0])

    async def load_body(self, message_id: str) -> bytes:
        rows = await self._fetch("SELECT data FROM bodies WHERE id=?", (message_id,))
        if not rows:
            raise StoreError(f"body of {message_id} is missing from the queue")
        return bytes(rows[0][0])

    async def counts(self) -> dict[tuple[str, str], int]:
        """Messages per (account, state), from the counts table: no scan of messages."""
        rows = await self._fetch("SELECT account, state, n FROM counts WHERE n > 0")
        return {(a, s): int(n) for a, s, n in rows}

    async def oldest_ready(self) -> dict[str, float]:
        # Ranges of the messages_state index: undelivered rows only, however many
        # delivered rows the file keeps.
        rows = await self._fetch(
            "SELECT account, min(created_at) FROM messages"
            " WHERE state IN ('queued', 'deferred', 'sending') GROUP BY account"
        )
        return {a: t for a, t in rows}

    async def prune(self, now: float, keep_delivered_s: float,
                    batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """One batch: delivered messages older than ``keep_delivered_s`` with their
        attempts, and send times older than SENDS_KEPT_S. Returns (messages, sends)."""
        old = ("SELECT id FROM messages WHERE state='delivered' AND updated_at < ?"
               " ORDER BY updated_at LIMIT ?")
        before = now - keep_delivered_s
        counts = await self.execute([
            (f"DELETE FROM attempts WHERE message_id IN ({old})", (before, batch)),
            (f"DELETE FROM bodies WHERE id IN ({old})", (before, batch)),
            (f"DELETE FROM messages WHERE id IN ({old})", (before, batch)),
            ("DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE at < ?"
             " ORDER BY at LIMIT ?)", (now - SENDS_KEPT_S, batch)),
        ])
        return counts[2], counts[3]

    async def prune_all(self, now: float, keep_delivered_s: float,
                        batch: int = PRUNE_BATCH) -> int:
        """Prune in batches until nothing is left to prune; return messages removed.

        Each batch is its own transaction, and the loop yields between them, so new
        messages are committed in between instead of waiting for the whole prune."""
        total = 0
        while True:
            messages, sends = await self.prune(now, keep_delivered_s, batch)
            total += messages
            if messages < batch and sends < batch:
                return total
            await asyncio.sleep(0)

    def start_pruning(self, keep_delivered_s: float,
                      clock: Callable[[], float], interval_s: float = PRUNE_INTERVAL_S) -> None:
        """Prune now and every ``interval_s`` until the store closes (the server only:
        the CLI opens the same file and leaves that to the server)."""
        self._pruner = asyncio.create_task(
            self._prune_loop(keep_delivered_s, clock, interval_s), name="queue-pruner")

    async def _prune_loop(self, keep_delivered_s: float, clock: Callable[[], float],
                          interval_s: float) -> None:
        while True:
            try:
                removed = await self.prune_all(clock(), keep_delivered_s)
            except StoreError as exc:  # a full disk: try again at the next interval
                log.warning("queue pruning failed, will retry: %s", exc)
            else:
                if removed:
                    log.debug("pruned %d delivered messages", removed)
            await asyncio.sleep(interval_s)

    async def recent_sends(self, account: str, since: float) -> list[float]:
        rows = await self._fetch(
            "SELECT at FROM sends WHERE account=? AND at>? ORDER BY at", (account, since)
        )
        return [r[0] for r in rows]

    async def changed_elsewhere(self) -> bool:
        """True when another process (the CLI) committed since the last call."""
        db = self._db
        if db is None:
            return False
        row = await self._in_writer(lambda: db.execute("PRAGMA data_version").fetchone())
        version = int(row[0]) if row else 0
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self.execute(
            [("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
              " SET value=excluded.value", (key, value))]
        )

    async def request_flush(self, at: float) -> None:
        await self.set_meta(FLUSH_KEY, repr(at))

    async def flush_requested(self) -> str | None:
        return await self.get_meta(FLUSH_KEY)

    async def publish_health(self, report: str) -> None:
        await self.set_meta(HEALTH_KEY, report)

    async def read_health(self) -> str | None:
        return await self.get_meta(HEALTH_KEY)

    # -- operators -----------------------------------------------------------------
    async def list_messages(
        self, *, state: str | None = None, account: str | None = None, limit: int | None = None
    ) -> list[QueuedMessage]:
        where, params = [], []
        if state:
            where.append("state=?")
            params.append(state)
        if account:
            where.append("account=?")
            params.append(account)
        sql = f"SELECT {COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_message(r) for r in await self._fetch(sql, params)]

    async def get(self, message_id: str) -> QueuedMessage | None:
        rows = await self._fetch(f"SELECT {COLUMNS} FROM messages WHERE id=?", (message_id,))
        if not rows:
            return None
        message = _row_to_message(rows[0])
        attempts = await self._fetch(
            "SELECT at, account, outcome, reply FROM attempts WHERE message_id=? ORDER BY at",
            (message_id,),
        )
        message.attempts_log = [
            {"at": at, "account": acc, "outcome": out, "reply": reply}
            for at, acc, out, reply in attempts
        ]
        return message

    async def body_if_kept(self, message_id: str) -> bytes | None:
        rows = await self._fetch("SELECT data FROM bodies WHERE id=?", (message_id,))
        return bytes(rows[0][0]) if rows else None

    # Operator bulk changes run as set-based statements over windows of this many seq
    # values, one transaction each: no window holds the write lock long enough to make
    # the server's writer wait (busy_timeout is 10 s), and the caller can show progress.
    OPERATOR_CHUNK = OPERATOR_CHUNK

    @staticmethod
    def _selection(
        states: Sequence[str], ids: Sequence[str], updated_before: float | None,
        account: str | None = None, updated_since: float | None = None,
    ) -> tuple[str, list[Any]]:
        clauses = [f"state IN ({','.join('?' * len(states))})"]
        params: list[Any] = list(states)
        if ids:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if updated_before is not None:
            clauses.append("updated_at < ?")
            params.append(updated_before)
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        if updated_since is not None:
            clauses.append("updated_at >= ?")
            params.append(updated_since)
        return " AND ".join(clauses), params

    async def _in_windows(
        self,
        where: str,
        params: list[Any],
        templates: Sequence[str],
        lead: tuple[Any, ...],
        progress: Progress | None,
        chunk: int,
    ) -> int:
        """Run each template (``{where}`` filled in) per seq window; sum the last's counts.

        Parameters are ``lead`` (for a SET clause), then the window's and ``params``.
        """
        rows = await self._fetch(f"SELECT min(seq), max(seq) FROM messages WHERE {where}", params)
        if not rows or rows[0][0] is None:
            return 0
        low, high = int(rows[0][0]), int(rows[0][1])
        window = f"seq BETWEEN ? AND ? AND {where}"
        done = 0
        for start in range(low, high + 1, chunk):
            values = (*lead, start, start + chunk - 1, *params)
            counts = await self.execute([(t.format(where=window), values) for t in templates])
            done += counts[-1]
            if progress is not None:
                progress(done)
        return done

    async def update_messages(
        self,
        *,
        states: Sequence[str],
        to_state: str,
        now: float,
        ids: Sequence[str] = (),
        due_now: bool = False,
        reset_failed: bool = False,
        needs_body: bool = False,
        account: str | None = None,
        updated_since: float | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int:
        """Move the messages in ``states`` (all, or just ``ids``; of one ``account``; last
        changed at or after ``updated_since``) to ``to_state``; count them.

        ``reset_failed`` turns a failed message's failed recipients back to pending.
        Bodies are never read.
        """
        where, params = self._selection(states, ids, None, account, updated_since)
        if needs_body:
            where += " AND EXISTS (SELECT 1 FROM bodies b WHERE b.id = messages.id)"
        sets = "state=?, lease_until=NULL, updated_at=?"
        lead: tuple[Any, ...] = (to_state, now)
        if due_now:
            sets += ", next_attempt_at=?"
            lead += (now,)
        if reset_failed:
            # recipients is a JSON list of [address, state, reply]; rewritten in SQL so a
            # bulk retry never round-trips rows through Python.
            sets += (
                ", recipients = CASE WHEN state='failed' THEN (SELECT json_group_array("
                "json_array(json_extract(r.value, '$[0]'),"
                " iif(json_extract(r.value, '$[1]')='failed', 'pending',"
                " json_extract(r.value, '$[1]')),"
                " iif(json_extract(r.value, '$[1]')='failed', '', json_extract(r.value, '$[2]'))))"
                " FROM json_each(messages.recipients) AS r) ELSE recipients END"
            )
        return await self._in_windows(
            where, params, [f"UPDATE messages SET {sets} WHERE {{where}}"], lead, progress, chunk
        )

    async def delete_messages(
        self,
        *,
        states: Sequence[str],
        ids: Sequence[str] = (),
        updated_before: float | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int:
        """Delete matching messages with their bodies and attempts; count them."""
        where, params = self._selection(states, ids, updated_before)
        templates = [
            "DELETE FROM bodies WHERE id IN (SELECT id FROM messages WHERE {where})",
            "DELETE FROM attempts WHERE message_id IN (SELECT id FROM messages WHERE {where})",
            "DELETE FROM messages WHERE {where}",
        ]
        return await self._in_windows(where, params, templates, (), progress, chunk)

    async def add_delivered_records(self, n: int, *, account: str, at: float) -> None:
        """For `relay bench`: ``n`` synthetic delivered messages with one attempt each."""
        await self.execute([
            ("WITH RECURSIVE i(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM i WHERE k < ?)"
             f" INSERT INTO messages ({COLUMNS})"
             " SELECT printf('D%019d', k), 'delivered', ?, 3, 'app@example.com',"
             " '[[\"to@example.com\", \"delivered\", \"250 2.0.0 ok\"]]', 10240, 1,"
             " ? + k * 1e-4, ? + k * 1e-4, '', ? + k * 1e-4, '' FROM i",
             (n, account, at, at, at)),
            ("INSERT INTO attempts (message_id, account, at, outcome, reply)"
             " SELECT id, account, updated_at, 'delivered', '250 2.0.0 ok' FROM messages"
             " WHERE id LIKE 'D%' AND state='delivered'", ()),
        ])

    async def state_of(self, message_id: str) -> MessageState | None:
        rows = await self._fetch("SELECT state FROM messages WHERE id=?", (message_id,))
        return MessageState(rows[0][0]) if rows else None

    async def attempt_counts(
        self, accounts: Sequence[str], since: float
    ) -> dict[tuple[str, str], int]:
        """Delivery attempts after ``since``: (account, outcome) -> count (`relay status`)."""
        if not accounts:
            return {}
        rows = await self._fetch(  # per account, a range of the attempts_account_at index
            f"SELECT account, outcome, count(*) FROM attempts WHERE account IN"
            f" ({','.join('?' * len(accounts))}) AND at > ? GROUP BY 1, 2",
            (*accounts, since),
        )
        return {(a, o): int(n) for a, o, n in rows}
