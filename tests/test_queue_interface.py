"""The queue interface (relay.queue.store.QueueStore) as the SQLite store implements it.

Written for several processes on one queue: a claim says who holds a message and until
when, and an attempt's result names the claim it settles. Shared state between the server
and the CLI (a flush request, account health) goes through methods, not meta keys.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from relay.delivery.outcome import settle
from relay.delivery.retry import RetryPolicy
from relay.delivery.transport import SendResult
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.store import QueueStore
from relay.queue.types import Claim, MessageState, NewMessage, Priority, new_queue_id


def _message(now: float) -> NewMessage:
    return NewMessage(id=new_queue_id(), sender="app@example.com",
                      recipients=("to@example.com",), account="up", priority=Priority.NORMAL,
                      body=b"Subject: x\r\n\r\nhi\r\n", created_at=now, not_before=now)


async def test_a_claim_names_its_owner_and_lease_and_the_result_settles_it(
        tmp_path: Path) -> None:
    store: QueueStore = SQLiteStore(tmp_path / "queue.sqlite3", owner="host-a:1")
    await store.open()
    try:
        now = time.time()
        await store.enqueue(_message(now))
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
        tmp_path: Path) -> None:
    server: QueueStore = SQLiteStore(tmp_path / "queue.sqlite3")
    await server.open()
    cli: QueueStore = SQLiteStore(tmp_path / "queue.sqlite3", lock=False)
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
