"""Per-account controls an operator sets in the queue file: pause/resume and moving
queued mail to another account (`relay accounts pause`, `relay queue move`).

A mixin of SQLiteStore. A pause is a meta row (``paused:<account>``) that the claim
statement itself checks (schema.CLAIM_SQL), so every process that claims from this file
honours it in the same transaction, across restarts, without being told.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.queue.sqlite.schema import PAUSED_PREFIX
from relay.queue.store import OPERATOR_CHUNK


class AccountControl:
    """Pause, resume and move, on SQLiteStore."""

    if TYPE_CHECKING:
        async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...

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

    async def move_messages(self, source: str, target: str, states: Sequence[str],
                            now: float) -> list[str]:
        """Re-route messages of ``source`` in ``states`` to ``target``; ready ones become
        due now (held ones stay held). A message claimed meanwhile is not matched."""
        marks = ",".join("?" * len(states))
        ids = [r[0] for r in await self._fetch(
            f"SELECT id FROM messages WHERE account=? AND state IN ({marks}) ORDER BY seq",
            (source, *states))]
        moved: list[str] = []
        for start in range(0, len(ids), OPERATOR_CHUNK):
            chunk = ids[start:start + OPERATOR_CHUNK]
            id_marks = ",".join("?" * len(chunk))
            await self.execute([(
                "UPDATE messages SET account=?, updated_at=?, next_attempt_at="
                " CASE WHEN state='held' THEN next_attempt_at ELSE min(next_attempt_at, ?) END"
                f" WHERE id IN ({id_marks}) AND account=? AND state IN ({marks})",
                (target, now, now, *chunk, source, *states))])
            rows = await self._fetch(
                f"SELECT id FROM messages WHERE id IN ({id_marks}) AND account=? ORDER BY seq",
                (*chunk, target))
            moved += [r[0] for r in rows]
        return moved
