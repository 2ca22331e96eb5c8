"""The SQLite queue's webhook outbox: events claimed by one process, then settled (sent,
retried later, or given up). A mixin of SQLiteStore; the events themselves are written
by ``finish`` in the transaction of their outcome (writer.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay.queue.sqlite.writer import ClaimEvents, Op
from relay.queue.types import PendingEvent


class Outbox:
    """The outbox side of SQLiteStore."""

    owner: str

    if TYPE_CHECKING:
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...
        async def _submit(self, op: Op) -> Any: ...
        async def _fetch(self, sql: str, params: Any = ()) -> list[Any]: ...

    async def claim_events(self, now: float, limit: int, lease_s: float) -> list[PendingEvent]:
        """Claim up to ``limit`` due events for this owner until ``now + lease_s``."""
        events: list[PendingEvent] = await self._submit(
            ClaimEvents(now=now, limit=limit, lease_s=lease_s, owner=self.owner))
        return events

    async def settle_event(self, event: PendingEvent, *, retry_at: float | None,
                           error: str = "") -> bool:
        """Sent or given up (``retry_at`` None): the row goes. Otherwise it is due again
        at ``retry_at`` with one more attempt and ``error``. Only while this owner still
        holds the claim: False when its lease ran out and another process took it."""
        where = " WHERE id=? AND webhook=? AND owner=?"
        key = (event.id, event.webhook, self.owner)
        if retry_at is None:
            counts = await self.execute([("DELETE FROM events" + where, key)])
        else:
            counts = await self.execute([(
                "UPDATE events SET attempts=attempts+1, next_attempt_at=?, last_error=?,"
                " owner=NULL, lease_until=NULL" + where, (retry_at, error[:500], *key))])
        return counts[0] == 1

    async def next_event_at(self) -> float | None:
        """When the next outbox row is due (claimed rows: when their lease ends)."""
        rows = await self._fetch(
            "SELECT min(CASE WHEN owner IS NULL THEN next_attempt_at"
            " ELSE max(next_attempt_at, lease_until) END) FROM events")
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None
