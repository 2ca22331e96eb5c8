"""Account groups with several processes on one queue (issue 15.2 with issue 13/14): a
group's message going through a member counts in that member's rate windows as every
process sees them (QueueStore.hold_send), the member's backoff and probe are the host's,
and a member that takes some recipients and refuses the rest for account reasons hands
the rest to the next member within the same attempt."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import load_config
from relay.delivery.groups import combined, moved_on
from relay.delivery.outcome import settle
from relay.delivery.retry import RetryPolicy
from relay.delivery.transport import SendResult
from relay.errors import PermanentFailure, TemporaryFailure
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import Priority
from tests.conftest import (
    MakeStore,
    StartRelay,
    TwoWorkers,
    message,
    metric,
    new_message,
    relay_config,
    send,
    send_many,
    upstream_account,
    wait_until,
)
from tests.relayproc import write_config
from tests.test_groups import _group_config
from tests.test_workers import _spawn
from tests.upstream import FakeUpstream

WINDOW = ((60.0, 2),)  # the member's: 2 sends a minute


def test_what_members_of_one_attempt_achieved_together() -> None:
    quota = TemporaryFailure("550 5.4.5 Daily user sending quota exceeded",
                             account_reason="quota")
    gone = PermanentFailure("550 5.1.1 No such user")
    first = SendResult(["a@x"], {"b@x": quota, "c@x": gone}, "250 ok", "one:25", "first")
    assert moved_on(first) == ["b@x"]  # the quota's; c@x is refused for itself
    then = SendResult(["b@x"], {}, "250 queued", "two:25", "second")
    both = combined(first, then)
    assert both.accepted == ["a@x", "b@x"] and both.refused == {"c@x": gone}
    assert (both.reply, both.peer, both.via) == ("250 queued", "two:25", "second")
    assert combined(None, then) is then



async def test_a_held_group_send_counts_in_the_members_windows_for_every_process(
        two_workers: TwoWorkers) -> None:
    a, b = two_workers
    now = time.time()
    for _ in range(3):
        await a.enqueue(new_message(now, "group"))
    await b.enqueue(new_message(now, "member"))
    g1, g2, g3 = await a.claim_due("group", now, 10, lease_s=60)
    # Worker A sends two group messages through the member: its window is full...
    assert await a.hold_send(g1.id, "member", now, now + 60, WINDOW)
    assert await a.hold_send(g2.id, "member", now, now + 60, WINDOW)
    assert not await a.hold_send(g3.id, "member", now, now + 60, WINDOW)
    # ...for worker B's own claims of the member too, while both are in flight.
    assert await b.claim_due("member", now, 10, lease_s=60, windows=WINDOW) == []
    # The first moves on to another member, the second goes back unsent: their places
    # are free; the third and worker B's own message of the member fill the window.
    assert await a.hold_send(g1.id, "other", now, now + 60, WINDOW)
    assert await a.hold_send(g2.id, None, now, 0.0)
    assert await a.hold_send(g3.id, "member", now, now + 60, WINDOW)
    assert len(await b.claim_due("member", now, 10, lease_s=60, windows=WINDOW)) == 1
    assert not await a.hold_send(g2.id, "member", now, now + 60, WINDOW)
    # A transaction that ends mid-attempt is counted with the progress stored.
    await a.record_recipients(g1.id, g1.recipients, sent=("other", now))
    assert await b.recent_sends("other", now - 1) == [now]
    # The outcome ends the hold and counts the send under the member, at once.
    done = settle(g3, SendResult(accepted=["to@example.com"], reply="250 ok",
                                 via="member"), now=now + 1,
                  policy=RetryPolicy(60, 600, 3600), rng=random.Random(1))
    assert await a.finish(dataclasses.replace(done, account="member"))
    assert await b.recent_sends("member", now - 1) == [now + 1]
    assert not await a.hold_send(g2.id, "member", now + 1, now + 60, WINDOW)
    # A window later that send has left it (B's own is still under way): room for one.
    assert await a.hold_send(g2.id, "member", now + 62, now + 120, WINDOW)


async def test_high_priority_may_use_the_reserve_and_a_dead_owners_hold_is_freed(
        make_store: MakeStore) -> None:
    a = make_store(lock=False, owner="worker-a")
    b = make_store(lock=False, owner="worker-b")
    await a.open()
    await b.open()
    try:
        now = time.time()
        normal, high = new_message(now, "group"), new_message(now, "group", Priority.HIGH)
        await a.enqueue(normal)
        await a.enqueue(high)
        ten = ((60.0, 10),)  # reserve 20%: 8 for normal mail, 10 for high
        for _ in range(8):
            await b.enqueue(new_message(now, "member"))
        assert len(await b.claim_due("member", now, 10, 60, ten, 0.2)) == 8
        assert not await a.hold_send(normal.id, "member", now, now + 60, ten, 0.2)
        assert await a.hold_send(high.id, "member", now, now + 60, ten, 0.2, high=True)
        # Worker A dies: its hold must not keep the member's place for its whole lease.
        await a.close()
        await b.requeue_expired(now + 1)
        assert await b.hold_send(normal.id, "member", now + 1, now + 60, ten, 0.2,
                                 high=True)
    finally:
        await b.close()


async def test_a_long_group_send_keeps_its_place_as_its_claim_is_renewed(
        two_workers: TwoWorkers) -> None:
    """A send longer than the lease (slow replies, each within its timeout): the claim's
    renewal renews the place it holds in the member's window, or the other processes
    would take it while the send is still under way."""
    a, b = two_workers
    now = time.time()
    await a.enqueue(new_message(now, "group"))
    await b.enqueue(new_message(now, "member"))
    (slow,) = await a.claim_due("group", now, 10, lease_s=60)
    one = ((300.0, 1),)
    assert await a.hold_send(slow.id, "member", now, now + 60, one)
    assert await a.renew([slow.id], now + 160) == 1
    assert await b.claim_due("member", now + 100, 10, lease_s=60, windows=one) == []
    assert len(await b.claim_due("member", now + 170, 10, lease_s=60, windows=one)) == 1


async def test_a_splits_next_transaction_fits_when_the_window_has_room(
        make_store: MakeStore) -> None:
    """window_open: the send's own claim counts as the transaction in flight; the ones
    it ended are in the sends; normal mail keeps out of the share for high."""
    store = make_store(lock=False, owner="worker-a")
    await store.open()
    try:
        now = time.time()
        await store.enqueue(new_message(now, "member"))
        (own,) = await store.claim_due("member", now, 10, lease_s=60)
        three = ((60.0, 3),)
        assert await store.window_open("member", now, three)  # 0 sent + itself: fits
        await store.record_recipients(own.id, own.recipients, sent=("member", now))
        assert await store.window_open("member", now, three)  # 1 sent + itself
        await store.record_recipients(own.id, own.recipients, sent=("member", now))
        assert await store.window_open("member", now, three, 0.4, high=True)  # 2 + itself
        assert not await store.window_open("member", now, three, 0.4)  # normal: 2 of 3
        await store.record_recipients(own.id, own.recipients, sent=("member", now))
        assert not await store.window_open("member", now, three, high=True)
        assert await store.window_open("member", now + 61, three)
    finally:
        await store.close()


def _two_account_group(tmp_path: Path, first: FakeUpstream, second: FakeUpstream,
                       **first_settings: Any) -> Path:
    path = write_config(tmp_path, first, **first_settings)
    data = yaml.safe_load(path.read_text())
    data["accounts"]["spare"] = upstream_account(second, tmp_path)
    data["routing"] = {"default_account": "mail",
                       "groups": {"mail": {"accounts": ["up", "spare"]}}}
    path.write_text(yaml.safe_dump(data))
    return path


async def test_a_members_rate_limit_holds_across_workers_sending_group_mail(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Two worker processes send a group's mail (first member `up`: 3 a second) and the
    member's own mail: measured at the upstream, never more than 3 in any second; the
    rest goes through the second member; each message exactly once."""
    upstream.delay("DATA", 0.3)  # sends in flight long enough to overlap across workers
    async with FakeUpstream() as second:
        config = _two_account_group(tmp_path, upstream, second,
                                    rate_limit={"per_second": 3})
        relay, _ = await _spawn(tmp_path, config)
        try:
            bodies = [message(f"g{i}") for i in range(24)]
            bodies += [message(f"own{i}", headers={"X-Account": "up"}) for i in range(6)]
            replies = await send_many(relay.port, bodies, sessions=16)
            ids = [text.split()[-1] for code, text in replies if code == 250]
            assert len(ids) == 30 and len({i[11:17] for i in ids}) == 2, "both received"
            await _delivered(upstream, second, 30)
            times = sorted(m.received_at for m in upstream.messages)
            busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
            assert busiest <= 3, times
            subjects = collections.Counter(
                line for m in [*upstream.messages, *second.messages]
                for line in m.data.decode().splitlines() if line.startswith("Subject:"))
            assert len(subjects) == 30 and set(subjects.values()) == {1}
            assert await relay.stop() == 0
        finally:
            await relay.kill()


def _mails(up: FakeUpstream) -> int:
    return sum(1 for _, verb in up.commands if verb == "MAIL")


async def _delivered(first: FakeUpstream, second: FakeUpstream, count: int) -> None:
    await wait_until(lambda: len(first.messages) + len(second.messages) >= count,
                     timeout=30, what=f"{count} messages delivered")


async def test_a_member_refusing_some_recipients_for_its_quota_hands_the_rest_on(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """Gmail's 5.4.5 for some recipients (it counts recipients in its quota): the first
    member delivers the others, the rest go through the second member in the same
    attempt; a recipient refused for itself (5.1.1) stays refused, not retried
    elsewhere; the message is settled after one attempt, each recipient sent once."""
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        upstream.refuse_rcpt("c@example.com", 550, "5.4.5 Daily user sending quota exceeded")
        upstream.refuse_rcpt("d@example.com", 550, "5.4.5 Daily user sending quota exceeded")
        upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 No such user")
        rcpts = ["a@example.com", "b@example.com", "c@example.com", "d@example.com",
                 "gone@example.com"]
        assert (await send(app.smtp_port, message("mixed"), recipients=rcpts))[0] == 250
        await app.scheduler.run_until_idle()
        assert [sorted(m.rcpt_tos) for m in upstream.messages] == [
            ["a@example.com", "b@example.com"]]
        assert [sorted(m.rcpt_tos) for m in second.messages] == [
            ["c@example.com", "d@example.com"]]
        [queued] = await app.store.list_messages()
        states = {r.address: str(r.state) for r in queued.recipients}
        assert states == {"a@example.com": "delivered", "b@example.com": "delivered",
                          "c@example.com": "delivered", "d@example.com": "delivered",
                          "gone@example.com": "failed"}
        assert queued.attempts == 1
        assert app.scheduler.workers["first"].backed_off
        assert not app.scheduler.workers["mail"].backed_off
        # Each member's transaction counts once in its windows (for every process and
        # across a restart): the outcome counts the second's, the attempt the first's.
        assert len(await app.store.recent_sends("first", 0)) == 1
        assert len(await app.store.recent_sends("second", 0)) == 1


async def test_when_no_member_takes_the_rest_they_wait_and_the_others_are_not_resent(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        upstream.refuse_rcpt("c@example.com", 550, "5.4.5 Daily user sending quota exceeded")
        second.password = "changed-at-the-provider"  # the second: every login refused
        rcpts = ["a@example.com", "c@example.com"]
        assert (await send(app.smtp_port, message("half"), recipients=rcpts))[0] == 250
        await app.scheduler.run_until_idle()
        assert [m.rcpt_tos for m in upstream.messages] == [("a@example.com",)]
        assert second.messages == []
        [queued] = await app.store.list_messages()
        states = {r.address: str(r.state) for r in queued.recipients}
        assert states == {"a@example.com": "delivered", "c@example.com": "pending"}
        assert str(queued.state) == "deferred"
        assert len(await app.store.recent_sends("first", 0)) == 1
        assert len(await app.store.recent_sends("second", 0)) == 1


async def test_a_members_backoff_and_its_one_probe_hold_for_every_worker(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """The first member's quota runs out (5.4.5 at MAIL) in one worker: no worker sends
    group mail through it while it backs off, and once the backoff ends one send probes
    it for the host (not one per worker) while the others go through the second."""
    async with FakeUpstream() as second:
        config = _two_account_group(tmp_path, upstream, second)
        data = yaml.safe_load(config.read_text())
        data["retry"] = {"initial_delay": "3s", "max_delay": "3s", "max_age": "60s",
                         "jitter": 0}
        config.write_text(yaml.safe_dump(data))
        relay, _ = await _spawn(tmp_path, config)
        try:
            # Both workers log in to the first member and keep their connections open.
            replies = await send_many(relay.port, [message(f"before {i}") for i in range(16)],
                                      sessions=16)
            assert len({text.split()[-1][11:17] for _, text in replies}) == 2
            await upstream.wait_for_messages(16)
            upstream.fail_mail(550, "5.4.5 Daily user sending quota exceeded")
            assert (await send(relay.port, message("trip")))[0] == 250
            await _delivered(upstream, second, 17)
            # The backoff is shared as it is written (in the background) and read (a
            # view at most 0.1 s old): a send in between may still try the member.
            await asyncio.sleep(0.5)
            tried = _mails(upstream)
            replies = await send_many(relay.port, [message(f"during {i}") for i in range(16)],
                                      sessions=16)
            ids = [text.split()[-1] for code, text in replies if code == 250]
            assert len(ids) == 16 and len({i[11:17] for i in ids}) == 2, "both received"
            await _delivered(upstream, second, 33)
            assert _mails(upstream) == tried, "sent through a backed-off member"
            upstream.faults.mail = None  # the quota is back
            await asyncio.sleep(3.5)  # the backoff ends
            upstream.delay("DATA", 1.0)  # the probe takes a while: the others must not pile on
            replies = await send_many(relay.port, [message(f"after {i}") for i in range(16)],
                                      sessions=16)
            assert len({text.split()[-1][11:17] for _, text in replies}) == 2
            await _delivered(upstream, second, 49)
            assert len(upstream.messages) == 17  # one probe for the host
            assert _mails(upstream) == tried + 1
            assert await relay.stop() == 0
        finally:
            await relay.kill()


async def test_a_members_split_transactions_keep_to_its_rate_limit(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """`452 4.5.3 too many recipients` splits a group's send through a member limited to
    one a second: the member's limit spaces the transactions, as for its own mail."""
    upstream.recipient_limit = 2
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(
            tmp_path, upstream, second, members={"first": {"rate_limit": {"per_second": 1}}}))
        rcpts = [f"r{i}@example.com" for i in range(4)]
        assert (await send(app.smtp_port, message("split"), recipients=rcpts))[0] == 250
        await app.scheduler.run_until_idle()
        assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == rcpts
        assert second.messages == []
        first, then = (m.received_at for m in upstream.messages)
        assert then - first >= 0.95


async def test_a_named_wait_holds_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    """`451 4.7.0 Try again in 4 seconds` to one worker: no worker sends through that
    account (its own mail or a group's) until the wait has passed; then it is used again."""
    async with FakeUpstream() as second:
        config = _two_account_group(tmp_path, upstream, second)
        relay, _ = await _spawn(tmp_path, config)
        try:
            upstream.fail_data(451, "4.7.0 Try again in 4 seconds", times=1)
            assert (await send(relay.port, message("told")))[0] == 250
            await _delivered(upstream, second, 1)  # through the second, in the same attempt
            told = time.monotonic()
            await asyncio.sleep(0.5)  # the wait is shared as it is written (background)
            tried = _mails(upstream)
            bodies = [message(f"g{i}") for i in range(8)]
            bodies += [message(f"own{i}", headers={"X-Account": "up"}) for i in range(8)]
            replies = await send_many(relay.port, bodies, sessions=16)
            assert len({text.split()[-1][11:17] for _, text in replies}) == 2, "both received"
            await _delivered(upstream, second, 9)  # the group's, through the second
            while time.monotonic() - told < 3.5:
                assert _mails(upstream) == tried, "sent during the named wait"
                await asyncio.sleep(0.1)
            await _delivered(upstream, second, 17)  # the account's own, after the wait
            assert len(upstream.messages) == 8
            assert await relay.stop() == 0
        finally:
            await relay.kill()


async def test_a_shutdown_mid_split_keeps_the_recipients_already_delivered(
        tmp_path: Path, start_relay: StartRelay) -> None:
    """A 452 split waiting for the account's next window when relay stops: the attempt is
    recorded as interrupted, but the recipients its first transactions delivered stay
    delivered (they were being made pending again, and resent after the restart)."""
    async with FakeUpstream(recipient_limit=2) as up:
        app = await start_relay(relay_config(
            tmp_path, {"up": upstream_account(up, tmp_path, rate_limit={"per_minute": 2})}))
        rcpts = [f"r{i}@example.com" for i in range(6)]
        assert (await send(app.smtp_port, message("split"), recipients=rcpts))[0] == 250
        await up.wait_for_messages(2)  # two transactions; the third waits a minute
        await asyncio.sleep(0.3)
        await app.shutdown(grace=0.5)
        store = SQLiteStore(tmp_path / "queue.sqlite3")
        await store.open()
        try:
            [queued] = await store.list_messages()
        finally:
            await store.close()
        states = {r.address: str(r.state) for r in queued.recipients}
        assert states == {**{r: "delivered" for r in rcpts[:4]},
                          **{r: "pending" for r in rcpts[4:]}}


async def test_a_splits_later_transactions_keep_the_reserve_for_high(
        tmp_path: Path, start_relay: StartRelay) -> None:
    """per_minute 4 with half kept for high priority: a normal message split in four
    transactions sends two now, and the other two wait (they were all sent at once)."""
    async with FakeUpstream(recipient_limit=2) as up:
        app = await start_relay(relay_config(tmp_path, {"up": upstream_account(
            up, tmp_path, rate_limit={"per_minute": 4, "reserve_for_high": "50%"})}))
        rcpts = [f"r{i}@example.com" for i in range(8)]
        assert (await send(app.smtp_port, message("normal"), recipients=rcpts))[0] == 250
        await up.wait_for_messages(2)
        await asyncio.sleep(1.0)
        assert len(up.messages) == 2


async def test_a_splits_later_transactions_keep_the_window_across_workers(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """per_minute 3, two recipients per transaction, two workers, two sends of the
    account this minute by another process: a group's six-recipient message takes the
    last place with its first transaction, and its later ones do not pass the window
    (they were counted only in this process's own limiter): they go through the second
    member."""
    upstream.recipient_limit = 2
    async with FakeUpstream() as second:
        config = _two_account_group(tmp_path, upstream, second,
                                    rate_limit={"per_minute": 3})
        relay, _ = await _spawn(tmp_path, config)
        try:
            # Two sends of the account in this minute, by another process (as another
            # worker or relay records them): one place is left.
            with sqlite3.connect(tmp_path / "queue.sqlite3") as db:
                db.executemany("INSERT INTO sends (account, at) VALUES ('up', ?)",
                               [(time.time(),), (time.time(),)])
            rcpts = [f"r{i}@example.com" for i in range(6)]
            assert (await send(relay.port, message("split"), recipients=rcpts))[0] == 250
            await upstream.wait_for_messages(1)
            await _delivered(upstream, second, 2)
            await asyncio.sleep(0.5)
            assert len(upstream.messages) == 1, "a later transaction passed the window"
            assert sorted(second.messages[0].rcpt_tos) == rcpts[2:]
            assert await relay.stop() == 0
        finally:
            await relay.kill()


async def test_a_split_at_its_members_limit_hands_the_rest_to_the_next_member(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """Two recipients a transaction and two transactions a minute at the first member:
    the third transaction's recipients go through the second member at once, in the same
    attempt, instead of waiting for the first member's next minute."""
    upstream.recipient_limit = 2
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(
            tmp_path, upstream, second, members={"first": {"rate_limit": {"per_minute": 2}}}))
        rcpts = [f"r{i}@example.com" for i in range(6)]
        assert (await send(app.smtp_port, message("split"), recipients=rcpts))[0] == 250
        await second.wait_for_messages(1, timeout=5)
        await app.scheduler.run_until_idle()
        assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == rcpts[:4]
        assert sorted(second.messages[0].rcpt_tos) == rcpts[4:]
        [queued] = await app.store.list_messages()
        assert (str(queued.state), queued.attempts) == ("delivered", 1)
        assert not app.scheduler.workers["first"].backed_off  # busy, not failing
        # Each transaction counted once: two at the first member, one at the second.
        assert len(await app.store.recent_sends("first", 0)) == 2
        assert len(await app.store.recent_sends("second", 0)) == 1


async def test_queue_flush_ends_a_named_wait(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """"Try again in 2 hours" holds the account (an hour at most), until an operator's
    `relay queue flush`: then it sends again (it stayed held for the hour)."""
    path = write_config(tmp_path, upstream)
    app = await start_relay(load_config(path))
    upstream.fail_data(451, "4.7.0 Try again in 2 hours", times=1)
    assert (await send(app.smtp_port, message("told")))[0] == 250
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.throttle.held(worker.mono()) > 0, what="the wait")
    assert (await send(app.smtp_port, message("held")))[0] == 250
    await asyncio.sleep(0.5)
    assert upstream.messages == []
    assert await asyncio.to_thread(main, ["queue", "flush", "-c", str(path)]) == 0
    await upstream.wait_for_messages(2, timeout=10)


async def test_one_process_shows_a_named_wait_as_the_workers_do(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`relay status` and relay_account_backoff during "try again in 2 hours" with one
    process: the wait and its end, as with several workers (it said "ok; slowed")."""
    path = write_config(tmp_path, upstream)
    app = await start_relay(load_config(path))
    upstream.reply_to("MAIL", 451, "4.7.0 Try again in 2 hours", times=10)
    assert (await send(app.smtp_port, message("told")))[0] == 250
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.throttle.held(worker.mono()) > 0, what="the wait")
    await app.refresh_gauges()
    assert metric(app, "relay_account_backoff", account="up") == 1
    want = "failing (1 in a row): 451 4.7.0 Try again in 2 hours; backing off until"
    for _ in range(50):  # the report is written in the background
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["status", "-c", str(path)]) == 0
        text = capsys.readouterr().out
        if want in text:
            break
        await asyncio.sleep(0.1)
    assert want in text


async def test_a_group_send_cut_off_by_shutdown_counts_as_its_members(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """The interrupted attempt names the member it was going through, so the send (which
    may have arrived) counts in that member's window after the restart."""
    upstream.delay("DATA", 5.0)
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        assert (await send(app.smtp_port, message("cut")))[0] == 250
        await wait_until(lambda: _mails(upstream) == 1, what="the send under way")
        await app.shutdown(grace=0.3)
        store = SQLiteStore(tmp_path / "queue.sqlite3")
        await store.open()
        try:
            assert len(await store.recent_sends("first", 0)) == 1
            assert await store.recent_sends("mail", 0) == []
        finally:
            await store.close()


async def test_a_hand_on_at_a_busy_member_leaves_its_reserve_for_high(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """per_minute 4, half kept for high: a normal group message's split takes the two
    normal places and hands the rest on; two high messages then go at once (the second
    waited a minute: the hand-on counted its last transaction twice in this process)."""
    upstream.recipient_limit = 2
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(
            tmp_path, upstream, second,
            members={"first": {"rate_limit": {"per_minute": 4, "reserve_for_high": "50%"}}}))
        rcpts = [f"r{i}@example.com" for i in range(8)]
        assert (await send(app.smtp_port, message("normal"), recipients=rcpts))[0] == 250
        await second.wait_for_messages(1, timeout=5)
        await app.scheduler.run_until_idle()
        assert len(upstream.messages) == 2
        for i in range(2):
            urgent = message(f"urgent{i}", headers={"X-Account": "first", "X-Priority": "1"})
            assert (await send(app.smtp_port, urgent))[0] == 250
        await upstream.wait_for_messages(4, timeout=5)


async def test_an_attempt_that_never_reached_the_upstream_is_not_counted(
        tmp_path: Path, start_relay: StartRelay) -> None:
    """Connection refused: the message is deferred, no attempt counted, and no send in
    the account's windows (it showed as used in `relay accounts quota` and held real
    mail back)."""
    async with FakeUpstream() as up:
        account = upstream_account(up, tmp_path, rate_limit={"per_minute": 5})
    # (the upstream is gone: its port refuses connections)
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    assert (await send(app.smtp_port, message("nowhere")))[0] == 250
    await wait_until(lambda: app.scheduler.workers["up"].backed_off, what="the backoff")
    await app.scheduler.run_until_idle()
    [queued] = await app.store.list_messages()
    assert (str(queued.state), queued.attempts) == ("deferred", 0)
    assert await app.store.recent_sends("up", 0) == []
