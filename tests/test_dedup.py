"""Idempotent submission (issue 16.3): a message whose Message-ID and envelope sender were
accepted within dedup.window is answered with the first queue id and not queued again,
over real SMTP, against the real queue file, also from two relays on one queue."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.app import App, WorkerRole
from relay.ingest.auth import hash_password
from relay.queue.types import Dedup, NewMessage, Priority, new_queue_id
from tests.conftest import (
    MakeStore,
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
)
from tests.upstream import FakeUpstream

QUEUED = re.compile(r"2\.0\.0 queued as ([0-9A-F]{22})$")


def _id(reply: tuple[int, str]) -> str:
    code, text = reply
    found = QUEUED.match(text)
    assert code == 250 and found, reply
    return found.group(1)


def _with_id(mid: str, subject: str = "dup") -> bytes:
    return message(subject, headers={"Message-ID": mid})


async def _relay(tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
                 **sections: object) -> App:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          dedup={"window": "1h"}, **sections)
    return await start_relay(config)


@pytest.mark.usefixtures("each_store")  # end to end on both stores
async def test_a_resubmitted_message_gets_the_first_id_and_is_sent_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    caplog.set_level(logging.INFO, "relay.smtpd")
    first = _id(await send(app.smtp_port, _with_id("<a1@app.example>")))
    # The app timed out waiting for the 250 and sends it again, the sender's domain
    # spelled in capitals this time: the same mailbox.
    again = _id(await send(app.smtp_port, _with_id("<a1@app.example>", "retry"),
                           sender="app@EXAMPLE.com"))
    assert again == first
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 1
    assert b"Subject: dup" in upstream.messages[0].data
    assert metric(app, "relay_messages_deduplicated_total") == 1
    assert metric(app, "relay_messages_received_total") == 1
    [line] = [r.getMessage() for r in caplog.records if "deduplicated" in r.getMessage()]
    assert line.startswith(f"{first}: deduplicated duplicate=")
    assert (await app.store.get(first)) is not None


async def test_other_senders_other_ids_and_no_message_id_are_all_queued(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    ids = {
        _id(await send(app.smtp_port, _with_id("<b1@app.example>"))),
        _id(await send(app.smtp_port, _with_id("<b1@app.example>"), sender="other@example.com")),
        _id(await send(app.smtp_port, _with_id("<b2@app.example>"))),
        _id(await send(app.smtp_port, message("no id"))),
        _id(await send(app.smtp_port, message("no id"))),
    }
    assert len(ids) == 5
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 5
    assert metric(app, "relay_messages_deduplicated_total") == 0


async def test_dedup_is_off_by_default(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    first = _id(await send(app.smtp_port, _with_id("<c1@app.example>")))
    assert _id(await send(app.smtp_port, _with_id("<c1@app.example>"))) != first


async def test_parallel_submissions_of_one_message_queue_it_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    replies = await asyncio.gather(*(send(app.smtp_port, _with_id("<d1@app.example>"))
                                     for _ in range(6)))
    assert len({_id(r) for r in replies}) == 1
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 1
    assert metric(app, "relay_messages_deduplicated_total") == 5


async def test_two_relays_on_one_queue_queue_one_copy_and_answer_the_winners_id(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Two workers (each its own store, connections and writer) on one queue file: the
    key's unique row, written in the enqueue's transaction, lets only one win."""
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          dedup={"window": "1h"})
    apps = [App(config, registry=CollectorRegistry(),
                worker=WorkerRole(shared=True, delivers=i == 0, index=i, count=2))
            for i in range(2)]
    for app in apps:
        await app.startup()
    try:
        for n in range(5):
            mid = f"<e{n}@app.example>"
            replies = await asyncio.gather(*(send(a.smtp_port, _with_id(mid))
                                             for a in apps for _ in range(2)))
            assert len({_id(r) for r in replies}) == 1, replies
        # Worker 1's messages reach worker 0's scheduler by its queue watcher: wait.
        await upstream.wait_for_messages(5)
        await asyncio.sleep(0.6)  # (one more watcher round: nothing else is queued)
        assert len(upstream.messages) == 5
        assert sum(metric(a, "relay_messages_deduplicated_total") for a in apps) == 15
    finally:
        for app in apps:
            await app.shutdown(grace=2.0)


# -- what is "the same submission" (fixes from the attack round, issues 15 and 16) ------


async def test_copies_to_other_recipients_under_one_message_id_are_all_queued(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """List software without VERP and MUAs sending each Bcc copy on its own reuse the
    Message-ID: each recipient's copy is a message. A retry names the same recipients
    (in any order, the domain in any case): that one is recognised."""
    app = await _relay(tmp_path, upstream, start_relay)
    body = _with_id("<list-1@app.example>")
    ids = [_id(await send(app.smtp_port, body, recipients=[f"member{n}@example.org"]))
           for n in range(3)]
    assert len(set(ids)) == 3
    both = _id(await send(app.smtp_port, body, recipients=["a@example.org", "b@example.org"]))
    again = _id(await send(app.smtp_port, body, recipients=["b@EXAMPLE.org", "a@example.org"]))
    assert again == both
    await app.scheduler.run_until_idle()
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == [
        "a@example.org", "b@example.org", "member0@example.org", "member1@example.org",
        "member2@example.org"]


async def test_one_listener_user_cannot_suppress_or_probe_anothers_messages(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    users = {name: {"password_hash": hash_password(f"{name}-pw")} for name in ("alice", "bob")}
    app = await _relay(tmp_path, upstream, start_relay, listen={"auth": {"users": users}})
    body = _with_id("<invoice-9@app.example>")
    alices = _id(await send(app.smtp_port, body, login=("alice", "alice-pw")))
    # Bob sends the same Message-ID, sender and recipient first or after: his own message,
    # and he does not learn Alice's id.
    bobs = _id(await send(app.smtp_port, body, login=("bob", "bob-pw")))
    anonymous = _id(await send(app.smtp_port, body))
    assert len({alices, bobs, anonymous}) == 3
    assert _id(await send(app.smtp_port, body, login=("alice", "alice-pw"))) == alices
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 3


async def test_a_split_message_resubmitted_after_routing_changed_is_not_queued_again(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Each entry's key is the whole submission plus the entry's account: a retry that
    the rules now route to one of those accounts alone is recognised there."""
    async with FakeUpstream() as partner:
        accounts = {"up": upstream_account(upstream, tmp_path),
                    "partner": upstream_account(partner, tmp_path)}
        rules = {"rules": [{"recipient_domain": "partner.org", "account": "partner"}]}
        app = await start_relay(relay_config(tmp_path, accounts, dedup={"window": "1h"},
                                             routing=rules))
        body, rcpts = _with_id("<split-1@app.example>"), ["x@partner.org", "y@example.org"]
        reply = await send(app.smtp_port, body, recipients=rcpts)
        assert reply[0] == 250
        first = reply[1].removeprefix("2.0.0 queued as ").split()
        assert len(first) == 2
        await app.reload(relay_config(tmp_path, accounts, dedup={"window": "1h"}))
        again = _id(await send(app.smtp_port, body, recipients=rcpts))  # all to "up" now
        assert again in first
        await app.scheduler.run_until_idle()
        assert len(await app.store.list_messages()) == 2
        assert [list(m.rcpt_tos) for m in upstream.messages] == [["y@example.org"]]
        assert [list(m.rcpt_tos) for m in partner.messages] == [["x@partner.org"]]


def _new(key: str, created_at: float, window_s: float = 60.0) -> NewMessage:
    return NewMessage(id=new_queue_id(), sender="a@example.com", recipients=("b@example.com",),
                      account="up", priority=Priority.NORMAL, body=b"x", created_at=created_at,
                      not_before=created_at, dedup=Dedup(key, window_s))


async def test_a_key_is_forgotten_after_its_window_and_pruned(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    try:
        now = time.time()
        first = _new("k", now)
        assert await store.enqueue(first) == first.id
        assert await store.enqueue(_new("k", now + 59)) == first.id
        later = _new("k", now + 61)  # the window has passed: a new message
        assert await store.enqueue(later) == later.id
        assert await store.enqueue(_new("k", now + 62)) == later.id
        await store.prune(now + 200, keep_delivered_s=3600)
        assert await store._fetch("SELECT count(*) FROM dedup") == [(0,)]
        assert len(await store.list_messages()) == 2
    finally:
        await store.close()


async def test_enqueue_all_dedups_each_message_in_its_one_transaction(
    make_store: MakeStore,
) -> None:
    """A key already on record, and a key given twice within the batch: each answers the
    id that holds it, and only the new messages are written."""
    store = make_store()
    await store.open()
    try:
        now = time.time()
        old = _new("old", now)
        await store.enqueue(old)
        a, a_again, b, again = (_new("a", now), _new("a", now), _new("b", now),
                                _new("old", now + 1))
        assert await store.enqueue_all([a, a_again, b, again]) == [a.id, a.id, b.id, old.id]
        assert sorted(m.id for m in await store.list_messages()) == sorted([old.id, a.id, b.id])
    finally:
        await store.close()


async def test_concurrent_submissions_through_two_stores_queue_exactly_one(
    make_store: MakeStore,
) -> None:
    """Two relays' stores (their own connections) submit one key at the same moment,
    many times: the key's unique row lets exactly one copy in, and every submission is
    answered with that copy's id."""
    stores = [make_store(owner=f"relay-{i}", lock=False) for i in range(2)]
    for store in stores:
        await store.open()
    try:
        now = time.time()
        for n in range(20):
            tries = [_new(f"k{n}", now) for _ in range(4)]
            ids = await asyncio.gather(*(stores[i % 2].enqueue(m) for i, m in enumerate(tries)))
            assert len(set(ids)) == 1 and ids[0] in {m.id for m in tries}, ids
        assert len(await stores[0].list_messages()) == 20
    finally:
        for store in stores:
            await store.close()


async def test_two_batches_with_the_same_keys_in_opposite_orders_both_commit(
    make_store: MakeStore,
) -> None:
    """enqueue_all on two relays at once, keys k, j against j, k: no deadlock (keys are
    taken in one order); each key's one message answers both batches."""
    stores = [make_store(owner=f"relay-{i}", lock=False) for i in range(2)]
    for store in stores:
        await store.open()
    try:
        now = time.time()
        for n in range(10):
            one = [_new(f"k{n}", now), _new(f"j{n}", now)]
            other = [_new(f"j{n}", now), _new(f"k{n}", now)]
            first, second = await asyncio.gather(stores[0].enqueue_all(one),
                                                 stores[1].enqueue_all(other))
            assert first == second[::-1], (first, second)
        assert len(await stores[0].list_messages()) == 20
    finally:
        for store in stores:
            await store.close()
