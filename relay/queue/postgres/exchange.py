"""A whole PostgreSQL queue out and in (`relay queue export` / `import`): every message
with its attempts and body, the send times kept for rate limits, the dedup keys still in
their window and the webhook events not yet sent. The same semantics
as the SQLite store's (relay/queue/sqlite/exchange.py).

A mixin of PostgresStore. An export reads through a server-side cursor in one REPEATABLE
READ, read-only transaction: one snapshot of a queue the relays keep changing, a page at
a time. An import commits windows of messages, one transaction each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import TYPE_CHECKING, Any

from relay.errors import StoreError
from relay.queue.bulk import EXPORT_PAGE, ROWS_WINDOW, message_windows, statement_windows
from relay.queue.postgres.schema import COLUMNS, recipients_json
from relay.queue.rows import (
    ATTEMPT_COLUMNS,
    DEDUP_COLUMNS,
    EXPORT_EVENTS_SQL,
    EXPORT_MESSAGES_SQL,
    attempts_by_message,
    exported_dedup,
    exported_event,
    exported_message,
)
from relay.queue.types import (
    ExportedAttempt,
    ExportedDedup,
    ExportedEvent,
    ExportedMessage,
)

if TYPE_CHECKING:
    from psycopg import AsyncConnection


class Exchange:
    """Export and import, on PostgresStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
                         ) -> list[Any]: ...
        def _conn(self, *, bounded: bool = True
                  ) -> contextlib.AbstractAsyncContextManager[AsyncConnection[Any]]: ...
        def _wake(self, account: str) -> None: ...
        async def execute(self, statements: list[tuple[str, Sequence[Any]]]) -> list[int]: ...

    async def export_messages(self, *, page: int = EXPORT_PAGE
                              ) -> AsyncGenerator[ExportedMessage, None]:
        now = time.time()
        async with self._conn(bounded=False) as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            async with conn.cursor(name="relay_export") as rows:
                await rows.execute(EXPORT_MESSAGES_SQL)
                while batch := await rows.fetchmany(page):
                    logs = await _attempts(conn, [row[0] for row in batch])
                    for row in batch:
                        yield exported_message(row, logs, now)

    async def import_messages(self, items: AsyncIterable[ExportedMessage], *, merge: bool
                              ) -> tuple[int, int]:
        """Add ``items`` as they are; an id already in the queue is skipped. Refused into
        a queue that holds messages unless ``merge``."""
        if not merge and await self._fetch("SELECT 1 FROM messages LIMIT 1"):
            raise StoreError("the queue already holds messages: import into an empty queue,"
                             " or merge into this one (--merge)")
        done = skipped = 0
        async for window in message_windows(items, time.time()):
            imported = await self._import_window(window)
            done, skipped = done + imported, skipped + len(window) - imported
        if done:
            self._wake("*")
        return done, skipped

    async def _import_window(self, window: list[ExportedMessage]) -> int:
        imported = 0
        async with self._conn() as conn, conn.transaction():
            for m in window:
                cur = await conn.execute(
                    f"INSERT INTO messages ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s,"
                    " %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                    (m.id, str(m.state), m.account, int(m.priority), m.sender,
                     recipients_json(m.recipients), m.size, m.attempts, m.created_at,
                     m.next_attempt_at, m.last_error, m.updated_at,
                     " ".join(m.mail_options)))
                if await cur.fetchone() is None:
                    continue  # already in this queue
                imported += 1
                if m.body is not None:
                    await conn.execute("INSERT INTO bodies (id, data) VALUES (%s, %s)",
                                       (m.id, m.body))
                if m.attempts_log:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            "INSERT INTO attempts (message_id, account, at, outcome, reply,"
                            " transcript) VALUES (%s, %s, %s, %s, %s, %s)",
                            [(m.id, a.account, a.at, a.outcome, a.reply,
                              "\n".join(a.transcript)) for a in m.attempts_log])
        return imported

    async def export_sends(self) -> AsyncGenerator[tuple[str, float], None]:
        async with self._conn(bounded=False) as conn, conn.transaction(), conn.cursor(
                name="relay_export_sends") as rows:
            await rows.execute("SELECT account, at FROM sends ORDER BY account, at")
            while batch := await rows.fetchmany(ROWS_WINDOW):
                for account, at in batch:
                    yield str(account), float(at)

    async def import_sends(self, sends: AsyncIterable[tuple[str, float]]) -> int:
        """Record send times, each as it is: sends at one time (several finishes in one
        clock tick) all count. Only a time already recorded as often (the same export
        imported again) is not doubled. Equal times stay in one window (the export
        comes ordered by account and time), so the count covers all of them."""
        added = 0
        window: list[tuple[str, float]] = []

        async def commit() -> int:
            rows = await self._fetch(
                "WITH x AS (SELECT a, t, count(*) AS n FROM unnest(%s::text[], %s::float8[])"
                " AS x(a, t) GROUP BY a, t)"
                " INSERT INTO sends (account, at) SELECT a, t FROM x, generate_series(1,"
                " x.n - (SELECT count(*) FROM sends s WHERE s.account = x.a AND s.at = x.t))"
                " RETURNING 1",
                ([a for a, _ in window], [t for _, t in window]))
            window.clear()
            return len(rows)

        async for account, at in sends:
            if len(window) >= ROWS_WINDOW and window[-1] != (account, at):
                added += await commit()
            window.append((account, at))
        if window:
            added += await commit()
        return added

    async def export_dedup(self) -> AsyncGenerator[ExportedDedup, None]:
        async with self._conn(bounded=False) as conn, conn.transaction(), conn.cursor(
                name="relay_export_dedup") as rows:
            await rows.execute(f"SELECT {DEDUP_COLUMNS} FROM dedup"
                               " WHERE expires_at > %s ORDER BY key", (time.time(),))
            while batch := await rows.fetchmany(ROWS_WINDOW):
                for row in batch:
                    yield exported_dedup(row)

    async def import_dedup(self, keys: AsyncIterable[ExportedDedup]) -> int:
        sql = ("INSERT INTO dedup (key, message_id, expires_at) VALUES (%s, %s, %s)"
               " ON CONFLICT (key) DO NOTHING")  # the queue's own key stays
        rows = ((sql, (d.key, d.message_id, d.expires_at)) async for d in keys)
        return await statement_windows(rows, self.execute)

    async def export_events(self) -> AsyncGenerator[ExportedEvent, None]:
        now = time.time()
        async with self._conn(bounded=False) as conn, conn.transaction(), conn.cursor(
                name="relay_export_events") as rows:
            await rows.execute(EXPORT_EVENTS_SQL)
            while batch := await rows.fetchmany(EXPORT_PAGE):
                for row in batch:
                    yield exported_event(row, now)

    async def import_events(self, events: AsyncIterable[ExportedEvent]) -> int:
        sql = ("INSERT INTO events (id, webhook, type, body, created_at, next_attempt_at,"
               " attempts, last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
               " ON CONFLICT (id, webhook) DO NOTHING")
        rows = ((sql, (e.id, e.webhook, e.type, e.body, e.created_at, e.next_attempt_at,
                        e.attempts, e.last_error)) async for e in events)
        return await statement_windows(rows, self.execute)


async def _attempts(conn: AsyncConnection[Any], ids: list[str]
                    ) -> dict[str, list[ExportedAttempt]]:
    """The attempt records of ``ids``, each message's in order."""
    cur = await conn.execute(
        f"SELECT {ATTEMPT_COLUMNS} FROM attempts"
        " WHERE message_id = ANY(%s) ORDER BY at, seq", (ids,))
    return attempts_by_message(await cur.fetchall())
