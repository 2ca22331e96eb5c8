"""One account as every worker process on the queue shares it (`relay serve --workers N`):
its connection slots, its logins, and its backoff with one probe at a time.

The queue holds the shared state (QueueStore.take_slot, set_backoff, take_probe...); this
is how a worker's pool (relay.delivery.smtp, through transport.HostShare) and its
AccountWorker use it:

- a connection holds a slot of ``pool.max_connections`` from before it opens until it
  closes, so the upstream never sees more connections from the host than configured;
- a login that this process has not yet seen work waits for the host's login turn (one
  at a time across processes), and is not tried at all while the account backs off, so a
  wrong password costs one failed login per backoff step, not one per worker;
- a backoff one worker decides is stored for all; each worker follows it before it
  claims, and once it ends exactly one worker probes (take_probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from relay.errors import StoreError, TemporaryFailure
from relay.observe.logs import event
from relay.queue.store import QueueStore

log = logging.getLogger("relay.delivery")
SLOT_POLL_S = 0.1  # how often a send waiting for a connection slot (or login turn) asks
# After finding every slot held elsewhere, the pool sends on the connections it has for
# this long before it tries for another slot (the others may have closed theirs).
STARVED_S = 1.0
BACKOFFS_FRESH_S = 0.1  # how stale a worker's view of the shared backoffs may be
LOGIN_TURN = "{account}/login"  # the slot row of an account's login turn (names have no '/')


class SharedBackoff(NamedTuple):
    """An account's backoff as the workers share it."""

    until: float  # epoch seconds
    why: str  # the reason label (relay_account_backoffs_total)
    failures: int  # account-wide failures in a row: the next step's length follows it


def encode_reason(why: str, failures: int) -> str:
    """The stored reason: the label and the count of failures ('auth:3'), so that the
    worker that probes next continues the steps (1 min, 2, 4 ...) instead of its own."""
    return f"{why}:{failures}"


def decode_reason(until: float, reason: str) -> SharedBackoff:
    why, _, count = reason.rpartition(":")
    if not why or not count.isdigit():
        return SharedBackoff(until, reason, 1)
    return SharedBackoff(until, why, max(1, int(count)))


class HostAccounts:
    """The shared state of every account, for one worker process."""

    def __init__(self, store: QueueStore, workers: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.workers = workers  # how many processes share each account
        self.clock = clock
        self._seen: dict[str, tuple[float, str]] = {}
        self._seen_at = float("-inf")  # monotonic
        self._generation = 0  # bumped by each backoff write of this process
        self._reading: asyncio.Task[dict[str, tuple[float, str]]] | None = None
        self.lease_s = 300.0  # slot leases (renewed with the claims': Scheduler)
        self.writes: set[asyncio.Task[None]] = set()  # backoff writes under way
        # Slots whose connection closed while the queue could not be written (a database
        # outage): still held in the queue, and renewed with this owner's others, so they
        # would be lost to every process until a restart. Given back once it answers.
        self.unreturned: set[tuple[str, int]] = set()

    def account(self, name: str, most: int) -> HostAccount:
        return HostAccount(self, name, most)

    async def backoffs(self) -> dict[str, tuple[float, str]]:
        """The shared backoffs, read at most every BACKOFFS_FRESH_S (one read serves every
        account's worker); a claim checks them itself, so a stale view only costs a poll."""
        while time.monotonic() - self._seen_at >= BACKOFFS_FRESH_S:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read())
            await asyncio.shield(self._reading)
        return self._seen

    async def _read(self) -> dict[str, tuple[float, str]]:
        """Read the backoffs; kept only if no write of ours ended meanwhile (the read
        may have missed it: then the caller reads again)."""
        generation, started = self._generation, time.monotonic()
        seen = await self.store.backoffs()
        if generation == self._generation:
            self._seen, self._seen_at = seen, started
        return seen

    async def give_back_unreturned(self) -> None:
        """Give back the slots a failed write left held (Scheduler, every watch)."""
        for account, slot in sorted(self.unreturned):
            await self.store.give_slot(account, slot)  # StoreError: tried again later
            self.unreturned.discard((account, slot))

    def write(self, account: str, until: float | None, reason: str = "") -> None:
        """Store (``until``) or clear an account's backoff in the background."""
        task = asyncio.get_running_loop().create_task(self._write(account, until, reason))
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _write(self, account: str, until: float | None, reason: str) -> None:
        try:
            if until is None:
                await self.store.clear_backoff(account)
            else:
                await self.store.set_backoff(account, until, reason)
        except StoreError as exc:
            event(log, logging.ERROR, "queue_error", account=account,
                  reason=f"cannot share the account's backoff: {exc}")
        finally:
            self._generation += 1
            self._seen_at = float("-inf")

    def writing(self) -> bool:
        """A backoff write of this process is under way, for any account (its view may
        be newer than the queue's)."""
        return bool(self.writes)


class HostAccount:
    """One account's slots, login turn, backoff and probe (transport.HostShare)."""

    def __init__(self, host: HostAccounts, name: str, most: int) -> None:
        self.host = host
        self.name = name
        self.most = most
        # This process's part of the account's connections: the host's limit holds
        # through the slots; the part keeps one worker from taking every slot while the
        # others have mail to send too (each worker then delivers on its own core).
        self.share = max(1, -(-most // host.workers))
        self._starved_until = 0.0  # monotonic

    @property
    def starved(self) -> bool:
        """A try for a slot found every one held by other processes, within STARVED_S."""
        return time.monotonic() < self._starved_until

    # -- the pool's side: slots and logins --------------------------------------------
    async def try_slot(self) -> int | None:
        """A connection slot, or None while the other processes hold them all."""
        now = self.host.clock()
        slot = await self.host.store.take_slot(self.name, self.most, now + self.host.lease_s,
                                               now)
        self._starved_until = 0.0 if slot is not None else time.monotonic() + STARVED_S
        return slot

    async def take_slot(self) -> int:
        """A connection slot, waiting while the other processes hold them all."""
        while True:
            slot = await self.try_slot()
            if slot is not None:
                return slot
            await asyncio.sleep(SLOT_POLL_S)

    async def give_slot(self, slot: int) -> None:
        """Never raises: a slot that cannot be given back now is given back once the
        queue answers again (HostAccounts.give_back_unreturned)."""
        try:
            await asyncio.shield(self.host.store.give_slot(self.name, slot))
        except StoreError:
            self.host.unreturned.add((self.name, slot))

    async def begin_login(self) -> None:
        """Wait for the host's login turn; TemporaryFailure (without a login) while the
        account backs off (another process's login was refused, or it is down)."""
        turn = LOGIN_TURN.format(account=self.name)
        store = self.host.store
        while True:
            now = self.host.clock()
            if await store.take_slot(turn, 1, now + self.host.lease_s, now) is not None:
                break
            await asyncio.sleep(SLOT_POLL_S)
        try:
            until, reason = (await store.backoffs()).get(self.name, (0.0, ""))
        except BaseException:
            await self._end_turn()
            raise
        if until > self.host.clock():
            await self._end_turn()
            why = decode_reason(until, reason).why or "auth"
            raise TemporaryFailure(
                f"not logging in: the account backs off ({why}) for every worker",
                account_reason=why)

    async def end_login(self, refused_hold_s: float | None) -> None:
        """The login is over; refused: the account backs off for every process at least
        ``refused_hold_s`` (auth_backoff.initial) before the next process may try."""
        try:
            if refused_hold_s is not None:
                with contextlib.suppress(StoreError):
                    # The host's failures in a row stay as counted (the worker whose login
                    # this was adds its step next): a floor, not a reset to the first step.
                    row = (await self.host.store.backoffs()).get(self.name)
                    failures = decode_reason(*row).failures if row is not None else 1
                    await self.host.store.set_backoff(
                        self.name, self.host.clock() + refused_hold_s,
                        encode_reason("auth", failures))
        finally:
            await self._end_turn()

    async def _end_turn(self) -> None:
        turn = LOGIN_TURN.format(account=self.name)
        try:
            await asyncio.shield(self.host.store.give_slot(turn, 0))
        except StoreError:  # or no process could log in again until this one restarts
            self.host.unreturned.add((turn, 0))

    # -- the worker's side: backoff and probe -----------------------------------------
    async def backoff(self, *, fresh: bool = False) -> SharedBackoff | None:
        """The account's backoff while it backs off or awaits its probe, else None.
        ``fresh``: read now, not the view of the last BACKOFFS_FRESH_S."""
        shared = await (self.host.store.backoffs() if fresh else self.host.backoffs())
        row = shared.get(self.name)
        return None if row is None else decode_reason(*row)

    def backed_off(self, until: float, why: str, failures: int) -> None:
        self.host.write(self.name, until, encode_reason(why, failures))

    def recovered(self) -> None:
        self.host.write(self.name, None)

    @property
    def writing(self) -> bool:
        return self.host.writing()

    async def take_probe(self, lease_s: float) -> bool:
        now = self.host.clock()
        return await self.host.store.take_probe(self.name, now + lease_s, now)
