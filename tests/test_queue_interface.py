"""The queue interface (relay.queue.store.QueueStore) as both stores implement it.

Written for several processes on one queue: a claim says who holds a message and until
when, and an attempt's result names the claim it settles. Shared state between the server
and the CLI (a flush request, account health) goes through methods, not meta keys.
"""

from __future__ import annotations

import random
import time

from relay.delivery.outcome import settle
from relay.delivery.retry import RetryPolicy
from relay.delivery.transport import SendResult
from relay.errors import PermanentFailure
from relay.queue.store import QueueStore
from relay.queue.types import Claim, MessageState, NewMessage, Priority, new_queue_id
from tests.conftest import MakeStore, new_message


async def test_a_claim_names_its_owner_and_lease_and_the_result_settles_it(
        make_store: MakeStore) -> None:
    store: QueueStore = make_store(owner="host-a:1")
    await store.open()
    try:
        now = time.time()
        await store.enqueue(new_message(now))
        (claimed,) = await store.claim_due("up", now, 10, lease_s=30)
        assert claimed.claim == Claim("host-a:1", now + 30)
        result = settle(claimed, SendResult(accepted=["to@example.com"], reply="250 ok"),
                        now=now, policy=RetryPolicy(60, 600, 3600), rng=random.Random(1))
        assert result.claim == claimed.claim
        await store.finish(result)
        assert await store.state_of(claimed.id) is MessageState.DELIVERED
    finally:
        await store.close()


async def test_flush_requests_and_health_reports_pass_through_the_interface(
        make_store: MakeStore) -> None:
    server: QueueStore = make_store()
    await server.open()
    cli: QueueStore = make_store(lock=False)
    await cli.open()
    try:
        assert await server.flush_requested() is None
        await cli.request_flush(1234.5)
        assert await server.flush_requested() == repr(1234.5)
        await server.publish_health('{"pid": 1}')
        assert await cli.read_health() == '{"pid": 1}'
        await server.check_writable()
    finally:
        await cli.close()
        await server.close()


async def test_a_claim_takes_strict_priority_then_readiness(make_store: MakeStore) -> None:
    store: QueueStore = make_store()
    await store.open()
    try:
        now = time.time()
        ids = {}
        for name, priority, due in [("low", Priority.LOW, now - 9), ("later", Priority.HIGH,
                                    now + 60), ("normal", Priority.NORMAL, now - 5),
                                    ("high", Priority.HIGH, now - 1),
                                    ("normal2", Priority.NORMAL, now - 7)]:
            m = NewMessage(id=new_queue_id(), sender="app@example.com",
                           recipients=("to@example.com",), account="up", priority=priority,
                           body=b"x", created_at=now - 10, not_before=due)
            ids[m.id] = name
            await store.enqueue(m)
        claimed = await store.claim_due("up", now, 3, lease_s=30)
        assert [ids[m.id] for m in claimed] == ["high", "normal2", "normal"]
        assert [ids[m.id] for m in await store.claim_due("up", now, 9, lease_s=30)] == ["low"]
    finally:
        await store.close()


async def test_a_bounce_is_queued_with_the_outcome_that_causes_it_or_not_at_all(
        make_store: MakeStore) -> None:
    a: QueueStore = make_store(owner="relay-a")
    b: QueueStore = make_store(lock=False, owner="relay-b")
    await a.open()
    await b.open()
    try:
        now = time.time()
        await a.enqueue(new_message(now))
        (stale,) = await a.claim_due("up", now, 10, lease_s=1)
        assert await b.requeue_expired(now + 2) == 1
        (held,) = await b.claim_due("up", now + 2, 10, lease_s=30)
        failed = settle(stale, PermanentFailure("550 5.1.1 no such user"), now=now + 3,
                        policy=RetryPolicy(60, 600, 3600), rng=random.Random(1))
        late_bounce = new_message(now + 3)
        assert not await a.finish(failed, late_bounce)
        assert await a.get(late_bounce.id) is None, "no bounce without its outcome"
        failed = settle(held, PermanentFailure("550 5.1.1 no such user"), now=now + 4,
                        policy=RetryPolicy(60, 600, 3600), rng=random.Random(1))
        bounce = new_message(now + 4)
        assert await b.finish(failed, bounce)
        assert await b.state_of(held.id) is MessageState.FAILED
        assert await b.body_if_kept(held.id) is not None, "a failed body stays for retry"
        assert await b.state_of(bounce.id) is MessageState.QUEUED
        assert await b.load_body(bounce.id) == bounce.body
        shown = await b.get(held.id)
        assert shown is not None and [r["outcome"] for r in shown.attempts_log] == ["failed"]
    finally:
        await a.close()
        await b.close()
