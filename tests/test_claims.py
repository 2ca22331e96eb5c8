"""Claims across processes (issue 13): owners, leases, start-up recovery, unique ids, and
the write lock shared by every process of one queue.

Two stores on one file stand for two workers where a real process is not needed (each
has its own connections, liveness file and owner); a real subprocess where death
matters (its liveness lock must go with it on SIGKILL).
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

from relay.delivery.outcome import settle
from relay.delivery.retry import RetryPolicy
from relay.delivery.transport import SendResult
from relay.errors import TemporaryFailure
from relay.queue.sqlite.schema import SCHEMA_VERSION
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import MessageState, new_queue_id, queue_id
from tests.conftest import (
    MakeStore,
    StartRelay,
    TwoWorkers,
    message,
    metric,
    new_message,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream

POLICY = RetryPolicy(60, 600, 3600)



async def test_an_outcome_is_recorded_only_by_the_claims_owner(two_workers: TwoWorkers) -> None:
    a, b = two_workers
    now = time.time()
    await a.enqueue(new_message(now))
    (by_a,) = await a.claim_due("up", now, 10, lease_s=1)
    # A's lease runs out (a stalled send); B takes the message over and delivers it.
    assert await b.requeue_expired(now + 2) == 1
    (by_b,) = await b.claim_due("up", now + 2, 10, lease_s=30)
    assert by_b.claim is not None and by_b.claim.owner == "worker-b"
    late = settle(by_a, TemporaryFailure("451 4.3.0 try later"), now=now + 3,
                  policy=POLICY, rng=random.Random(1))
    assert not await a.finish(late), "a stale owner's outcome must be refused"
    row = await b.get(by_b.id)
    assert row is not None and row.state is MessageState.SENDING and row.attempts == 0
    done = settle(by_b, SendResult(accepted=["to@example.com"], reply="250 ok"),
                  now=now + 4, policy=POLICY, rng=random.Random(1))
    assert await b.finish(done)
    assert await b.state_of(by_b.id) is MessageState.DELIVERED
    assert await b.recent_sends("up", now) == [now + 3, now + 4]  # both sends count


async def test_a_live_owners_lease_is_renewed_and_not_swept(two_workers: TwoWorkers) -> None:
    a, b = two_workers
    now = time.time()
    await a.enqueue(new_message(now))
    (claimed,) = await a.claim_due("up", now, 10, lease_s=1)
    assert await b.renew([claimed.id], now + 60) == 0, "only the owner renews"
    assert await a.renew([claimed.id], now + 60) == 1
    assert await b.requeue_expired(now + 30) == 0
    assert await b.recover(now + 30) == 0
    assert await a.state_of(claimed.id) is MessageState.SENDING


CLAIMER = """
import asyncio, sys, time
from relay.queue.postgres.store import PostgresStore
from relay.queue.sqlite.store import SQLiteStore

async def main():
    if sys.argv[1].startswith("postgresql:"):  # its heartbeat expires 1 s after its death
        store = PostgresStore(sys.argv[1], heartbeat_ttl_s=1.0)
    else:
        store = SQLiteStore(sys.argv[1], lock=False)
    await store.open()
    claimed = await store.claim_due("up", time.time(), 10, lease_s=3600)
    print(len(claimed), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_start_up_requeues_only_claims_whose_owner_is_gone(
        make_store: MakeStore, store_kind: str, tmp_path: Path) -> None:
    store = make_store(lock=False)
    path = getattr(store, "url", tmp_path / "queue.sqlite3")
    await store.open()
    try:
        now = time.time()
        for _ in range(3):
            await store.enqueue(new_message(now))
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLAIMER, str(path), stdout=asyncio.subprocess.PIPE)
        try:
            assert other.stdout is not None
            line = await asyncio.wait_for(other.stdout.readline(), 20)
            assert line.strip() == b"3"
            # Another worker starts while the first is alive and sending: hands off.
            assert await store.recover(time.time()) == 0
            assert (await store.counts())[("up", "sending")] == 3
        finally:
            other.send_signal(signal.SIGKILL)
            await other.wait()
        # Its owner is dead (its liveness lock went with it, or on PostgreSQL its
        # heartbeat expired): at once, not after its lease of 1 h.
        if store_kind == "postgres":
            assert await store.requeue_expired(time.time()) == 0, "its heartbeat still holds"
            await asyncio.sleep(1.2)
        assert await store.requeue_expired(time.time()) == 3
        assert (await store.counts())[("up", "queued")] == 3
    finally:
        await store.close()


def _ids(n: int) -> list[str]:
    return [new_queue_id() for _ in range(n)]


def test_queue_ids_are_unique_across_forked_processes() -> None:
    # Forked workers share the parent's module state (its counter, any per-process
    # prefix drawn at import): the pid in each id keeps them apart.
    _ids(10)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        batches = pool.map(_ids, [20_000, 20_000])
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids)
    assert queue_id(1, 100, 7) != queue_id(1, 101, 7)
    assert len(queue_id(2**44, 2**23, 2**19)) == 22


async def test_a_long_wait_for_the_write_lock_answers_451_and_writes_nothing(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    assert isinstance(app.store, SQLiteStore)
    app.store.lock_wait_s = 0.3
    # Another process holding the queue's write lock (a stuck worker, a slow disk).
    fd = os.open(str(config.queue.path) + ".write-lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        sending = asyncio.create_task(send(app.smtp_port, message("waits")))
        await wait_until(lambda: app._committing > 0)  # its commit waits for the lock
        await asyncio.sleep(0.6)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    code, text = await sending
    assert (code, text.split()[0]) == (451, "4.3.0"), text
    assert metric(app, "relay_messages_rejected_total", reason="queue_busy") == 1
    assert await app.store.list_messages() == []
    code, text = await send(app.smtp_port, message("after"))  # the lock is free again
    assert code == 250, text


async def test_a_queue_file_from_before_owners_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = SQLiteStore(path, lock=False)
    await store.open()
    await store.enqueue(new_message(time.time()))
    await store.execute([("ALTER TABLE messages DROP COLUMN owner", ()),
                         ("ALTER TABLE attempts DROP COLUMN transcript", ()),
                         ("DROP TABLE dedup", ()), ("DROP TABLE events", ()),
                         ("PRAGMA user_version = 3", ())])  # as schema 3 made it
    await store.close()
    store = SQLiteStore(path, lock=False, owner="after", migrate=True)
    await store.open()
    try:
        assert store.applied == list(range(4, SCHEMA_VERSION + 1))
        (claimed,) = await store.claim_due("up", time.time(), 10, lease_s=30)
        assert claimed.claim is not None and claimed.claim.owner == "after"
    finally:
        await store.close()


async def test_a_killed_process_leaves_no_liveness_file_after_the_next_start(
        tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLAIMER, str(path), stdout=asyncio.subprocess.PIPE)
    assert other.stdout is not None
    assert (await asyncio.wait_for(other.stdout.readline(), 20)).strip() == b"0"
    owners = path.with_name(path.name + ".owners")
    assert len(list(owners.iterdir())) == 1
    other.send_signal(signal.SIGKILL)
    await other.wait()
    store = SQLiteStore(path, owner="server")  # `relay serve` (it takes the queue lock)
    await store.open()
    try:
        assert [p.name for p in owners.iterdir()] == ["server"]
    finally:
        await store.close()
    assert list(owners.iterdir()) == []


async def test_a_rate_window_is_checked_in_the_claim_across_processes(
        two_workers: TwoWorkers) -> None:
    """Two workers claiming for one account: together never more than the window allows,
    a send counting from its claim to its end (then by the time it ended)."""
    a, b = two_workers
    now = time.time()
    for _ in range(10):
        await a.enqueue(new_message(now))
    per_second = ((1.0, 3),)
    first = await a.claim_due("up", now, 10, lease_s=30, windows=per_second)
    assert len(first) == 3
    assert await b.claim_due("up", now, 10, lease_s=30, windows=per_second) == []
    for m in first:  # they end at now + 0.2: in the window until now + 1.2
        await a.finish(settle(m, SendResult(accepted=["to@example.com"], reply="250 ok"),
                              now=now + 0.2, policy=POLICY, rng=random.Random(1)))
    assert await b.claim_due("up", now + 0.5, 10, lease_s=30, windows=per_second) == []
    later = await b.claim_due("up", now + 1.3, 10, lease_s=30, windows=per_second)
    assert len(later) == 3
    # Without windows (an account with no rate limit) nothing is held back.
    assert len(await a.claim_due("up", now + 1.3, 10, lease_s=30)) == 4
