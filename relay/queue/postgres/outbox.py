"""The PostgreSQL queue's webhook outbox: events claimed by one relay, then settled (sent,
retried later, or given up), with the SQLite store's semantics (relay/queue/sqlite/
outbox.py). A mixin of PostgresStore; ``finish`` writes the events in the transaction of
the outcome they report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.queue.types import Claim, PendingEvent

# Due rows nobody holds (or whose holder's lease ran out), locked as they are picked
# (SKIP LOCKED: a row another relay is claiming is passed over), then this owner's.
CLAIM_EVENTS_SQL = """
WITH picked AS (
    SELECT id, webhook FROM events
    WHERE next_attempt_at <= %(now)s AND (owner IS NULL OR lease_until < %(now)s)
    ORDER BY next_attempt_at LIMIT %(n)s FOR UPDATE SKIP LOCKED
)
UPDATE events e SET owner = %(owner)s, lease_until = %(lease)s
FROM picked WHERE e.id = picked.id AND e.webhook = picked.webhook
RETURNING e.id, e.webhook, e.type, e.body, e.created_at, e.attempts
"""


class Outbox:
    """The outbox side of PostgresStore."""

    if TYPE_CHECKING:
        owner: str

        async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
                         ) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, Sequence[Any]]]) -> list[int]: ...

    async def claim_events(self, now: float, limit: int, lease_s: float) -> list[PendingEvent]:
        """Claim up to ``limit`` due events for this owner until ``now + lease_s``, oldest
        first: of several relays, one sends each event."""
        if limit <= 0:
            return []
        lease = now + lease_s
        rows = await self._fetch(CLAIM_EVENTS_SQL, {"now": now, "n": limit,
                                                    "owner": self.owner, "lease": lease})
        events = [PendingEvent(str(i), str(w), str(t), str(b), float(c), int(n),
                               Claim(self.owner, lease)) for i, w, t, b, c, n in rows]
        events.sort(key=lambda e: e.created_at)
        return events

    async def settle_event(self, event: PendingEvent, *, retry_at: float | None,
                           error: str = "") -> bool:
        """Sent or given up (``retry_at`` None): the row goes. Otherwise it is due again
        at ``retry_at`` with one more attempt and ``error``. Only while this owner still
        holds the claim: False when its lease ran out and another relay took it."""
        where = " WHERE id = %s AND webhook = %s AND owner = %s"
        key = (event.id, event.webhook, self.owner)
        if retry_at is None:
            counts = await self.execute([("DELETE FROM events" + where, key)])
        else:
            counts = await self.execute([(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at = %s,"
                " last_error = %s, owner = NULL, lease_until = NULL" + where,
                (retry_at, error[:500], *key))])
        return counts[0] == 1

    async def next_event_at(self) -> float | None:
        """When the next outbox row is due (claimed rows: when their lease ends)."""
        rows = await self._fetch(
            "SELECT min(CASE WHEN owner IS NULL THEN next_attempt_at"
            " ELSE greatest(next_attempt_at, lease_until) END) FROM events")
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None
