"""What `relay queue`, `relay accounts` and `relay status` do to a PostgreSQL queue:
listings, one message, bulk changes and deletes in committed windows, moves, attempt
counts. The same meanings as the SQLite store's (relay/queue/sqlite/admin.py).

A mixin of PostgresStore: it reads and writes through the store's pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from relay.queue import bulk
from relay.queue.filters import MessageFilter, SortKey
from relay.queue.postgres.filters import ORDER_BY, POSTGRES
from relay.queue.postgres.filters import where as filter_where
from relay.queue.postgres.schema import COLUMNS, row_to_message
from relay.queue.store import OPERATOR_CHUNK, Progress
from relay.queue.types import MessageState, QueuedMessage

if TYPE_CHECKING:
    from psycopg import AsyncConnection

LIST_PAGE = 500
BODY_KEPT = "EXISTS (SELECT 1 FROM bodies b WHERE b.id = messages.id)"
MOVED = "moved"


class OperatorQueries:
    """The operator's side of PostgresStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
                         ) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, Sequence[Any]]]) -> list[int]: ...
        def _conn(self, *, bounded: bool = True
                  ) -> contextlib.AbstractAsyncContextManager[AsyncConnection[Any]]: ...
        def _wake(self, account: str) -> None: ...

    async def list_messages(
        self, *, state: str | None = None, account: str | None = None, limit: int | None = None
    ) -> list[QueuedMessage]:
        match = MessageFilter(states=frozenset({MessageState(state)}) if state else None,
                              account=account)
        clause, params = filter_where(match)
        sql = f"SELECT {COLUMNS} FROM messages WHERE {clause} ORDER BY seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [row_to_message(r) for r in await self._fetch(sql, params)]

    async def iter_messages(
        self, match: MessageFilter, *, sort: SortKey = SortKey.CREATED,
        limit: int | None = None, page: int = LIST_PAGE,
    ) -> AsyncGenerator[QueuedMessage, None]:
        """A page of rows at a time through a server-side cursor: one snapshot."""
        clause, params = filter_where(match)
        sql = f"SELECT {COLUMNS} FROM messages WHERE {clause} ORDER BY {ORDER_BY[sort]}"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(int(limit))
        async with self._listing(sql, params) as cursor:
            while batch := await cursor.fetchmany(page):
                for row in batch:
                    yield row_to_message(row)

    @contextlib.asynccontextmanager
    async def _listing(self, sql: str, params: list[Any]) -> AsyncIterator[Any]:
        async with self._conn(bounded=False) as conn, conn.transaction(), conn.cursor(
                name="relay_listing") as cursor:
            await cursor.execute(sql, params)
            yield cursor

    async def count_messages(self, match: MessageFilter, *, needs_body: bool = False) -> int:
        clause, params = filter_where(match)
        if needs_body:
            clause += f" AND {BODY_KEPT}"
        rows = await self._fetch(f"SELECT count(*) FROM messages WHERE {clause}", params)
        return int(rows[0][0])

    async def waiting_by_age(
        self, by: str, now: float, bounds: Sequence[float]
    ) -> dict[tuple[str, int], int]:
        """Messages still to deliver by account or pending recipient's domain, and age
        bucket (see the QueueStore Protocol)."""
        bucket = " ".join(f"WHEN %s - created_at < %s THEN {i}" for i in range(len(bounds)))
        bucket = f"CASE {bucket} ELSE {len(bounds)} END"
        params: list[Any] = [v for bound in bounds for v in (now, bound)]
        waiting = "state IN ('queued', 'deferred', 'sending', 'held')"
        if by == "account":
            sql = f"SELECT account AS k, {bucket} AS b FROM messages WHERE {waiting}"
        else:
            address = "(r->>0)"
            sql = (f"SELECT lower(substr({address}, strpos({address}, '@') + 1)) AS k,"
                   f" {bucket} AS b FROM messages,"
                   " jsonb_array_elements(messages.recipients) AS r"
                   f" WHERE {waiting} AND r->>1 = 'pending'")
        rows = await self._fetch(f"SELECT k, b, count(*) FROM ({sql}) x GROUP BY k, b", params)
        return {(str(k), int(b)): int(n) for k, b, n in rows}

    async def get(self, message_id: str) -> QueuedMessage | None:
        rows = await self._fetch(f"SELECT {COLUMNS} FROM messages WHERE id=%s", (message_id,))
        if not rows:
            return None
        message = row_to_message(rows[0])
        attempts = await self._fetch(
            "SELECT at, account, outcome, reply, transcript FROM attempts"
            " WHERE message_id=%s ORDER BY at, seq", (message_id,))
        message.attempts_log = [
            {"at": at, "account": acc, "outcome": out, "reply": reply,
             "transcript": transcript.split("\n") if transcript else []}
            for at, acc, out, reply, transcript in attempts
        ]
        return message

    async def body_if_kept(self, message_id: str) -> bytes | None:
        rows = await self._fetch("SELECT data FROM bodies WHERE id=%s", (message_id,))
        return bytes(rows[0][0]) if rows else None

    async def state_of(self, message_id: str) -> MessageState | None:
        rows = await self._fetch("SELECT state FROM messages WHERE id=%s", (message_id,))
        return MessageState(rows[0][0]) if rows else None

    async def attempt_counts(
        self, accounts: Sequence[str], since: float
    ) -> dict[tuple[str, str], int]:
        if not accounts:
            return {}
        rows = await self._fetch(
            "SELECT account, outcome, count(*) FROM attempts WHERE account = ANY(%s)"
            " AND at > %s GROUP BY 1, 2", (list(accounts), since))
        return {(a, o): int(n) for a, o, n in rows}

    # -- bulk changes --------------------------------------------------------------------
    async def _in_windows(self, where: str, params: list[Any], templates: bulk.Templates,
                          progress: Progress | None, chunk: int) -> int:
        """relay.queue.bulk.in_windows; the claimers wake once any message changed."""
        done = await bulk.in_windows(self._fetch, self.execute, POSTGRES, where, params,
                                     templates, progress, chunk)
        if done:
            self._wake("*")
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
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int:
        where, params = bulk.selection(states, ids, match, POSTGRES)
        if needs_body:
            where += f" AND {BODY_KEPT}"
        sets = "state=%s, lease_until=NULL, owner=NULL, claim_token=NULL, updated_at=%s"
        lead: tuple[Any, ...] = (to_state, now)
        if due_now:
            sets += ", next_attempt_at=%s"
            lead += (now,)
        if reset_failed:
            sets += (
                ", recipients = CASE WHEN state='failed' THEN (SELECT jsonb_agg(CASE WHEN"
                " r->>1 = 'failed' THEN jsonb_build_array(r->0, 'pending', '') ELSE r END"
                " ORDER BY i) FROM jsonb_array_elements(messages.recipients)"
                " WITH ORDINALITY AS t(r, i)) ELSE recipients END"
            )
        return await self._in_windows(
            where, params, [(f"UPDATE messages SET {sets} WHERE {{where}}", lead)], progress,
            chunk)

    async def delete_messages(
        self,
        *,
        states: Sequence[str],
        ids: Sequence[str] = (),
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int:
        where, params = bulk.selection(states, ids, match, POSTGRES)
        templates: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM bodies WHERE id IN (SELECT id FROM messages WHERE {where})", ()),
            ("DELETE FROM attempts WHERE message_id IN (SELECT id FROM messages WHERE {where})",
             ()),
            ("DELETE FROM messages WHERE {where}", ()),
        ]
        return await self._in_windows(where, params, templates, progress, chunk)

    async def move_messages(
        self,
        *,
        to_account: str,
        states: Sequence[str],
        now: float,
        by: str,
        ids: Sequence[str] = (),
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> list[tuple[str, str]]:
        """Re-route to ``to_account`` keeping state and due time, each with a 'moved'
        attempts row in the transaction that moves it; (id, from account) of each."""
        where, params = bulk.selection(states, ids, match, POSTGRES)
        where += " AND account != %s"
        params.append(to_account)
        reply = "'from ' || account || ' to ' || %s || ' by ' || %s"
        templates: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO attempts (message_id, account, at, outcome, reply)"
             f" SELECT id, account, %s, '{MOVED}', {reply} FROM messages WHERE {{where}}"
             " ORDER BY seq", (now, to_account, by)),
            ("UPDATE messages SET account=%s, updated_at=%s WHERE {where}", (to_account, now)),
        ]
        if not await self._in_windows(where, params, templates, progress, chunk):
            return []
        mine, values = "outcome=%s AND at=%s", [MOVED, now]
        if match is not None and match.account is not None:
            mine, values = mine + " AND account=%s", [*values, match.account]
        rows = await self._fetch(
            f"SELECT message_id, account FROM attempts WHERE {mine} AND reply = {reply}"
            " ORDER BY seq", (*values, to_account, by))
        return [(str(i), str(a)) for i, a in rows]
