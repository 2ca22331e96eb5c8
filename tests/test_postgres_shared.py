"""The PostgreSQL store's side of tests/test_host_limits.py (issue 13's interface, from
the workers2 branch): connection slots and account backoffs shared by relays on one
database. The same steps as the SQLite tests there; once both branches are merged these
can become that file's postgres parameter.

Two stores on one database stand for two relays; closing one is its relay gone (its
heartbeat row goes; a killed relay's expires, see tests/test_claims.py).
"""

from __future__ import annotations

import time

from relay.queue.postgres.store import PostgresStore
from tests.conftest import new_message


async def _two(url: str) -> tuple[PostgresStore, PostgresStore]:
    a = PostgresStore(url, owner="worker-a")
    b = PostgresStore(url, owner="worker-b")
    await a.open()
    await b.open()
    return a, b


async def test_connection_slots_hold_across_processes_and_come_back(pg_url: str) -> None:
    a, b = await _two(pg_url)
    try:
        now = time.time()
        assert await a.take_slot("up", 2, now + 30, now) == 0
        assert await b.take_slot("up", 2, now + 30, now) == 1
        assert await a.take_slot("up", 2, now + 30, now) is None, "two held by live owners"
        assert await b.take_slot("other", 2, now + 30, now) == 0, "per account"
        await a.give_slot("up", 0)
        assert await b.take_slot("up", 2, now + 30, now) == 0
        # A lease that ran out frees its slot; one renewed does not.
        assert await b.renew_slots(now + 60) == 3
        assert await a.take_slot("up", 2, now + 90, now + 45) is None
        assert await a.take_slot("up", 2, now + 100, now + 61) == 0
        assert await b.take_slot("up", 2, now + 100, now + 61) == 1
        await a.give_slot("up", 1)  # not a's: b keeps it
        assert await a.take_slot("up", 2, now + 100, now + 61) is None
    finally:
        await a.close()
        await b.close()


async def test_a_dead_owners_slots_and_probe_are_free_at_once(pg_url: str) -> None:
    a, b = await _two(pg_url)
    try:
        now = time.time()
        assert await a.take_slot("up", 1, now + 3600, now) == 0
        await a.set_backoff("up", now - 1, "connect")
        assert await a.take_probe("up", now + 3600, now)
        assert not await b.take_probe("up", now + 3600, now), "a probes, b waits"
        assert await b.take_slot("up", 1, now + 3600, now) is None
        await a.close()  # its process is gone: no lease to wait for
        assert await b.take_slot("up", 1, now + 3600, now) == 0
        assert await b.take_probe("up", now + 3600, now)
        # requeue_expired (the supervisor, when a worker dies) frees them as well.
        c = PostgresStore(pg_url, owner="worker-c")
        await c.open()
        await c.take_slot("other", 1, now + 3600, now)
        await c.close()
        assert await b.requeue_expired(now) == 0
        assert await b.take_slot("other", 1, now + 3600, now) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_backoff_stops_every_processs_claims_and_one_probes(pg_url: str) -> None:
    a, b = await _two(pg_url)
    try:
        now = time.time()
        for _ in range(4):
            await a.enqueue(new_message(now))
        await a.set_backoff("up", now + 60, "auth")
        assert await b.backoffs() == {"up": (now + 60, "auth")}
        assert await b.claim_due("up", now, 10, lease_s=30) == [], "backed off for all"
        assert not await b.take_probe("up", now + 90, now)
        later = now + 61
        # Over: one process probes, the other claims nothing until the probe's result.
        assert await b.take_probe("up", later + 30, later)
        assert await b.take_probe("up", later + 30, later), "still b's"
        assert not await a.take_probe("up", later + 30, later)
        assert await a.claim_due("up", later, 10, lease_s=30) == []
        assert len(await b.claim_due("up", later, 1, lease_s=30)) == 1
        # The probe failed: a longer backoff, the probe is over.
        await b.set_backoff("up", later + 120, "auth")
        assert await a.claim_due("up", later + 121, 10, lease_s=30) == []
        assert await a.take_probe("up", later + 150, later + 121)
        # It worked: every process sends again.
        await a.clear_backoff("up")
        assert await b.backoffs() == {}
        assert await b.take_probe("up", later + 150, later + 121)
        assert len(await b.claim_due("up", later + 121, 10, lease_s=30)) == 3
        # A probe whose lease ran out goes to another process.
        await a.set_backoff("up", later, "connect")
        assert await a.take_probe("up", later + 125, later + 122)
        assert not await b.take_probe("up", later + 200, later + 124)
        assert await b.take_probe("up", later + 200, later + 126)
    finally:
        await a.close()
        await b.close()


async def test_queue_flush_ends_every_shared_backoff(pg_url: str) -> None:
    a, b = await _two(pg_url)
    try:
        now = time.time()
        await a.set_backoff("up", now + 600, "quota")
        await a.set_backoff("other", now + 600, "auth")
        await b.request_flush(now)
        assert await a.backoffs() == {}
    finally:
        await a.close()
        await b.close()
