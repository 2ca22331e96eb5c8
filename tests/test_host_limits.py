"""What the processes on one queue share about an account (issue 13): connection slots
(pool.max_connections across workers) and the account's backoff with one probe at a time.

Each store-level test runs on both stores (``make_store``: one SQLite file, or one
PostgreSQL database, where two stores stand for two relays). Two stores on one file stand
for two workers (each its own owner and liveness file);
closing one is its process gone (its liveness file goes with it, as with SIGKILL, see
tests/test_claims.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from relay.app import WorkerRole
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import MessageState
from tests.conftest import (
    MakeStore,
    StartRelay,
    message,
    metric,
    new_message,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream


async def _two(make_store: MakeStore) -> tuple[Any, Any]:
    a = make_store(lock=False, owner="worker-a")
    b = make_store(lock=False, owner="worker-b")
    await a.open()
    await b.open()
    return a, b


async def test_connection_slots_hold_across_processes_and_come_back(make_store: MakeStore) -> None:
    a, b = await _two(make_store)
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


async def test_a_dead_owners_slots_and_probe_are_free_at_once(make_store: MakeStore) -> None:
    a, b = await _two(make_store)
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
        c = make_store(lock=False, owner="worker-c")
        await c.open()
        await c.take_slot("other", 1, now + 3600, now)
        await c.close()
        assert await b.requeue_expired(now) == 0
        assert await b.take_slot("other", 1, now + 3600, now) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_backoff_stops_every_processs_claims_and_one_probes(make_store: MakeStore) -> None:
    a, b = await _two(make_store)
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


async def test_queue_flush_ends_every_shared_backoff(make_store: MakeStore) -> None:
    a, b = await _two(make_store)
    try:
        now = time.time()
        await a.set_backoff("up", now + 600, "quota")
        await a.set_backoff("other", now + 600, "auth")
        await b.request_flush(now)
        assert await a.backoffs() == {"up": (now, "quota"), "other": (now, "auth")}
        # Ended, and the next send is one probe for the host, not one per process.
        assert await a.take_probe("up", now + 60, now + 1)
        assert not await b.take_probe("up", now + 60, now + 1)
    finally:
        await a.close()
        await b.close()


async def test_one_process_after_a_run_with_workers_is_not_held_by_their_backoff(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """A backoff row left by `--workers 2` (its probe never taken) must not hold the
    claims of a relay that runs as one process (which never takes a probe)."""
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    store = SQLiteStore(config.queue.path, lock=False)
    await store.open()
    await store.set_backoff("up", time.time() - 1, "connect")
    await store.close()
    app = await start_relay(config)
    code, _ = await send(app.smtp_port, message("after workers"))
    assert code == 250
    await upstream.wait_for_messages(1, timeout=5)


async def test_a_worker_without_a_connection_gives_its_message_to_one_that_has(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """One connection for the host, held by worker a: worker b, which has none, gives its
    message back to the queue unsent (not an attempt) and a sends it, once."""
    upstream.delay("DATA", 0.5)
    config = relay_config(tmp_path, {"up": upstream_account(
        upstream, tmp_path, pool={"max_connections": 1})})
    a = await start_relay(config, WorkerRole(shared=True, index=0, count=2))
    b = await start_relay(config, WorkerRole(shared=True, index=1, count=2))
    assert (await send(a.smtp_port, message("first")))[0] == 250
    await wait_until(lambda: upstream.connections_open == 1, 5)
    code, reply = await send(b.smtp_port, message("second"))
    assert code == 250
    await upstream.wait_for_messages(2, timeout=10)
    for _ in range(100):  # the upstream records it before its (delayed) reply
        second = await b.store.get(reply.split()[-1])
        if second is not None and second.state is MessageState.DELIVERED:
            break
        await asyncio.sleep(0.05)
    assert second is not None and second.state is MessageState.DELIVERED
    assert second.attempts == 1, "given back: not an attempt"
    assert upstream.sessions_by_login_peak["user"] == 1
    assert upstream.connections_opened == 1  # a's connection carried both
    assert [m.data.count(b"Subject: second") for m in upstream.messages] == [0, 1]


async def test_after_a_backoff_one_worker_probes_for_the_host(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """The upstream refuses every session (421 at the greeting): after the first tries,
    one connection per backoff step (0.1, 0.2, 0.4 ... 1 s) for the two workers together,
    never one from each."""
    upstream.greeting(421, "4.3.2 Service not available")
    config = relay_config(tmp_path, {"up": upstream_account(
        upstream, tmp_path, pool={"max_connections": 2})})
    a = await start_relay(config, WorkerRole(shared=True, index=0, count=2))
    b = await start_relay(config, WorkerRole(shared=True, index=1, count=2))
    for app in (a, b):
        for i in range(3):
            assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    await asyncio.sleep(2.5)
    upstream.greeting(None)
    restored = time.monotonic()
    await upstream.wait_for_messages(6, timeout=10)
    tries = [t for t in upstream.connection_times if t < restored]
    probes = [t for t in tries if t > tries[0] + 0.08]  # after the first backoff step
    assert len(probes) >= 3, tries
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert min(gaps) >= 0.08, gaps
    # And the steps grow for the host, whichever worker probed last (each continues the
    # count the other stored), up to retry.max_delay.
    assert all(b >= 0.8 * a for a, b in itertools.pairwise(gaps)), gaps


@pytest.mark.parametrize("refusal", [(550, "5.4.5 Daily user sending quota exceeded"),
                                     (451, "4.7.0 Try again in 2 hours")])
async def test_after_a_flush_one_worker_probes_for_the_host(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        refusal: tuple[int, str]) -> None:
    """`relay queue flush` ends a quota backoff (or a wait the server named) for both
    workers; the upstream still refuses, and it sees one probe from the host, not one (or
    a pool's worth) from each worker. (A login refused is one at a time anyway: the host's
    login turn.) A named wait told again is no recovery: it holds every worker again."""
    upstream.reply_to("MAIL", *refusal, times=100)
    config = relay_config(tmp_path, {"up": upstream_account(
        upstream, tmp_path, pool={"max_connections": 4})},
        retry={"initial_delay": "1h", "max_delay": "1h", "max_age": "1d", "jitter": 0})
    a = await start_relay(config, WorkerRole(shared=True, index=0, count=2))
    b = await start_relay(config, WorkerRole(shared=True, index=1, count=2))
    for app in (a, b):
        for i in range(3):
            assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    workers = [app.scheduler.workers["up"] for app in (a, b)]

    def held(w: Any) -> bool:
        return bool(w.backed_off or w.throttle.held(w.mono()))

    await wait_until(lambda: all(held(w) for w in workers), what="both held")
    await asyncio.sleep(0.3)
    before = len(upstream.times_of("MAIL"))
    upstream.delay("MAIL", 1.0)  # the probe is under way while the other worker looks
    await a.store.request_flush(time.time())  # what `relay queue flush` does
    await asyncio.sleep(2.0)  # both workers saw the flush (each polls every 0.5 s)
    assert len(upstream.times_of("MAIL")) == before + 1
    await asyncio.sleep(0.5)  # the other worker reads the shared row again
    assert all(held(w) for w in workers)  # the probe failed: held again, for the host


async def test_each_worker_reports_its_own_open_connections(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """relay_upstream_connections_open is summed over the workers (multiprocess mode), so
    each worker sets its own, not only the one that serves /metrics (attack a4 #2: the
    gauge said 1 while the upstream had 5 connections open)."""
    upstream.delay("DATA", 1.0)
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    a = await start_relay(config, WorkerRole(shared=True, index=0, count=2))
    b = await start_relay(config, WorkerRole(shared=True, index=1, count=2))
    sending = asyncio.ensure_future(send(b.smtp_port, message("held at DATA")))
    await wait_until(lambda: upstream.connections_open >= 1, 5)
    # Nobody scrapes either here: whichever worker holds the connection sets its gauge.
    await wait_until(lambda: sum(metric(w, "relay_upstream_connections_open", account="up")
                                 for w in (a, b)) >= 1, 5, what="a worker's own gauge")
    assert (await sending)[0] == 250
