"""Per-account controls an operator sets in the queue file: pause/resume and moving
queued mail to another account (`relay accounts pause`, `relay queue move`).

A mixin of SQLiteStore. A pause is a meta row (``paused:<account>``) that the claim
statement itself checks (schema.CLAIM_SQL), so every process that claims from this file
honours it in the same transaction, across restarts, without being told.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.queue import bulk
from relay.queue.filters import MessageFilter
from relay.queue.sqlite.filters import SQLITE
from relay.queue.sqlite.schema import PAUSED_PREFIX
from relay.queue.store import OPERATOR_CHUNK, Progress

MOVED = "moved"  # the outcome of a move's record in the attempts table


class AccountControl:
    """Pause, resume and move, on SQLiteStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...
        async def _in_windows(self, where: str, params: list[Any], templates: bulk.Templates,
                              progress: Progress | None, chunk: int) -> int: ...

    async def set_paused(self, account: str, paused: bool, at: float) -> None:
        key = PAUSED_PREFIX + account
        if paused:
            await self.execute([("INSERT INTO meta (key, value) VALUES (?, ?)"
                                 " ON CONFLICT(key) DO NOTHING", (key, repr(at)))])
        else:
            await self.execute([("DELETE FROM meta WHERE key=?", (key,))])

    async def paused_accounts(self) -> dict[str, float]:
        rows = await self._fetch("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                                 (len(PAUSED_PREFIX), PAUSED_PREFIX))
        return {key[len(PAUSED_PREFIX):]: float(value) for key, value in rows}

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
        """Re-route the messages in ``states`` (all, or just ``ids``; those ``match``
        selects) to ``to_account``; each keeps its state and due time. Each gets an
        attempts row ('moved', "from A to B by <by>") in the transaction that moves it, so
        `relay queue show` tells it later. Returns (id, from account) of those moved, in
        order of arrival. A message claimed meanwhile is not matched."""
        where, params = bulk.selection(states, ids, match, SQLITE)
        where += " AND account != ?"  # moving to where it is would only add a record
        params.append(to_account)
        reply = "'from ' || account || ' to ' || ? || ' by ' || ?"
        templates: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO attempts (message_id, account, at, outcome, reply)"
             f" SELECT id, account, ?, '{MOVED}', {reply} FROM messages WHERE {{where}}"
             " ORDER BY seq", (now, to_account, by)),
            ("UPDATE messages SET account=?, updated_at=? WHERE {where}", (to_account, now)),
        ]
        if not await self._in_windows(where, params, templates, progress, chunk):
            return []
        # This move's records: its time, outcome and wording (`at` from the caller's clock).
        mine, values = "outcome=? AND at=?", [MOVED, now]
        if match is not None and match.account is not None:  # the (account, at) index
            mine, values = mine + " AND account=?", [*values, match.account]
        rows = await self._fetch(
            f"SELECT message_id, account FROM attempts WHERE {mine} AND reply = {reply}"
            " ORDER BY rowid", (*values, to_account, by))
        return [(str(i), str(a)) for i, a in rows]
