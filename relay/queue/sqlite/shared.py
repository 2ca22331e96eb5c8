"""What the processes on one queue share about each upstream account: its connection
slots (pool.max_connections across processes), its backoff with one probe at a time, and
the places group mail holds in its rate windows (hold_send; window_open for a split send).

A mixin of SQLiteStore. A slot or a probe is a row with an owner (QueueStore.owner) and a
lease; it is free again when its owner gives it back, when its lease runs out, or at once
when its owner is gone (its liveness lock in ``<queue>.owners/`` is free: owners.Owners).
Each decision (is a slot free, may I probe) is read and written in one write transaction
of the store's writer, so two processes never take the same slot or both probe.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.queue.sqlite.owners import Owners
from relay.queue.sqlite.writer import Op, Transact, window_room


class HostLimits:
    """Connection slots and account backoffs, on SQLiteStore."""

    if TYPE_CHECKING:
        owner: str
        _owners: Owners

        async def _submit(self, op: Op) -> Any: ...
        async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...

    # -- connection slots ---------------------------------------------------------------
    async def take_slot(self, account: str, most: int, lease_until: float, now: float
                        ) -> int | None:
        """A connection slot in [0, most) for this owner, or None while ``most`` are held
        by live owners under lease."""
        owner, owners = self.owner, self._owners

        def take(db: sqlite3.Connection) -> int | None:
            rows = db.execute("SELECT slot, owner, lease_until FROM slots WHERE account=?",
                              (account,)).fetchall()
            live = {slot: who for slot, who, until in rows if until >= now}
            if len(live) >= most:  # perhaps some of them died: ask their liveness locks
                dead = owners.dead(set(live.values()) - {owner})
                live = {slot: who for slot, who in live.items() if who not in dead}
            if len(live) >= most:
                return None
            slot = next(s for s in range(most) if s not in live)
            db.execute("INSERT INTO slots (account, slot, owner, lease_until)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (account, slot) DO UPDATE"
                       " SET owner=excluded.owner, lease_until=excluded.lease_until",
                       (account, slot, owner, lease_until))
            return slot

        taken: int | None = await self._submit(Transact(run=take))
        return taken

    async def give_slot(self, account: str, slot: int) -> None:
        await self.execute([("DELETE FROM slots WHERE account=? AND slot=? AND owner=?",
                             (account, slot, self.owner))])

    async def renew_slots(self, lease_until: float) -> int:
        """Extend the leases of every slot this owner holds; return how many it holds."""
        counts = await self.execute([("UPDATE slots SET lease_until=? WHERE owner=?",
                                      (lease_until, self.owner))])
        return counts[0]

    # -- account backoffs -----------------------------------------------------------------
    async def set_backoff(self, account: str, until: float, reason: str) -> None:
        """Back ``account`` off for every process until ``until`` (the later of this and a
        backoff already stored); whoever probed it is done."""
        await self.execute([(
            "INSERT INTO backoffs (account, until, reason) VALUES (?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE SET until=max(until, excluded.until),"
            " reason=excluded.reason, probe_owner=NULL, probe_until=NULL",
            (account, until, reason))])

    async def clear_backoff(self, account: str) -> None:
        await self.execute([("DELETE FROM backoffs WHERE account=?", (account,))])

    async def backoffs(self) -> dict[str, tuple[float, str]]:
        rows = await self._fetch("SELECT account, until, reason FROM backoffs")
        return {str(a): (float(u), str(r)) for a, u, r in rows}

    async def take_probe(self, account: str, lease_until: float, now: float) -> bool:
        """True for the one process that may send to ``account`` now that its backoff is
        over (this owner already holding the probe included); True also when the account
        is not backed off at all. False while it backs off or another live process
        probes."""
        owner, owners = self.owner, self._owners

        def take(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT until, probe_owner, probe_until FROM backoffs"
                             " WHERE account=?", (account,)).fetchone()
            if row is None:
                return True
            until, prober, probe_until = row
            if until > now:
                return False
            if prober not in (None, owner) and probe_until >= now \
                    and not owners.dead({prober}):
                return False
            db.execute("UPDATE backoffs SET probe_owner=?, probe_until=? WHERE account=?",
                       (owner, lease_until, account))
            return True

        taken: bool = await self._submit(Transact(run=take))
        return taken

    # -- a group's message through a member account ------------------------------------
    async def hold_send(self, message_id: str, account: str | None, now: float,
                        lease_until: float, windows: Sequence[tuple[float, int]] = (),
                        reserve_for_high: float = 0.0, high: bool = False) -> bool:
        owner = self.owner
        spans = tuple(windows)

        def hold(db: sqlite3.Connection) -> bool:
            if account is None:
                db.execute("DELETE FROM group_sends WHERE message_id=? AND owner=?",
                           (message_id, owner))
                return True
            room, others = window_room(db, account, now, 1, spans, reserve_for_high,
                                       exclude=message_id)
            if (room if high else others) <= 0:
                return False
            db.execute("INSERT INTO group_sends (message_id, account, owner, lease_until)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET"
                       " account=excluded.account, owner=excluded.owner,"
                       " lease_until=excluded.lease_until",
                       (message_id, account, owner, lease_until))
            return True

        held: bool = await self._submit(Transact(run=hold))
        return held

    async def window_open(self, account: str, now: float, windows: Sequence[tuple[float, int]],
                          reserve_for_high: float = 0.0, high: bool = False) -> bool:
        spans = tuple(windows)

        def look(db: sqlite3.Connection) -> bool:
            room, others = window_room(db, account, now, 1, spans, reserve_for_high)
            return (room if high else others) >= 0

        opened: bool = await self._submit(Transact(run=look))
        return opened

    # -- what dead owners leave ------------------------------------------------------------
    def _holders(self) -> str:
        """(SQL) the owners of slots and probes, for requeue_expired's liveness check."""
        return ("SELECT owner FROM slots UNION SELECT probe_owner FROM backoffs"
                " WHERE probe_owner IS NOT NULL UNION SELECT owner FROM group_sends")

    @staticmethod
    def _free_held(dead: set[str], now: float) -> list[tuple[str, tuple[Any, ...]]]:
        """Statements that free the slots and probes of ``dead`` owners or past their lease."""
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM slots WHERE lease_until < ?", (now,)),
            ("UPDATE backoffs SET probe_owner=NULL, probe_until=NULL WHERE probe_until < ?",
             (now,)),
            ("DELETE FROM group_sends WHERE lease_until < ?", (now,)),
        ]
        for owner in dead:
            statements += [
                ("DELETE FROM slots WHERE owner=?", (owner,)),
                ("UPDATE backoffs SET probe_owner=NULL, probe_until=NULL WHERE probe_owner=?",
                 (owner,)),
                ("DELETE FROM group_sends WHERE owner=?", (owner,)),
            ]
        return statements
