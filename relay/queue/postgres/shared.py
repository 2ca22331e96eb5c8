"""What the relays on one database share about each upstream account: its connection
slots (pool.max_connections across relays), its backoff with one probe at a time, and
the places group mail holds in its rate windows (hold_send; window_open for a split send).

A mixin of PostgresStore, with the SQLite store's semantics (relay/queue/sqlite/shared.py).
A slot or a probe is a row with an owner and a lease; it is free again when its owner
gives it back, when its lease runs out, or at once when its owner's heartbeat has expired
(processes table). Each decision locks the row it decides on (the account's row in
``accounts`` for slots, the ``backoffs`` row for a probe) in its transaction, so two
relays never take the same slot or both probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import AsyncConnection

# (SQL) the owner in column {col} is alive: its heartbeat has not expired.
ALIVE = ("EXISTS (SELECT 1 FROM processes p WHERE p.owner = {col}"
         " AND p.expires_at > extract(epoch from clock_timestamp()))")


class HostLimits:
    """Connection slots and account backoffs, on PostgresStore."""

    if TYPE_CHECKING:
        owner: str

        async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
                         ) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, Sequence[Any]]]) -> list[int]: ...
        def _conn(self, *, bounded: bool = True
                  ) -> contextlib.AbstractAsyncContextManager[AsyncConnection[Any]]: ...
        @staticmethod
        async def _room(conn: AsyncConnection[Any], account: str, now: float, limit: int,
                        windows: Sequence[tuple[float, int]], reserve_for_high: float = 0.0,
                        exclude: str = "") -> tuple[int, int]: ...

    # -- connection slots ---------------------------------------------------------------
    async def take_slot(self, account: str, most: int, lease_until: float, now: float
                        ) -> int | None:
        """A connection slot in [0, most) for this owner, or None while ``most`` are held
        by live owners under lease."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("INSERT INTO accounts (name) VALUES (%s) ON CONFLICT DO NOTHING",
                               (account,))
            await conn.execute("SELECT 1 FROM accounts WHERE name = %s FOR UPDATE", (account,))
            cur = await conn.execute(
                "SELECT slot FROM slots s WHERE account = %s AND lease_until >= %s"
                f" AND (owner = %s OR {ALIVE.format(col='s.owner')})",
                (account, now, self.owner))
            live = {int(r[0]) for r in await cur.fetchall()}
            free = [s for s in range(most) if s not in live]
            if not free:
                return None
            await conn.execute(
                "INSERT INTO slots (account, slot, owner, lease_until) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (account, slot) DO UPDATE SET owner = excluded.owner,"
                " lease_until = excluded.lease_until", (account, free[0], self.owner,
                                                        lease_until))
            return free[0]

    async def give_slot(self, account: str, slot: int) -> None:
        await self.execute([("DELETE FROM slots WHERE account=%s AND slot=%s AND owner=%s",
                             (account, slot, self.owner))])

    async def renew_slots(self, lease_until: float) -> int:
        counts = await self.execute([("UPDATE slots SET lease_until=%s WHERE owner=%s",
                                      (lease_until, self.owner))])
        return counts[0]

    # -- account backoffs -----------------------------------------------------------------
    async def set_backoff(self, account: str, until: float, reason: str) -> None:
        """Back ``account`` off for every relay until ``until`` (the later of this and a
        backoff already stored); whoever probed it is done."""
        await self.execute([(
            "INSERT INTO backoffs (account, until, reason) VALUES (%s, %s, %s)"
            " ON CONFLICT (account) DO UPDATE SET until = greatest(backoffs.until,"
            " excluded.until), reason = excluded.reason, probe_owner = NULL,"
            " probe_until = NULL", (account, until, reason))])

    async def clear_backoff(self, account: str) -> None:
        await self.execute([("DELETE FROM backoffs WHERE account=%s", (account,))])

    async def backoffs(self) -> dict[str, tuple[float, str]]:
        rows = await self._fetch("SELECT account, until, reason FROM backoffs")
        return {str(a): (float(u), str(r)) for a, u, r in rows}

    async def take_probe(self, account: str, lease_until: float, now: float) -> bool:
        """True for the one relay that may send to ``account`` now that its backoff is
        over (this owner already holding the probe included), or when it is not backed
        off at all; False while it backs off or another live relay probes."""
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT until, probe_owner, probe_until,"
                f" probe_owner IS NOT NULL AND {ALIVE.format(col='b.probe_owner')}"
                " FROM backoffs b WHERE account = %s FOR UPDATE", (account,))
            row = await cur.fetchone()
            if row is None:
                return True
            until, prober, probe_until, prober_alive = row
            if until > now:
                return False
            if prober not in (None, self.owner) and probe_until >= now and prober_alive:
                return False
            await conn.execute("UPDATE backoffs SET probe_owner=%s, probe_until=%s"
                               " WHERE account=%s", (self.owner, lease_until, account))
            return True

    # -- a group's message through a member account ------------------------------------
    async def hold_send(self, message_id: str, account: str | None, now: float,
                        lease_until: float, windows: Sequence[tuple[float, int]] = (),
                        reserve_for_high: float = 0.0, high: bool = False) -> bool:
        """QueueStore.hold_send: under the member's row lock, as its claims count."""
        if account is None:
            await self.execute([("DELETE FROM group_sends WHERE message_id = %s"
                                 " AND owner = %s", (message_id, self.owner))])
            return True
        async with self._conn() as conn, conn.transaction():
            room, others = await self._room(conn, account, now, 1, windows,
                                            reserve_for_high, exclude=message_id)
            if (room if high else others) <= 0:
                return False
            await conn.execute(
                "INSERT INTO group_sends (message_id, account, owner, lease_until)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (message_id) DO UPDATE SET"
                " account = excluded.account, owner = excluded.owner,"
                " lease_until = excluded.lease_until",
                (message_id, account, self.owner, lease_until))
            return True

    async def window_open(self, account: str, now: float, windows: Sequence[tuple[float, int]],
                          reserve_for_high: float = 0.0, high: bool = False) -> bool:
        """QueueStore.window_open: under the account's row lock, as its claims count."""
        async with self._conn() as conn, conn.transaction():
            room, others = await self._room(conn, account, now, 1, windows, reserve_for_high)
        return (room if high else others) >= 0

    # -- what dead owners leave ------------------------------------------------------------
    async def _free_held(self, now: float) -> None:
        """Free the slots and probes of owners that are gone or past their lease."""
        await self.execute([
            ("DELETE FROM slots s WHERE lease_until < %s OR (owner <> %s AND NOT"
             f" {ALIVE.format(col='s.owner')})", (now, self.owner)),
            ("UPDATE backoffs b SET probe_owner = NULL, probe_until = NULL"
             " WHERE probe_owner IS NOT NULL AND (probe_until < %s OR (probe_owner <> %s"
             f" AND NOT {ALIVE.format(col='b.probe_owner')}))", (now, self.owner)),
            ("DELETE FROM group_sends g WHERE lease_until < %s OR (owner <> %s AND NOT"
             f" {ALIVE.format(col='g.owner')})", (now, self.owner)),
        ])
