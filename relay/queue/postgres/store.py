"""The queue in PostgreSQL (a relay.queue.store.QueueStore), shared by relays on several
hosts.

Every write is one transaction on a connection of a psycopg pool, and returns once
PostgreSQL has committed it: with ``synchronous_commit`` on (checked at open) a 250 means
the message is on the database's disk. PostgreSQL groups concurrent commits itself, so no
writer task is needed here as it is for SQLite.

Claims are one statement (schema.CLAIM_SQL: ``FOR UPDATE SKIP LOCKED`` in a CTE, then
``UPDATE ... RETURNING``), each with the owner and a fresh token that every settling
write names in its WHERE clause. A claim that checks rate windows first locks the
account's row, so relays on several hosts take a window's places one after the other.
Owners prove they are alive with a heartbeat row; a dead owner's claims go back at once.
Wake-ups: the app's NOTIFY after each commit that makes mail due (debounced), heard on a
dedicated LISTEN connection, with a poll every POLL_S as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from relay.delivery.ratelimit import share_for_others
from relay.errors import StoreError, StoreFullError
from relay.observe.logs import event
from relay.queue.migrations import plan
from relay.queue.postgres.admin import OperatorQueries
from relay.queue.postgres.exchange import Exchange
from relay.queue.postgres.outbox import Outbox
from relay.queue.postgres.schema import (
    CHANNEL,
    CLAIM_HIGH_SQL,
    CLAIM_ONE_SQL,
    CLAIM_SQL,
    COLUMNS,
    FLUSH_KEY,
    HEALTH_KEY,
    MIGRATE_LOCK,
    MIGRATIONS,
    PRUNE_LOCK,
    READY,
    RELEASE_HOLD_SQL,
    REPORT_LOCK,
    SCHEMA_TABLE,
    SCHEMA_VERSION,
    SENDS_KEPT_S,
    recipients_json,
    row_to_message,
)
from relay.queue.postgres.shared import HostLimits
from relay.queue.types import (
    AttemptResult,
    Claim,
    MessageState,
    NewEvent,
    NewMessage,
    Priority,
    QueuedMessage,
    Recipient,
)
from relay.queue.urls import mask_url

log = logging.getLogger("relay.store")
# The pool warns at every failed reconnection attempt, on stderr of every CLI command too;
# relay says it once itself, where it matters (451 to DATA, /readyz, start_failed).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
POOL_SIZE = 10  # connections per relay process: sessions committing, claims, reads
POLL_S = 1.5  # the fallback: look for changes this often even without a NOTIFY
NOTIFY_DEBOUNCE_S = 0.01  # NOTIFYs of this long are sent together, once per account
HEARTBEAT_TTL_S = 30.0  # an owner whose row is this old is dead (refreshed every third)
LISTEN_RETRY_S = 1.0
PRUNE_BATCH = 500
PRUNE_INTERVAL_S = 60.0
NOW_SQL = "extract(epoch from clock_timestamp())"  # the database's clock, shared by hosts
UNSAFE_COMMIT = ("off", "local")


class PostgresStore(OperatorQueries, HostLimits, Exchange, Outbox):
    """A queue in a PostgreSQL database, for any number of relays on any hosts.
    ``migrate``: open() brings an older schema to SCHEMA_VERSION instead of refusing it."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        owner: str | None = None,
        role: str = "",
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        allow_unsafe_commit: bool = False,
        pool_size: int = POOL_SIZE,
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
        create: bool = True,
        migrate: bool = False,
    ) -> None:
        self.url = url
        self.display = mask_url(url)  # what logs and errors name
        self._password = password
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.role = role
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.allow_unsafe_commit = allow_unsafe_commit
        self.pool_size = pool_size
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.create = create  # False: an empty database is an error, not a new queue (CLI)
        self.migrate_on_open = migrate
        self.applied: list[int] = []  # the migrations the last open() applied
        self.on_internal_error: Callable[[], None] | None = None
        self.on_wake: Callable[[str], None] | None = None
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pruner: asyncio.Task[None] | None = None
        self._wake_pending: set[str] = set()
        self._wake_event = asyncio.Event()
        self._changed = False
        self._next_poll = 0.0
        self._baseline = False
        self._reporting = False  # this relay exports the queue-wide gauges (REPORT_LOCK)

    # -- connections and errors --------------------------------------------------------
    def conninfo(self) -> str:
        """The libpq connection string: the URL (or service, passfile...), the password
        from the config, and timeouts so that a database that is away answers fast."""
        extra: dict[str, Any] = {
            "connect_timeout": max(1, math.ceil(self.connect_timeout)),
            "application_name": "relay",
            "options": f"-c statement_timeout={int(self.statement_timeout * 1000)}",
            # TCP only (ignored on a unix socket): a peer that vanished is noticed.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.statement_timeout * 1000),
        }
        if self._password is not None:
            extra["password"] = self._password
        try:
            # The URL's own options (search_path...) are kept, relay's added after them.
            given = conninfo_to_dict(self.url).get("options")
            if given:
                extra["options"] = f"{given} {extra['options']}"
            return make_conninfo(self.url, **extra)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"queue.url: {self._mask(str(exc))}") from None

    def _mask(self, text: str) -> str:
        text = mask_url(text)
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _error(self, exc: BaseException) -> StoreError:
        """A driver error as the store's temporary/fatal split, without secrets."""
        if isinstance(exc, PoolTimeout):
            return StoreError(f"queue database unavailable: no connection to {self.display}"
                              f" within {self.connect_timeout:g} s")
        if isinstance(exc, psycopg.errors.DiskFull):
            return StoreFullError(f"queue not writable: {self._mask(str(exc))}")
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):  # 451, not "storage"
            return StoreError(f"queue database {self.display} is read-only:"
                              f" {self._mask(str(exc).strip())}")
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return StoreError(f"queue database too slow: {self._mask(str(exc).strip())}")
        detail = self._mask(str(exc).strip().splitlines()[0] if str(exc).strip() else
                            type(exc).__name__)
        return StoreError(f"queue database error: {detail}")

    @contextlib.asynccontextmanager
    async def _conn(self, *, bounded: bool = True) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection. ``bounded``: the whole use, from waiting for it to the
        last statement, ends within connect_timeout + statement_timeout (and a little):
        a database that stops answering mid-statement without closing the connection
        must not hold a session's DATA or a claim for longer. A listing or an export,
        read as it is consumed, is not bounded."""
        pool = self._pool
        if pool is None:
            raise StoreError("queue is not open")
        limit = self.connect_timeout + self.statement_timeout + 2.0 if bounded else None
        try:
            async with asyncio.timeout(limit), pool.connection(
                    timeout=self.connect_timeout) as conn:
                yield conn
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise self._error(exc) from None
        except TimeoutError:
            raise StoreError(f"queue database {self.display} did not answer within"
                             f" {limit:g} s") from None

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async with self._conn() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    async def execute(self, statements: list[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run writes in one transaction; return each statement's row count."""
        async with self._conn() as conn, conn.transaction():
            counts = []
            for sql, params in statements:
                cur = await conn.execute(sql, params)
                counts.append(cur.rowcount)
            return counts

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            self.conninfo(), min_size=1, max_size=self.pool_size, open=False,
            timeout=self.connect_timeout, kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection, name="relay-queue")
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except (PoolTimeout, psycopg.Error, OSError) as exc:
            await pool.close()
            raise StoreError(f"cannot open queue database {self.display}:"
                             f" {self._error(exc)}") from None
        self._pool = pool
        try:
            await self._check_commit()
            self.applied = await self._migrate()
            await self._heartbeat()
        except BaseException:
            await self.close()
            raise
        self._tasks = [
            asyncio.create_task(self._listen(), name="queue-listen"),
            asyncio.create_task(self._notifier(), name="queue-notify"),
            asyncio.create_task(self._heartbeats(), name="queue-heartbeat"),
        ]

    async def _check_commit(self) -> None:
        """250 means committed on disk: refuse a server that acknowledges commits before
        they are flushed, unless the operator accepted that."""
        rows = await self._fetch("SHOW synchronous_commit")
        setting = str(rows[0][0])
        if setting in UNSAFE_COMMIT and not self.allow_unsafe_commit:
            raise StoreError(
                f"queue database {self.display} has synchronous_commit = {setting}: a"
                " message answered 250 could be lost in a database crash; set it to on"
                " (ALTER ROLE or ALTER DATABASE ... SET synchronous_commit = on), or set"
                " queue.allow_unsafe_commit: true to accept that")

    async def schema_version(self) -> int:
        """The highest migration applied (0: an empty database), read-only, open or not.
        Two statements: PostgreSQL resolves a table named in a statement before running
        it, so one that reads relay_schema fails on a database without it."""
        exists = "SELECT to_regclass('relay_schema') IS NOT NULL"
        sql = "SELECT coalesce(max(version), 0) FROM relay_schema"
        if self._pool is not None:
            if not (await self._fetch(exists))[0][0]:
                return 0
            return int((await self._fetch(sql))[0][0])
        try:
            async with await AsyncConnection.connect(self.conninfo(), autocommit=True) as conn:
                row = await (await conn.execute(exists)).fetchone()
                if not row or not row[0]:
                    return 0
                row = await (await conn.execute(sql)).fetchone()
        except (psycopg.Error, OSError) as exc:
            raise self._error(exc) from None
        return int(row[0]) if row else 0

    async def migrate(self) -> list[int]:
        """Open with ``migrate`` and close again: the versions applied (an open store is
        at SCHEMA_VERSION already)."""
        if self._pool is not None:
            return []
        was, self.migrate_on_open = self.migrate_on_open, True
        try:
            await self.open()
        finally:
            self.migrate_on_open = was
        await self.close()
        return self.applied

    async def _migrate(self) -> list[int]:
        """Apply the migrations the database lacks (a new database: all; an older one:
        only with ``migrate``, else SchemaError), with their relay_schema rows, in one
        transaction under an advisory lock (several relays starting: one migrates, the
        others then find it done). SchemaError for a database a newer relay wrote."""
        applied: list[int] = []
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            await conn.execute(SCHEMA_TABLE)
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM relay_schema")
            row = await cur.fetchone()
            found = plan(int(row[0]) if row else 0, SCHEMA_VERSION)
            if found.newer or (found.missing and not found.new and not self.migrate_on_open):
                raise found.refusal()
            if found.new and not self.create:
                raise StoreError(f"no queue in {self.display} (has `relay serve` run with"
                                 " this queue.url?)")
            if found.new:
                cur = await conn.execute("SELECT to_regclass('messages') IS NOT NULL")
                row = await cur.fetchone()
                if row and row[0]:
                    raise StoreError(f"queue database {self.display} holds a messages table"
                                     " that relay did not create; give relay its own database")
            steps = {number: (name, sql) for number, name, sql in MIGRATIONS}
            for number in found.missing:
                name, sql = steps[number]
                await conn.execute(sql.encode())
                await conn.execute("INSERT INTO relay_schema (version, name) VALUES"
                                   " (%s, %s)", (number, name))
                applied.append(number)
        if applied:
            log.info("queue database %s: applied migrations %s", self.display, applied)
        return applied

    async def close(self) -> None:
        """Stop the background tasks, say this owner is gone, close the pool (a write
        under way finishes first: the pool waits for its connections)."""
        tasks = [*self._tasks, *([self._pruner] if self._pruner else [])]
        self._tasks, self._pruner = [], None
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task stuck in the driver must not keep the relay from stopping
            await asyncio.wait(tasks, timeout=self.connect_timeout)
        if self._pool is not None:
            with contextlib.suppress(StoreError):
                await self._send_wakes()
                await self.execute([("DELETE FROM processes WHERE owner=%s", (self.owner,))])
            pool, self._pool = self._pool, None
            await pool.close(timeout=self.connect_timeout)

    @property
    def writer_alive(self) -> bool:
        return self._pool is not None and not self._pool.closed

    async def check_writable(self) -> None:
        """A round trip on a pooled connection within connect_timeout, to a primary that
        takes writes and still syncs commits (settings may change under a running relay:
        ALTER DATABASE ... SET, then new connections have them)."""
        rows = await self._fetch("SELECT pg_is_in_recovery(),"
                                 " current_setting('transaction_read_only'),"
                                 " current_setting('synchronous_commit')")
        standby, read_only, commit = rows[0] if rows else (False, "off", "on")
        if standby:
            raise StoreError(f"queue database {self.display} is a standby (read-only)")
        if read_only == "on":
            raise StoreError(f"queue database {self.display} is read-only"
                             " (default_transaction_read_only)")
        if str(commit) in UNSAFE_COMMIT and not self.allow_unsafe_commit:
            raise StoreError(f"queue database {self.display} now has synchronous_commit ="
                             f" {commit}: a 250 could be lost in a database crash")

    def check_file(self) -> None:
        """Nothing to check: there is no file (the database's identity is its URL)."""

    # -- liveness, wake-ups ------------------------------------------------------------
    async def _heartbeat(self) -> None:
        await self.execute([(
            "INSERT INTO processes (owner, host, pid, role, expires_at)"
            f" VALUES (%s, %s, %s, %s, {NOW_SQL} + %s) ON CONFLICT (owner) DO UPDATE"
            " SET expires_at = excluded.expires_at",
            (self.owner, socket.gethostname(), os.getpid(), self.role, self.heartbeat_ttl_s))])

    async def _heartbeats(self) -> None:
        """Refresh this owner's row, and take back what dead owners held: a relay killed
        mid-send has its claims queued again within heartbeat_ttl_s and a third, by
        whichever relay looks first (the scheduler's own sweep runs every 30 s)."""
        while True:
            await asyncio.sleep(self.heartbeat_ttl_s / 3)
            with contextlib.suppress(StoreError):
                await self._heartbeat()
                await self._requeue_dead(time.time())

    async def _requeue_dead(self, now: float) -> int:
        """Claims of owners whose heartbeat expired go back to the queue, due now; their
        accounts' workers are woken here and on every other relay."""
        await self._free_held(now)
        rows = await self._fetch(
            "UPDATE messages SET state='queued', lease_until=NULL, owner=NULL,"
            " claim_token=NULL, updated_at=%s WHERE state='sending' AND owner <> %s"
            " AND NOT EXISTS (SELECT 1 FROM processes p WHERE p.owner = messages.owner"
            f" AND p.expires_at > {NOW_SQL}) RETURNING account", (now, self.owner))
        for account in {r[0] for r in rows}:
            self._wake(account)
            if self.on_wake is not None:
                self.on_wake(account)
        if rows:  # the scheduler's own event for a start-up or lease recovery
            event(log, logging.WARNING, "recovered", count=len(rows),
                  reason="messages claimed by relays that are gone (heartbeat expired)"
                         " are queued again")
        return len(rows)

    def _wake(self, account: str) -> None:
        """NOTIFY other relays after this commit (``*``: anything may have changed)."""
        self._wake_pending.add(account)
        self._wake_event.set()

    async def _send_wakes(self) -> None:
        pending, self._wake_pending = self._wake_pending, set()
        if pending:
            await self._fetch("SELECT pg_notify(%s, %s || ' ' || a) FROM unnest(%s::text[]) a",
                              (CHANNEL, self.owner, sorted(pending)))

    async def _notifier(self) -> None:
        """One NOTIFY per account per NOTIFY_DEBOUNCE_S, outside the writes' transactions
        (a NOTIFY inside one takes a global lock at commit and serialises committers)."""
        while True:
            await self._wake_event.wait()
            await asyncio.sleep(NOTIFY_DEBOUNCE_S)
            self._wake_event.clear()
            with contextlib.suppress(StoreError):  # the others' poll fallback finds it
                await self._send_wakes()

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect after losing it (anything missed
        meanwhile is made up by treating the reconnection as a change)."""
        while True:
            try:
                conn = await AsyncConnection.connect(self.conninfo(), autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._changed = True
                    while True:
                        if not self._reporting:
                            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)",
                                                     (REPORT_LOCK,))
                            row = await cur.fetchone()
                            self._reporting = bool(row and row[0])
                        async for note in conn.notifies(timeout=POLL_S):
                            self._heard(note.payload)
            except (psycopg.Error, OSError) as exc:
                log.debug("queue LISTEN connection lost: %s", self._mask(str(exc)))
            finally:
                self._reporting = False  # the session, and its lock, are gone
            await asyncio.sleep(LISTEN_RETRY_S)

    async def reports_queue(self) -> bool:
        """True for the one relay whose LISTEN session holds REPORT_LOCK."""
        return self._reporting

    def _heard(self, payload: str) -> None:
        owner, _, account = payload.partition(" ")
        if owner == self.owner:
            return
        if account == "*":
            self._changed = True
        elif self.on_wake is not None:
            self.on_wake(account)

    async def changed_elsewhere(self) -> bool:
        """True after a NOTIFY of an operator's change, and every POLL_S regardless (the
        fallback: a lost NOTIFY delays mail by at most that long)."""
        now = time.monotonic()
        if not self._baseline:
            self._baseline, self._changed, self._next_poll = True, False, now + POLL_S
            return False
        if self._changed or now >= self._next_poll:
            self._changed, self._next_poll = False, now + POLL_S
            return True
        return False

    # -- the scheduler's side ----------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> str:
        """Return only once the message and its body are committed: its id, or (dedup)
        the id of the message accepted before with the same key, and then nothing is
        written. Without a key: one statement in autocommit (its own transaction, one
        round trip), so both rows or neither."""
        if message.dedup is not None:
            (queued,) = await self.enqueue_all([message])
            return queued
        async with self._conn() as conn:
            await self._insert(conn, message)
        self._wake(message.account)
        return message.id

    async def enqueue_all(self, messages: Sequence[NewMessage]) -> list[str]:
        """Commit every message in one transaction, all or none; the id holding each, as
        enqueue() returns it (dedup per message, a key of an earlier one of these too)."""
        queued = [m.id for m in messages]
        # Keys in one order on every relay: two batches sharing keys cannot deadlock.
        keyed = sorted((m.dedup.key, i) for i, m in enumerate(messages) if m.dedup)
        async with self._conn() as conn, conn.transaction():
            for _, i in keyed:
                queued[i] = await self._first_of(conn, messages[i]) or messages[i].id
            for m, held_by in zip(messages, queued, strict=True):
                if held_by == m.id:
                    await self._insert(conn, m)
        for m, held_by in zip(messages, queued, strict=True):
            if held_by == m.id:
                self._wake(m.account)
        return queued

    @staticmethod
    async def _first_of(conn: AsyncConnection[Any], m: NewMessage) -> str | None:
        """(dedup) The id of the message already accepted with m's key within its window,
        or None after recording m's own key (a new key, or over an expired one), in the
        enqueue's transaction. Two relays submitting one key at once: the key's unique
        index makes the second INSERT wait for the first transaction, then see its row
        (live: nothing inserted, the winner's id read back), so exactly one is queued."""
        if m.dedup is None:
            return None
        for _ in range(3):  # a live key vanishing in between: only if clocks disagree
            cur = await conn.execute(
                "INSERT INTO dedup (key, message_id, expires_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET message_id = excluded.message_id,"
                " expires_at = excluded.expires_at WHERE dedup.expires_at <= %s"
                " RETURNING message_id",
                (m.dedup.key, m.id, m.created_at + m.dedup.window_s, m.created_at))
            if await cur.fetchone() is not None:
                return None
            cur = await conn.execute("SELECT message_id FROM dedup WHERE key = %s",
                                     (m.dedup.key,))
            row = await cur.fetchone()
            if row is not None:
                return str(row[0])
        raise StoreError(f"dedup key of {m.id} could be neither recorded nor read")

    @staticmethod
    async def _insert(conn: AsyncConnection[Any], m: NewMessage) -> None:
        await conn.execute(
            f"WITH m AS (INSERT INTO messages ({COLUMNS}) VALUES"
            " (%s, 'queued', %s, %s, %s, %s, %s, 0, %s, %s, '', %s, %s) RETURNING id)"
            " INSERT INTO bodies (id, data) SELECT id, %s FROM m",
            (m.id, m.account, int(m.priority), m.sender,
             recipients_json(Recipient(r) for r in m.recipients), len(m.body),
             m.created_at, m.not_before, m.created_at, " ".join(m.mail_options), m.body))

    async def claim_due(
        self, account: str, now: float, limit: int, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
    ) -> list[QueuedMessage]:
        """Without rate windows one statement in autocommit; with them, the account's
        row locked, the room counted, and HIGH priority claimed first up to all of it
        when the others may use only their share (reserve_for_high)."""
        if limit <= 0:
            return []
        token = secrets.token_hex(8)
        lease = now + lease_s
        params: dict[str, Any] = {"a": account, "now": now, "n": limit, "lease": lease,
                                  "owner": self.owner, "token": token}
        async with self._conn() as conn:
            if not windows:  # one statement in autocommit: its own transaction
                rows = await (await conn.execute(CLAIM_SQL, params)).fetchall()
            else:
                async with conn.transaction():
                    room, others = await self._room(conn, account, now, limit, windows,
                                                    reserve_for_high)
                    if room <= 0:
                        return []
                    params["n"] = room
                    rows = []
                    if others < room:  # high first, up to the whole room; the rest: theirs
                        rows = await (await conn.execute(CLAIM_HIGH_SQL, params)).fetchall()
                        params["n"] = min(others, room - len(rows))
                    if params["n"] > 0:
                        rows += await (await conn.execute(CLAIM_SQL, params)).fetchall()
        messages = [row_to_message(r) for r in rows]
        for m in messages:
            m.claim = Claim(self.owner, lease, token)
        messages.sort(key=lambda m: (m.priority, m.next_attempt_at, m.created_at))
        return messages

    async def claim_message(
        self, account: str, message_id: str, now: float, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
        held_until: float = 0.0,
    ) -> QueuedMessage | None:
        """One message by id on claim_due's terms (ack: after_upstream); None when it is
        not claimable now (another relay has it, a window is full, not due, paused)."""
        token = secrets.token_hex(8)
        lease = now + lease_s
        params: dict[str, Any] = {"a": account, "now": now, "lease": lease, "id": message_id,
                                  "owner": self.owner, "token": token, "any": True,
                                  "held": held_until}
        async with self._conn() as conn:
            if not windows:
                rows = await (await conn.execute(CLAIM_ONE_SQL, params)).fetchall()
            else:
                async with conn.transaction():
                    room, others = await self._room(conn, account, now, 1, windows,
                                                    reserve_for_high)
                    if room <= 0:
                        return None
                    params["any"] = others > 0
                    rows = await (await conn.execute(CLAIM_ONE_SQL, params)).fetchall()
        if not rows:
            return None
        message = row_to_message(rows[0])
        message.claim = Claim(self.owner, lease, token)
        return message

    async def release_hold(self, message_id: str, held_until: float, now: float) -> None:
        rows = await self._fetch(RELEASE_HOLD_SQL, (now, message_id, held_until))
        for (account,) in rows:
            self._wake(str(account))

    @staticmethod
    async def _room(conn: AsyncConnection[Any], account: str, now: float, limit: int,
                    windows: Sequence[tuple[float, int]], reserve_for_high: float = 0.0,
                    exclude: str = "") -> tuple[int, int]:
        """How many sends the account's windows still allow over every relay: sends
        recorded in each window plus claims not yet finished; and of those, how many
        messages that are not HIGH priority may take (share_for_others). The account's
        row is locked first, so the next claimer counts after this claim commits; the
        counts are one statement, one snapshot (a finish moving a send from 'sending' to
        sends between two statements would be missed by both). Group messages going
        through the account count as its claims (group_sends; ``exclude``: the asker)."""
        await conn.execute("INSERT INTO accounts (name) VALUES (%s) ON CONFLICT DO NOTHING",
                           (account,))
        await conn.execute("SELECT 1 FROM accounts WHERE name = %s FOR UPDATE", (account,))
        sent = ", ".join("(SELECT count(*) FROM sends WHERE account = %s AND at > %s)"
                         for _ in windows)
        params: list[Any] = [account, account, now, exclude]
        for span, _ in windows:
            params += [account, now - span]
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM messages WHERE state = 'sending' AND account = %s)"
            " + (SELECT count(*) FROM group_sends WHERE account = %s AND lease_until >= %s"
            f" AND message_id <> %s), {sent}", params)
        row = await cur.fetchone()
        assert row is not None
        in_flight = int(row[0])
        room = others = limit
        for (_, most), count in zip(windows, row[1:], strict=True):
            room = min(room, most - int(count) - in_flight)
            others = min(others, share_for_others(most, reserve_for_high) - int(count)
                         - in_flight)
        return room, min(room, others)

    async def finish(self, result: AttemptResult, bounce: NewMessage | None = None,
                     events: Sequence[NewEvent] = ()) -> bool:
        """Record an attempt (with its transcript), queue its bounce and write its
        webhook ``events`` to the outbox, if the claim it names (owner and token) still
        holds the message; the send time counts anyway. One statement in
        autocommit (its data-modifying CTEs are one transaction), one round trip, and
        idempotent: the same result again is accepted and changes nothing."""
        a = result
        params: dict[str, Any] = {
            "id": a.id, "state": str(a.state), "rcpts": recipients_json(a.recipients),
            "attempts": a.attempts, "next": a.next_attempt_at, "err": a.last_error,
            "at": a.at, "account": a.account, "outcome": a.outcome, "reply": a.reply,
            "transcript": "\n".join(a.transcript),
            "delivered": a.state is MessageState.DELIVERED,
            "claimer": None if a.claim is None else a.claim.owner, "offered": a.offered}
        held = ""
        if a.claim is not None:
            held = " AND state = 'sending' AND owner = %(owner)s"
            params["owner"] = a.claim.owner
            if a.claim.token:
                held += " AND claim_token = %(token)s"
                params["token"] = a.claim.token
        sql = (
            "WITH upd AS (UPDATE messages SET state = %(state)s, recipients = %(rcpts)s,"
            " attempts = %(attempts)s, next_attempt_at = %(next)s, last_error = %(err)s,"
            " lease_until = NULL, owner = NULL, claim_token = NULL, updated_at = %(at)s"
            f" WHERE id = %(id)s{held} RETURNING id),"
            # Only for a row that still exists (an operator may have deleted it mid-send).
            " att AS (INSERT INTO attempts (message_id, account, at, outcome, reply,"
            " transcript) SELECT id, %(account)s, %(at)s, %(outcome)s, %(reply)s,"
            " %(transcript)s FROM upd),"
            # A delivered body is not needed again; failed ones stay for `queue retry`.
            " gone AS (DELETE FROM bodies WHERE %(delivered)s AND id IN (SELECT id FROM upd)),"
            # Once per attempt: the same finish again (its first commit's reply was lost
            # with the connection, and the worker retried) neither counts the send twice...
            " sent AS (INSERT INTO sends (account, at, message_id)"
            " SELECT %(account)s, %(at)s, %(id)s WHERE %(offered)s AND NOT EXISTS"
            " (SELECT 1 FROM sends"
            " WHERE account = %(account)s AND at = %(at)s AND message_id = %(id)s)),"
            # A group message's hold on its member's windows ends as its send is counted
            # (only the claim's own: a stale claim leaves the new owner's hold alone).
            " hold AS (DELETE FROM group_sends WHERE message_id = %(id)s"
            " AND owner = coalesce(%(claimer)s::text, owner)),"
            # ...nor is taken for a stale claim's: this very outcome is already recorded.
            " prior AS (SELECT 1 FROM messages WHERE id = %(id)s AND state = %(state)s"
            " AND attempts = %(attempts)s AND updated_at = %(at)s AND owner IS NULL)")
        if bounce is not None:  # committed with the outcome that causes it, or not at all
            b = bounce
            params.update({
                "b_id": b.id, "b_account": b.account, "b_priority": int(b.priority),
                "b_sender": b.sender,
                "b_rcpts": recipients_json(Recipient(r) for r in b.recipients),
                "b_size": len(b.body), "b_created": b.created_at, "b_due": b.not_before,
                "b_options": " ".join(b.mail_options), "b_body": b.body})
            source = " FROM upd" if a.claim is not None else ""
            sql += (
                f", bm AS (INSERT INTO messages ({COLUMNS}) SELECT %(b_id)s, 'queued',"
                " %(b_account)s, %(b_priority)s, %(b_sender)s, %(b_rcpts)s, %(b_size)s, 0,"
                " %(b_created)s, %(b_due)s, '', %(b_created)s, %(b_options)s"
                f"{source} RETURNING id),"
                " bb AS (INSERT INTO bodies (id, data) SELECT id, %(b_body)s FROM bm)")
        if events:  # to the outbox with the outcome they report, or not at all
            params.update({
                "e_id": [e.id for e in events], "e_webhook": [e.webhook for e in events],
                "e_type": [e.type for e in events], "e_body": [e.body for e in events],
                "e_created": [e.created_at for e in events]})
            held_only = " WHERE EXISTS (SELECT 1 FROM upd)" if a.claim is not None else ""
            sql += (
                ", ev AS (INSERT INTO events (id, webhook, type, body, created_at,"
                " next_attempt_at) SELECT i, w, t, b, c, c FROM unnest(%(e_id)s::text[],"
                " %(e_webhook)s::text[], %(e_type)s::text[], %(e_body)s::text[],"
                f" %(e_created)s::float8[]) AS e(i, w, t, b, c){held_only}"
                " ON CONFLICT DO NOTHING)")
        if a.forget_dedup is not None:
            # A refusal the client was given as its answer: the submission was not
            # accepted, so its dedup key goes with the outcome (a retry is tried again).
            params["forget"] = a.forget_dedup
            held_only = " AND EXISTS (SELECT 1 FROM upd)" if a.claim is not None else ""
            sql += (", fd AS (DELETE FROM dedup WHERE key = %(forget)s AND message_id = %(id)s"
                    f"{held_only})")
        sql += " SELECT (SELECT count(*) FROM upd) + (SELECT count(*) FROM prior)"
        async with self._conn() as conn:
            row = await (await conn.execute(sql, params)).fetchone()
        accepted = a.claim is None or bool(row and row[0])
        if accepted and bounce is not None:
            self._wake(bounce.account)
        return accepted

    async def renew(self, ids: Sequence[str], lease_until: float) -> int:
        """Extend this owner's claims on ``ids``; return how many it still holds."""
        if not ids:
            return 0
        counts = await self.execute([
            ("UPDATE messages SET lease_until=%s WHERE id = ANY(%s) AND state='sending'"
             " AND owner=%s", (lease_until, list(ids), self.owner)),
            # A group message's place in its member's windows lasts as long as its claim.
            ("UPDATE group_sends SET lease_until=%s WHERE message_id = ANY(%s)"
             " AND owner=%s", (lease_until, list(ids), self.owner))])
        return counts[0]

    async def record_recipients(self, message_id: str, recipients: Sequence[Recipient],
                                sent: tuple[str, float] | None = None) -> bool:
        """Mid-send progress: only while this owner still holds the message."""
        counted: list[tuple[str, Sequence[Any]]] = [
            ("INSERT INTO sends (account, at, message_id) VALUES (%s, %s, %s)",
             (*sent, message_id))] if sent else []
        counts = await self.execute([(
            "UPDATE messages SET recipients=%s WHERE id=%s AND state='sending' AND owner=%s",
            (recipients_json(recipients), message_id, self.owner)), *counted])
        return counts[0] == 1

    async def requeue(self, ids: Sequence[str], now: float, *, due_at: float | None = None
                      ) -> None:
        """Give claimed messages back: due at once (shutdown), or deferred until
        ``due_at`` (their account backs off; no attempt is counted)."""
        if not ids:
            return
        lead: tuple[float, ...] = ()
        if due_at is None:
            sets = "state='queued'"
        else:
            sets, lead = ("state='deferred', next_attempt_at=greatest(next_attempt_at, %s)",
                          (due_at,))
        rows = await self._fetch(
            f"UPDATE messages SET {sets}, lease_until=NULL, owner=NULL, claim_token=NULL,"
            " updated_at=%s WHERE id = ANY(%s) AND state='sending' AND owner=%s"
            " RETURNING account", (*lead, now, list(ids), self.owner))
        if due_at is None:
            for account in {r[0] for r in rows}:
                self._wake(account)

    async def shift_times(self, delta: float) -> int:
        """The wall clock jumped by ``delta``: move unfinished messages' times with it
        (as the SQLite store does; a client's Deferred-Delivery time stays)."""
        counts = await self.execute([(
            "UPDATE messages SET created_at = created_at + %s, lease_until = lease_until + %s,"
            " next_attempt_at = CASE WHEN attempts = 0 AND next_attempt_at > created_at"
            " AND state <> 'deferred' AND last_error = ''"
            " THEN next_attempt_at ELSE next_attempt_at + %s END"
            " WHERE state IN ('queued', 'deferred', 'held', 'sending')",
            (delta, delta, delta))])
        return counts[0]

    async def requeue_expired(self, now: float, *, keep: Sequence[str] = ()) -> int:
        """Claims nobody will finish go back: those whose lease ran out, and those of an
        owner whose heartbeat expired (a relay killed, or cut off for longer than
        heartbeat_ttl_s), except ``keep``. A live owner's claims under lease stay. Their
        connection slots and probes are freed too."""
        await self._free_held(now)
        rows = await self._fetch(
            "UPDATE messages SET state='queued', lease_until=NULL, owner=NULL,"
            " claim_token=NULL, updated_at=%s"
            " WHERE state='sending' AND NOT (id = ANY(%s)) AND (lease_until < %s"
            " OR owner IS NULL OR (owner <> %s AND NOT EXISTS (SELECT 1 FROM processes p"
            f" WHERE p.owner = messages.owner AND p.expires_at > {NOW_SQL})))"
            " RETURNING account", (now, list(keep), now, self.owner))
        for account in {r[0] for r in rows}:
            self._wake(account)
        return len(rows)

    async def recover(self, now: float) -> int:
        """At start: claims of dead owners or run-out leases go back to the queue."""
        return await self.requeue_expired(now)

    async def next_due_at(self, account: str) -> float | None:
        per_level = " UNION ALL ".join(
            f"(SELECT min(next_attempt_at) AS t FROM messages WHERE account=%s"
            f" AND priority={int(p)} AND state IN {READY})" for p in Priority)
        rows = await self._fetch(f"SELECT min(t) FROM ({per_level}) x",
                                 (account,) * len(Priority))
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def waiting_count(self, account: str) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM messages WHERE account=%s AND state IN"
            " ('queued', 'deferred', 'sending')", (account,))
        return int(rows[0][0])

    async def load_body(self, message_id: str) -> bytes:
        rows = await self._fetch("SELECT data FROM bodies WHERE id=%s", (message_id,))
        if not rows:
            raise StoreError(f"body of {message_id} is missing from the queue")
        return bytes(rows[0][0])

    async def recent_sends(self, account: str, since: float) -> list[float]:
        rows = await self._fetch(
            "SELECT at FROM sends WHERE account=%s AND at>%s ORDER BY at", (account, since))
        return [float(r[0]) for r in rows]

    async def counts(self) -> dict[tuple[str, str], int]:
        """Messages per (account, state): one index-only scan of messages_state."""
        rows = await self._fetch("SELECT account, state, count(*) FROM messages"
                                 " GROUP BY account, state")
        return {(a, s): int(n) for a, s, n in rows}

    async def oldest_ready(self) -> dict[str, float]:
        rows = await self._fetch(
            "SELECT account, min(created_at) FROM messages"
            " WHERE state IN ('queued', 'deferred', 'sending') GROUP BY account")
        return {a: float(t) for a, t in rows}

    # -- shared state between relays ---------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key=%s", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self.execute([("INSERT INTO meta (key, value) VALUES (%s, %s)"
                             " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                             (key, value))])

    async def request_flush(self, at: float) -> None:
        """Also ends every account's backoff, for every relay. The rows stay, ended: the
        next send is one probe for all relays (take_probe), not one per relay."""
        await self.execute([
            ("INSERT INTO meta (key, value) VALUES (%s, %s)"
             " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (FLUSH_KEY, repr(at))),
            ("UPDATE backoffs SET until = LEAST(until, %s)", (at,))])
        self._wake("*")

    async def flush_requested(self) -> str | None:
        return await self.get_meta(FLUSH_KEY)

    async def publish_health(self, report: str) -> None:
        await self.set_meta(HEALTH_KEY, report)

    async def read_health(self) -> str | None:
        return await self.get_meta(HEALTH_KEY)

    async def set_paused(self, account: str, paused: bool, at: float) -> None:
        if paused:
            await self.execute([("INSERT INTO paused (account, at) VALUES (%s, %s)"
                                 " ON CONFLICT DO NOTHING", (account, at))])
        else:
            await self.execute([("DELETE FROM paused WHERE account=%s", (account,))])
        self._wake("*")

    async def paused_accounts(self) -> dict[str, float]:
        rows = await self._fetch("SELECT account, at FROM paused")
        return {str(a): float(at) for a, at in rows}

    async def processes(self) -> list[tuple[int, str]]:
        """(pid, role) of the live relay processes on this database (not this one)."""
        rows = await self._fetch(
            "SELECT pid, role FROM processes WHERE owner <> %s AND role <> ''"
            f" AND expires_at > {NOW_SQL} ORDER BY host, pid", (self.owner,))
        return [(int(p), str(r)) for p, r in rows]

    # -- pruning -----------------------------------------------------------------------
    async def prune(self, now: float, keep_delivered_s: float,
                    batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """One batch, by one relay at a time (an advisory lock; the others skip): delivered
        messages older than ``keep_delivered_s``, old send times, dedup keys past their
        window, dead owners' rows."""
        old = ("SELECT id FROM messages WHERE state='delivered' AND updated_at < %s"
               " ORDER BY updated_at LIMIT %s")
        before = now - keep_delivered_s
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,))
            row = await cur.fetchone()
            if not row or not row[0]:
                return 0, 0
            cur = await conn.execute(
                f"WITH old AS ({old}), a AS (DELETE FROM attempts WHERE message_id IN"
                " (SELECT id FROM old)), b AS (DELETE FROM bodies WHERE id IN"
                " (SELECT id FROM old)) DELETE FROM messages WHERE id IN (SELECT id FROM old)",
                (before, batch))
            messages = cur.rowcount
            cur = await conn.execute(
                "DELETE FROM sends WHERE ctid = ANY(ARRAY(SELECT ctid FROM sends WHERE at < %s"
                " ORDER BY at LIMIT %s))", (now - SENDS_KEPT_S, batch))
            sends = cur.rowcount
            cur = await conn.execute(
                "DELETE FROM dedup WHERE key = ANY(ARRAY(SELECT key FROM dedup"
                " WHERE expires_at < %s LIMIT %s))", (now, batch))
            sends = max(sends, cur.rowcount)  # as SQLite's: the most of sends or keys
            await conn.execute(f"DELETE FROM processes WHERE expires_at < {NOW_SQL} - 3600")
        return messages, sends

    async def prune_all(self, now: float, keep_delivered_s: float,
                        batch: int = PRUNE_BATCH) -> int:
        total = 0
        while True:
            messages, sends = await self.prune(now, keep_delivered_s, batch)
            total += messages
            if messages < batch and sends < batch:
                return total
            await asyncio.sleep(0)

    def start_pruning(self, keep_delivered_s: float, clock: Callable[[], float],
                      interval_s: float = PRUNE_INTERVAL_S) -> None:
        self._pruner = asyncio.create_task(
            self._prune_loop(keep_delivered_s, clock, interval_s), name="queue-pruner")

    async def _prune_loop(self, keep_delivered_s: float, clock: Callable[[], float],
                          interval_s: float) -> None:
        while True:
            try:
                removed = await self.prune_all(clock(), keep_delivered_s)
            except StoreError as exc:
                log.warning("queue pruning failed, will retry: %s", exc)
            else:
                if removed:
                    log.debug("pruned %d delivered messages", removed)
            await asyncio.sleep(interval_s)
