"""The durable queue (a relay.queue.store.QueueStore): SQLite, WAL, synchronous=FULL.

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
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiosqlite

from relay.config.sizes import format_size
from relay.errors import (
    StoreBusyError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreReserveError,
)
from relay.queue.migrations import plan
from relay.queue.sqlite.accounts import AccountControl
from relay.queue.sqlite.admin import OperatorQueries
from relay.queue.sqlite.exchange import Exchange
from relay.queue.sqlite.maintenance import file_version
from relay.queue.sqlite.outbox import Outbox
from relay.queue.sqlite.owners import Owners
from relay.queue.sqlite.prune import Pruning
from relay.queue.sqlite.schema import (
    APPLICATION_ID,
    FLUSH_KEY,
    HEALTH_KEY,
    PRAGMAS,
    READY,
    RELEASE_HOLD_SQL,
    SCHEMA_VERSION,
    apply_migration,
    map_sqlite_error,
    recipients_json,
)
from relay.queue.sqlite.shared import HostLimits
from relay.queue.sqlite.writer import (
    ClaimDue,
    Enqueue,
    Finish,
    Op,
    Statements,
    apply,
    settle,
)
from relay.queue.types import (
    AttemptResult,
    NewEvent,
    NewMessage,
    Priority,
    QueuedMessage,
    Recipient,
)

log = logging.getLogger("relay.store")
LOCK_WAIT_S = 5.0  # a new message waits at most this long for the write lock (then 451)
T = TypeVar("T")


def _take_write_lock(fd: int) -> float:
    """Block until this process holds the queue's write lock; return the seconds waited."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        started = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        return time.monotonic() - started


def server_lock_path(queue: Path) -> Path:
    """The lock `relay serve` (or its supervisor) holds on a queue file while it runs."""
    return queue.with_name(queue.name + ".lock")


class SQLiteStore(Pruning, OperatorQueries, AccountControl, Exchange, Outbox,
                  HostLimits):
    """The embedded queue. ``commit='per-message'`` syncs each write on its own;
    ``migrate``: open() brings an older file to SCHEMA_VERSION instead of refusing it."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    def __init__(self, path: Path, *, commit: str = "group", lock: bool = True,
                 owner: str | None = None, role: str = "", min_free: int = 0,
                 migrate: bool = False) -> None:
        self.path = Path(path)
        self.migrate_on_open = migrate
        self.applied: list[int] = []  # the migrations the last open() applied
        self.min_free = min_free  # bytes new messages must leave free (queue.min_free)
        # Recorded with each claim; unique per open store (a pid alone is reused, and is
        # 1 in every container), so a restarted process never passes for its predecessor.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._owners = Owners(self.path)
        self.role = role  # listed by `relay status` while open ('' for the CLI: not listed)
        self.lock_wait_s = LOCK_WAIT_S
        self._write_lock_fd: int | None = None
        self._contended_at = float("-inf")  # (writer thread) the last wait for the lock
        self._group = commit == "group"
        self._lock = lock
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None  # used only on the writer thread
        self._write_thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: asyncio.Queue[Op | None] = asyncio.Queue()  # None: stop
        self._writer: asyncio.Task[None] | None = None
        self._data_version: int | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.on_internal_error: Callable[[], None] | None = None  # counted by the app
        self.on_wake: Callable[[str], None] | None = None  # (one host: the app wakes its own)
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        # Messages are private: a new queue directory and file are for relay's user only
        # (SQLite gives its -wal and -shm files the database file's permissions).
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            if self._lock:
                self._take_lock()
            # Never through a symlink: whoever can write the folder could point it at
            # any file, which a root `relay sendmail` would create or lock.
            self._write_lock_fd = os.open(self.path.with_name(self.path.name + ".write-lock"),
                                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._owners.register(self.owner, self.role)
        except OSError as exc:  # not "cannot listen": say which file and why
            where = exc.filename or self.path
            raise StoreError(f"queue.path: cannot create {where}: {exc.strerror}") from None
        if self._lock:  # `relay serve` or a supervisor: tidy what killed processes left
            self._owners.sweep()
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
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
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
            assert self._write_lock_fd is not None
            _take_write_lock(self._write_lock_fd)  # two workers starting: one migrates
            try:
                found = plan(self._check_file(db), SCHEMA_VERSION)
                if found.newer or (found.missing and not found.new
                                   and not self.migrate_on_open):
                    raise found.refusal()
                # Only when needed: a write here would wake a running server for nothing
                # each time `relay queue list` opens the file.
                for version in found.missing:
                    apply_migration(db, version)
                self.applied = list(found.missing)
            finally:
                fcntl.flock(self._write_lock_fd, fcntl.LOCK_UN)
        except BaseException:
            db.close()
            raise
        return db

    def _check_file(self, db: sqlite3.Connection) -> int:
        """Refuse foreign files; return the file's schema version."""
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is not a relay queue file (it holds other data)")
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    async def schema_version(self) -> int:
        """The file's user_version (0: no file yet, or empty), read-only, open or not."""
        return await asyncio.to_thread(file_version, self.path)

    async def migrate(self) -> list[int]:
        """Open with ``migrate`` and close again: the versions applied. An open store is
        at SCHEMA_VERSION already (open() saw to it), so nothing is left to do."""
        if self._write_thread is not None:
            return []
        was, self.migrate_on_open = self.migrate_on_open, True
        try:
            await self.open()
        finally:
            self.migrate_on_open = was
        await self.close()
        return self.applied

    def _take_lock(self) -> None:
        lock = server_lock_path(self.path)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"another relay is already using {self.path} (lock {lock} is held)"
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
                    settle([op], StoreError("queue closed before this write"))
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
        self._release_locks()
        if cancelled:
            raise asyncio.CancelledError

    def _release_locks(self) -> None:
        """The queue lock, the write lock's file and this owner's liveness file."""
        for fd in (self._lock_fd, self._write_lock_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._write_lock_fd = None
        self._owners.release()

    # -- the writer -------------------------------------------------------------
    @property
    def writer_alive(self) -> bool:
        """False when the task that commits every write is not running (see /readyz)."""
        return self._writer is not None and not self._writer.done()

    async def _submit(self, op: Op) -> Any:
        if self._writer is None:
            raise StoreError("queue is not open")
        if self._writer.done():
            # Answer at once (451 to DATA, /readyz fails) rather than wait forever.
            raise StoreError("queue writer is not running")
        op.future = asyncio.get_running_loop().create_future()
        op.submitted = time.monotonic()
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
                settle(batch, StoreError(f"queue write failed: {type(exc).__name__}"))

    async def _write_batch(self, batch: list[Op]) -> None:
        error = await self._commit(batch)
        if error is not None and len(batch) > 1 and not isinstance(error, StoreFullError):
            # One bad write must not fail the others: each again on its own.
            for op in batch:
                settle([op], await self._commit([op]))
            return
        settle(batch, error)

    async def _commit(self, batch: list[Op]) -> StoreError | None:
        """Apply and commit a batch; never raises (the writer must outlive any bad write)."""
        return await self._in_writer(self._commit_now, batch)

    def _commit_now(self, batch: list[Op]) -> StoreError | None:
        """(writer thread) The batch's statements and the commit, or a rollback.

        Several processes write one file: each takes the write lock (a flock on a side
        file) before BEGIN IMMEDIATE and drops it after COMMIT. The kernel wakes the next
        writer the moment the lock is free, where SQLite's busy handler would sleep and
        poll (18-34 ms p99 against 7 ms, /work/shared/notes/sqlite-multiprocess.md), and
        no writer ever meets SQLITE_BUSY. A new message that has waited longer than
        ``lock_wait_s`` while other processes held the lock is refused, not written
        (StoreBusyError, 451 4.3.0): its client has waited long enough, and may send it
        again safely. Claims and outcomes in the batch are committed as usual.
        """
        db = self._db
        fd = self._write_lock_fd
        assert db is not None and fd is not None
        if _take_write_lock(fd):
            self._contended_at = time.monotonic()
        try:
            now = time.monotonic()
            for op in batch:
                waited = now - op.submitted
                if (isinstance(op, Enqueue) and waited > self.lock_wait_s
                        and op.submitted <= self._contended_at):
                    op.error = StoreBusyError(  # answered by settle(), on the loop
                        f"queue busy: waited {waited:.1f} s for the write lock")
            batch = [op for op in batch if op.error is None]
            try:
                db.execute("BEGIN IMMEDIATE")
                apply(db, batch)
                db.commit()
            except Exception as exc:  # sqlite3 errors, and e.g. text sqlite cannot encode
                with contextlib.suppress(sqlite3.Error):
                    db.rollback()
                if isinstance(exc, sqlite3.Error):
                    return map_sqlite_error(exc)
                log.exception("queue write failed")
                return StoreError(f"queue write failed: {type(exc).__name__}")
            return None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- the scheduler's side ----------------------------------------------------
    def _check_reserve(self) -> None:
        """Refuse new mail below ``min_free``: the space left is for claims and outcomes,
        which must write for anything to be delivered (or recorded as sent)."""
        if not self.min_free:
            return
        try:
            st = os.statvfs(self.path.parent)
        except OSError as exc:
            raise StoreError(f"cannot check free space for {self.path}: {exc.strerror}"
                             ) from None
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            raise StoreReserveError(
                f"queue file system has {format_size(free)} free, below queue.min_free"
                f" ({format_size(self.min_free)})")

    def check_file(self) -> None:
        """StoreError if ``path`` is no longer the file this store has open (deleted or
        replaced while relay runs): what is committed then goes to a file nobody will
        open again, and is lost at the next restart."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(f"queue file {self.path} was deleted while relay runs;"
                             " restart relay (mail committed since is in the deleted file)"
                             ) from None
        except OSError as exc:
            raise StoreError(f"cannot check queue file {self.path}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreError(f"queue file {self.path} was replaced while relay runs; restart"
                             " relay (mail committed since is in the old file)")

    async def enqueue(self, message: NewMessage) -> str:
        """Return only once the message is committed and synced: its id, or (dedup) the
        id of the message accepted before with the same key, and then nothing is queued."""
        self.check_file()
        self._check_reserve()
        (queued,) = await self._submit(Enqueue(messages=(message,)))
        return str(queued)

    async def enqueue_all(self, messages: Sequence[NewMessage]) -> list[str]:
        """Return only once every message is committed and synced, in one transaction
        (a failed batch is retried op by op, and this is one op): the id holding each,
        as enqueue() returns it."""
        self.check_file()
        self._check_reserve()
        queued: list[str] = await self._submit(Enqueue(messages=tuple(messages)))
        return queued

    async def claim_due(
        self, account: str, now: float, limit: int, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
    ) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        result: list[QueuedMessage] = await self._submit(
            ClaimDue(account=account, now=now, limit=limit, lease_s=lease_s, owner=self.owner,
                     windows=tuple(windows), reserve_for_high=reserve_for_high)
        )
        return result

    async def claim_message(
        self, account: str, message_id: str, now: float, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
        held_until: float = 0.0,
    ) -> QueuedMessage | None:
        claimed: list[QueuedMessage] = await self._submit(
            ClaimDue(account=account, now=now, limit=1, lease_s=lease_s, owner=self.owner,
                     windows=tuple(windows), message_id=message_id,
                     reserve_for_high=reserve_for_high, held_until=held_until)
        )
        return claimed[0] if claimed else None

    async def release_hold(self, message_id: str, held_until: float, now: float) -> None:
        await self.execute([(RELEASE_HOLD_SQL, (now, message_id, held_until))])

    async def finish(self, result: AttemptResult, bounce: NewMessage | None = None,
                     events: Sequence[NewEvent] = ()) -> bool:
        """Record an attempt's outcome, queue its bounce and its webhook events, if any,
        in one transaction.

        False: the claim it names no longer holds the message (its lease ran out and
        another process took it), so nothing of it was recorded but its send time.
        """
        accepted: bool = await self._submit(Finish(attempt=result, bounce=bounce,
                                                   events=tuple(events)))
        return accepted

    async def renew(self, ids: Sequence[str], lease_until: float) -> int:
        """Extend this owner's claims on ``ids``; return how many it still holds."""
        if not ids:
            return 0
        counts = await self.execute(
            [("UPDATE messages SET lease_until=? WHERE id=? AND state='sending' AND owner=?",
              (lease_until, i, self.owner)) for i in ids]
            # A group message's place in its member's windows lasts as long as its claim.
            + [("UPDATE group_sends SET lease_until=? WHERE owner=? AND message_id IN"
                f" ({','.join('?' * len(ids))})", (lease_until, self.owner, *ids))]
        )
        return sum(counts[:len(ids)])

    async def check_writable(self) -> None:
        """An empty transaction through the writer, and the free-space reserve: raises
        StoreError if new mail would not be accepted now."""
        self.check_file()
        self._check_reserve()
        await self.execute([])

    async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run writes in one transaction; return each statement's row count."""
        counts: list[int] = await self._submit(Statements(statements=statements))
        return counts

    async def record_recipients(self, message_id: str, recipients: Sequence[Recipient],
                                sent: tuple[str, float] | None = None) -> bool:
        """Mid-send progress: only while this owner still holds the message."""
        counted = [("INSERT INTO sends (account, at) VALUES (?, ?)", sent)] if sent else []
        counts = await self.execute([(
            "UPDATE messages SET recipients=? WHERE id=? AND state='sending' AND owner=?",
            (recipients_json(recipients), message_id, self.owner)), *counted])
        return counts[0] == 1

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
                (f"UPDATE messages SET {sql}, lease_until=NULL, owner=NULL, updated_at=?"
                 " WHERE id=? AND state='sending' AND owner=?", (*lead, now, i, self.owner))
                for i in ids
            ]
        )

    async def shift_times(self, delta: float) -> int:
        """The wall clock jumped by ``delta`` seconds: move the stored times of unfinished
        messages with it, so their age, retry delay and lease keep their real length.

        A time a client asked for (Deferred-Delivery: never tried, due after arrival) is
        a time of day and stays. A message without attempts can also wait out its
        account's backoff ('deferred', or an error recorded by a send that never reached
        the upstream): that time moves.
        """
        counts = await self.execute([(
            "UPDATE messages SET created_at = created_at + ?, lease_until = lease_until + ?,"
            " next_attempt_at = CASE WHEN attempts = 0 AND next_attempt_at > created_at"
            " AND state <> 'deferred' AND last_error = ''"
            " THEN next_attempt_at ELSE next_attempt_at + ? END"
            " WHERE state IN ('queued', 'deferred', 'held', 'sending')",
            (delta, delta, delta),
        )])
        return counts[0]

    async def requeue_expired(self, now: float, *, keep: Sequence[str] = ()) -> int:
        """Claims nobody will finish go back to the queue: those whose lease ran out, and
        those of a process that is gone (``Owners``), except ``keep`` (this process is
        still on them). A live process's claims under lease are never touched."""
        rows = await self._fetch(
            "SELECT id, owner, lease_until < ? FROM messages WHERE state='sending'", (now,))
        holders = {str(r[0]) for r in await self._fetch(self._holders())}
        dead = self._owners.dead({r[1] or "" for r in rows} | holders)
        # Their connection slots and probes too (relay.queue.sqlite.shared).
        await self.execute(self._free_held(dead & holders, now))
        kept = set(keep)
        sql = ("UPDATE messages SET state='queued', lease_until=NULL, owner=NULL,"
               " updated_at=? WHERE id=? AND state='sending' AND owner IS ?")
        stale: list[tuple[str, tuple[Any, ...]]] = []
        for mid, owner, expired in rows:
            if mid in kept:
                continue
            if (owner or "") in dead:
                stale.append((sql, (now, mid, owner)))
            elif expired:  # a live owner may have renewed it since: look again
                stale.append((sql + " AND lease_until < ?", (now, mid, owner, now)))
        if not stale:
            return 0
        counts = await self.execute(stale)
        return sum(counts)

    async def recover(self, now: float) -> int:
        """At start: messages left 'sending' by a process that is gone (a crash, this
        process's predecessor) or whose lease ran out go back to the queue; claims of
        live processes stay theirs. (Old send times are left to the pruner: one big
        delete here would hold up the start.)"""
        return await self.requeue_expired(now)

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

    @contextlib.asynccontextmanager
    async def _cursor(self, sql: str, params: Sequence[Any]) -> AsyncIterator[aiosqlite.Cursor]:
        """A cursor for results read a page at a time, on a connection of its own: an
        open statement holds its connection's read snapshot, and on the shared reader a
        later read would run inside it and miss newer commits."""
        if self._reader is None:
            raise StoreError("queue is not open")
        try:
            db = await self._connect()
            try:
                async with db.execute(sql, params) as cursor:
                    yield cursor
            finally:
                await db.close()
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
        """Also ends every account's backoff, for every process. The rows stay, ended: the
        next send is one probe for the host (take_probe), not one per process."""
        await self.execute(
            [("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
              " SET value=excluded.value", (FLUSH_KEY, repr(at))),
             ("UPDATE backoffs SET until = min(until, ?)", (at,))])

    async def flush_requested(self) -> str | None:
        return await self.get_meta(FLUSH_KEY)

    async def publish_health(self, report: str) -> None:
        await self.set_meta(HEALTH_KEY, report)

    async def read_health(self) -> str | None:
        return await self.get_meta(HEALTH_KEY)

    async def reports_queue(self) -> bool:
        """Always: one host's processes export through one /metrics (worker 0's)."""
        return True

    async def processes(self) -> list[tuple[int, str]]:
        """(pid, role) of the relay processes using this queue now (not this one)."""
        return self._owners.alive()
