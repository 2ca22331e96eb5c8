"""A whole SQLite queue out and in (`relay queue export` / `import`): every message with
its attempts and body, the send times kept for rate limits, the dedup keys still in
their window and the webhook events not yet sent.

A mixin of SQLiteStore. An export reads on a connection of its own inside one read
transaction, so it is one snapshot of a queue a server keeps changing (WAL lets the
server write meanwhile); pages of rows are read as the caller consumes them. An import
goes through the store's writer in windows of messages, one transaction each.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import TYPE_CHECKING, Any

from relay.errors import StoreError
from relay.queue.bulk import EXPORT_PAGE, ROWS_WINDOW, message_windows, statement_windows
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
from relay.queue.sqlite.schema import map_sqlite_error
from relay.queue.sqlite.writer import Import
from relay.queue.types import (
    ExportedAttempt,
    ExportedDedup,
    ExportedEvent,
    ExportedMessage,
)

if TYPE_CHECKING:
    import aiosqlite


class Exchange:
    """Export and import, on SQLiteStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
        async def _connect(self) -> aiosqlite.Connection: ...
        async def _submit(self, op: Any) -> Any: ...
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...
        def _cursor(self, sql: str, params: Sequence[Any]
                    ) -> contextlib.AbstractAsyncContextManager[Any]: ...

    async def export_messages(self, *, page: int = EXPORT_PAGE
                              ) -> AsyncGenerator[ExportedMessage, None]:
        now = time.time()
        db = await self._connect()
        try:
            await db.execute("BEGIN")  # one read transaction: one snapshot for every query
            async with db.execute(EXPORT_MESSAGES_SQL) as rows:
                while batch := await rows.fetchmany(page):
                    logs = await _attempts(db, [row[0] for row in batch])
                    for row in batch:
                        yield exported_message(row, logs, now, json.loads)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc) from None
        finally:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()

    async def import_messages(self, items: AsyncIterable[ExportedMessage], *, merge: bool
                              ) -> tuple[int, int]:
        if not merge and await self._fetch("SELECT 1 FROM messages LIMIT 1"):
            raise StoreError("the queue already holds messages: import into an empty queue,"
                             " or merge into this one (--merge)")
        done = skipped = 0
        async for window in message_windows(items, time.time()):
            imported, known = await self._submit(Import(messages=window))
            done, skipped = done + imported, skipped + known
        return done, skipped

    async def export_sends(self) -> AsyncGenerator[tuple[str, float], None]:
        async with self._cursor("SELECT account, at FROM sends ORDER BY account, at", ()
                                ) as rows:
            while batch := await rows.fetchmany(ROWS_WINDOW):
                for account, at in batch:
                    yield str(account), float(at)

    async def import_sends(self, sends: AsyncIterable[tuple[str, float]]) -> int:
        sql = "INSERT INTO sends (account, at) VALUES (?, ?)"
        return await statement_windows(((sql, (a, t)) async for a, t in sends), self.execute)

    async def export_dedup(self) -> AsyncGenerator[ExportedDedup, None]:
        async with self._cursor(f"SELECT {DEDUP_COLUMNS} FROM dedup"
                                " WHERE expires_at > ? ORDER BY key", (time.time(),)) as rows:
            while batch := await rows.fetchmany(ROWS_WINDOW):
                for row in batch:
                    yield exported_dedup(row)

    async def import_dedup(self, keys: AsyncIterable[ExportedDedup]) -> int:
        sql = ("INSERT INTO dedup (key, message_id, expires_at) VALUES (?, ?, ?)"
               " ON CONFLICT(key) DO NOTHING")  # the queue's own key stays
        rows = ((sql, (d.key, d.message_id, d.expires_at)) async for d in keys)
        return await statement_windows(rows, self.execute)

    async def export_events(self) -> AsyncGenerator[ExportedEvent, None]:
        now = time.time()
        async with self._cursor(EXPORT_EVENTS_SQL, ()) as rows:
            while batch := await rows.fetchmany(EXPORT_PAGE):
                for row in batch:
                    yield exported_event(row, now)

    async def import_events(self, events: AsyncIterable[ExportedEvent]) -> int:
        sql = ("INSERT INTO events (id, webhook, type, body, created_at, next_attempt_at,"
               " attempts, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
               " ON CONFLICT(id, webhook) DO NOTHING")
        rows = ((sql, (e.id, e.webhook, e.type, e.body, e.created_at, e.next_attempt_at,
                        e.attempts, e.last_error)) async for e in events)
        return await statement_windows(rows, self.execute)


async def _attempts(db: aiosqlite.Connection, ids: list[str]
                    ) -> dict[str, list[ExportedAttempt]]:
    """The attempt records of ``ids``, each message's in order."""
    marks = ",".join("?" * len(ids))
    async with db.execute(
        f"SELECT {ATTEMPT_COLUMNS} FROM attempts"
        f" WHERE message_id IN ({marks}) ORDER BY at, rowid", ids,
    ) as rows:
        return attempts_by_message(await rows.fetchall())
