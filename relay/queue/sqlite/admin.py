"""What `relay queue` and `relay status` do to a SQLite queue: listings, one message,
bulk state changes and deletes in committed windows, attempt counts.

A mixin of SQLiteStore: it reads through the store's read connection (``_fetch``) and
writes through its writer (``execute``), so operator changes queue behind the server's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from relay.queue import bulk
from relay.queue.filters import MessageFilter, SortKey
from relay.queue.sqlite.filters import ORDER_BY, SQLITE
from relay.queue.sqlite.filters import where as filter_where
from relay.queue.sqlite.schema import COLUMNS, row_to_message
from relay.queue.store import OPERATOR_CHUNK, Progress
from relay.queue.types import MessageState, QueuedMessage

LIST_PAGE = 500  # rows per fetch of a streamed listing
BODY_KEPT = "EXISTS (SELECT 1 FROM bodies b WHERE b.id = messages.id)"


class OperatorQueries:
    """The operator's side of SQLiteStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...
        def _cursor(self, sql: str, params: Sequence[Any]
                    ) -> contextlib.AbstractAsyncContextManager[Any]: ...

    # -- operators -----------------------------------------------------------------
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
        """The matching messages, a page of rows at a time: a listing of the whole queue
        starts at once and never holds it all in memory. One statement, so one snapshot."""
        clause, params = filter_where(match)
        sql = f"SELECT {COLUMNS} FROM messages WHERE {clause} ORDER BY {ORDER_BY[sort]}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        async with self._cursor(sql, params) as rows:
            while batch := await rows.fetchmany(page):
                for row in batch:
                    yield row_to_message(row)

    async def count_messages(self, match: MessageFilter, *, needs_body: bool = False) -> int:
        clause, params = filter_where(match)
        if needs_body:
            clause += f" AND {BODY_KEPT}"
        rows = await self._fetch(f"SELECT count(*) FROM messages WHERE {clause}", params)
        return int(rows[0][0])

    async def waiting_by_age(
        self, by: str, now: float, bounds: Sequence[float]
    ) -> dict[tuple[str, int], int]:
        """Messages still to deliver (queued, deferred, sending, held), by ``by`` ("account",
        or "domain": one per pending recipient's domain) and age bucket: (key, i) -> count,
        where bucket i holds ages below bounds[i] (the last, ages of at least bounds[-1])."""
        bucket = " ".join(f"WHEN ? - created_at < ? THEN {i}" for i in range(len(bounds)))
        bucket = f"CASE {bucket} ELSE {len(bounds)} END"
        params: list[Any] = [v for bound in bounds for v in (now, bound)]
        waiting = "state IN ('queued', 'deferred', 'sending', 'held')"
        if by == "account":
            sql = f"SELECT account AS k, {bucket} AS b FROM messages WHERE {waiting}"
        else:
            address = "json_extract(r.value, '$[0]')"
            sql = (f"SELECT lower(substr({address}, instr({address}, '@') + 1)) AS k, {bucket} AS b"
                   " FROM messages, json_each(messages.recipients) AS r"
                   f" WHERE {waiting} AND json_extract(r.value, '$[1]') = 'pending'")
        rows = await self._fetch(f"SELECT k, b, count(*) FROM ({sql}) GROUP BY k, b", params)
        return {(str(k), int(b)): int(n) for k, b, n in rows}

    async def get(self, message_id: str) -> QueuedMessage | None:
        rows = await self._fetch(f"SELECT {COLUMNS} FROM messages WHERE id=?", (message_id,))
        if not rows:
            return None
        message = row_to_message(rows[0])
        attempts = await self._fetch(
            "SELECT at, account, outcome, reply, transcript FROM attempts WHERE message_id=?"
            " ORDER BY at",
            (message_id,),
        )
        message.attempts_log = [
            {"at": at, "account": acc, "outcome": out, "reply": reply,
             "transcript": transcript.split("\n") if transcript else []}
            for at, acc, out, reply, transcript in attempts
        ]
        return message

    async def body_if_kept(self, message_id: str) -> bytes | None:
        rows = await self._fetch("SELECT data FROM bodies WHERE id=?", (message_id,))
        return bytes(rows[0][0]) if rows else None

    async def _in_windows(self, where: str, params: list[Any], templates: bulk.Templates,
                          progress: Progress | None, chunk: int) -> int:
        """relay.queue.bulk.in_windows, each window through the writer."""
        return await bulk.in_windows(self._fetch, self.execute, SQLITE, where, params,
                                     templates, progress, chunk)

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
        """Move the messages in ``states`` (all, or just ``ids``; those ``match`` selects)
        to ``to_state``; count them.

        ``reset_failed`` turns a failed message's failed recipients back to pending.
        Bodies are never read.
        """
        where, params = bulk.selection(states, ids, match, SQLITE)
        if needs_body:
            where += f" AND {BODY_KEPT}"
        sets = "state=?, lease_until=NULL, owner=NULL, updated_at=?"
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
            where, params, [(f"UPDATE messages SET {sets} WHERE {{where}}", lead)], progress, chunk
        )

    async def delete_messages(
        self,
        *,
        states: Sequence[str],
        ids: Sequence[str] = (),
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int:
        """Delete matching messages with their bodies and attempts; count them."""
        where, params = bulk.selection(states, ids, match, SQLITE)
        templates: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM bodies WHERE id IN (SELECT id FROM messages WHERE {where})", ()),
            ("DELETE FROM attempts WHERE message_id IN (SELECT id FROM messages WHERE {where})",
             ()),
            ("DELETE FROM messages WHERE {where}", ()),
        ]
        return await self._in_windows(where, params, templates, progress, chunk)

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
