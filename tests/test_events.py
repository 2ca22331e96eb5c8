"""Delivery events (issue 16.4): one signed JSON POST per outcome to a real aiohttp
receiver, written to the queue's outbox with the outcome, retried with backoff, kept
across a restart, given up after max_age, sent once with several workers."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relay.app import App, WorkerRole
from relay.config.loading import parse_config
from relay.config.report import config_warnings, effective_config, unresolved_secrets
from relay.delivery.events import retry_at, retry_delay, signature
from relay.delivery.outcome import settle
from relay.delivery.retry import RetryPolicy
from relay.delivery.transport import SendResult
from relay.errors import ConfigError
from relay.queue.types import NewEvent, NewMessage, Priority, new_queue_id
from tests.conftest import (
    MakeStore,
    StartRelay,
    TwoWorkers,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
    webhook_block,
)
from tests.upstream import FakeUpstream
from tests.webhook import WebhookReceiver


def _config(tmp_path: Path, upstream: FakeUpstream, hook: WebhookReceiver,
            **extra: Any) -> Any:
    sections = {k: v for k, v in extra.items() if k != "webhook"}
    return relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                        events={"webhooks": [webhook_block(hook, tmp_path,
                                                           **extra.get("webhook", {}))]},
                        **sections)


async def _outbox(app: App) -> int:
    rows = await app.store._fetch("SELECT count(*) FROM events")  # type: ignore[attr-defined]
    return int(rows[0][0])


async def _outbox_empties(app: App) -> None:
    """The outbox row goes just after the receiver's answer: wait for it."""
    for _ in range(200):
        if await _outbox(app) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{await _outbox(app)} event(s) still in the outbox")


@pytest.mark.usefixtures("each_store")  # end to end on both stores
async def test_a_delivery_posts_one_signed_event_with_the_outcome(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay
) -> None:
    app = await start_relay(_config(tmp_path, upstream, webhook))
    body = message("hello", headers={"Message-ID": "<m1@app.example>"})
    code, _ = await send(app.smtp_port, body, recipients=["a@example.com", "b@example.com"])
    assert code == 250
    await webhook.wait_for(1)
    [sent] = webhook.events
    [queued] = await app.store.list_messages()
    assert sent["type"] == "delivered" and sent["queue_id"] == queued.id
    assert sent["message_id"] == "<m1@app.example>" and sent["account"] == "up"
    assert sent["sender"] == "app@example.com" and sent["attempt"] == 1
    assert [(r["address"], r["state"]) for r in sent["recipients"]] == [
        ("a@example.com", "delivered"), ("b@example.com", "delivered")]
    assert sent["reply"].startswith("250") and sent["recipients"][0]["reply"].startswith("250")
    assert len(sent["id"]) == 32 and sent["at"].endswith("Z")
    assert webhook.bad_signatures == 0 and webhook.posts == 1
    assert webhook.headers[0]["Content-Type"] == "application/json"
    await _outbox_empties(app)
    assert metric(app, "relay_webhook_deliveries_total", webhook="test", result="sent") == 1


async def test_deferred_failed_and_bounced_each_make_their_event(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay
) -> None:
    app = await start_relay(_config(tmp_path, upstream, webhook, bounces={"enabled": True},
                                    webhook={"events": ["deferred", "failed", "bounced"]}))
    upstream.fail_data(451, "4.3.0 try later")
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    assert (await send(app.smtp_port, message("later")))[0] == 250
    await webhook.wait_for(1)
    assert webhook.events[0]["type"] == "deferred"
    assert webhook.events[0]["reply"].startswith("451")
    assert "next_attempt_at" in webhook.events[0]
    assert (await send(app.smtp_port, message("gone"), recipients=["gone@example.com"]))[0] == 250
    await webhook.wait_for(3)
    kinds = sorted(e["type"] for e in webhook.events[1:])
    assert kinds == ["bounced", "failed"]
    failed = next(e for e in webhook.events if e["type"] == "failed")
    bounced = next(e for e in webhook.events if e["type"] == "bounced")
    assert failed["recipients"] == [{"address": "gone@example.com", "state": "failed",
                                     "reply": "550 5.1.1 no such user"}]
    assert bounced["queue_id"] == failed["queue_id"] and bounced["bounce_id"]
    assert failed["id"] != bounced["id"]
    await app.scheduler.run_until_idle()
    # The first message's delivery is not subscribed to: no event for it.
    assert all(e["type"] != "delivered" for e in webhook.events)


async def test_a_failing_receiver_is_retried_with_backoff_and_never_delays_delivery(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "relay.events")
    webhook.fail_next(3)
    app = await start_relay(_config(tmp_path, upstream, webhook))
    for n in range(2):
        assert (await send(app.smtp_port, message(f"m{n}")))[0] == 250
    await upstream.wait_for_messages(2)  # delivered while the receiver still fails
    await webhook.wait_for(2)
    assert webhook.posts == 5 and len({e["id"] for e in webhook.events}) == 2
    assert metric(app, "relay_webhook_deliveries_total", webhook="test", result="failed") == 3
    assert metric(app, "relay_webhook_deliveries_total", webhook="test", result="sent") == 2
    failures = [r.getMessage() for r in caplog.records if "webhook_failed" in r.getMessage()]
    assert len(failures) == 3 and all('reason="HTTP 500"' in f for f in failures)
    assert not any(webhook.url in r.getMessage() for r in caplog.records)
    await _outbox_empties(app)


async def test_an_event_survives_a_restart_and_is_sent_by_the_next_run(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver
) -> None:
    config = _config(tmp_path, upstream, webhook)
    webhook.fail_next(1000)
    app = App(config, registry=CollectorRegistry())
    await app.startup()
    try:
        assert (await send(app.smtp_port, message("kept"))) [0] == 250
        await upstream.wait_for_messages(1)
        await wait_until(lambda: webhook.posts >= 1, what="a first (failed) POST")
    finally:
        await app.shutdown(grace=2.0)
    assert webhook.events == []
    webhook.fail_next(0)
    again = App(config, registry=CollectorRegistry())
    await again.startup()
    try:
        await webhook.wait_for(1)
        assert webhook.events[0]["type"] == "delivered"
        await _outbox_empties(again)
        assert metric(again, "relay_webhook_deliveries_total", webhook="test",
                      result="sent") == 1
        await asyncio.sleep(0.3)
        assert len(webhook.events) == 1
    finally:
        await again.shutdown(grace=2.0)


async def test_an_event_not_accepted_within_max_age_is_given_up_logged_and_counted(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "relay.events")
    webhook.fail_next(1000, status=503)
    app = await start_relay(_config(tmp_path, upstream, webhook, webhook={"max_age": "400ms"}))
    assert (await send(app.smtp_port, message("lost cause")))[0] == 250
    await wait_until(lambda: metric(app, "relay_webhook_deliveries_total", webhook="test",
                                    result="gave_up") == 1, what="the give-up")
    await _outbox_empties(app)
    [line] = [r.getMessage() for r in caplog.records if "webhook_gave_up" in r.getMessage()]
    assert "webhook=test" in line and "HTTP 503" in line


async def test_with_two_workers_each_event_is_posted_once(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver
) -> None:
    """Both processes run a sender on one outbox; the claim (owner and lease) lets one
    POST each event."""
    config = _config(tmp_path, upstream, webhook)
    webhook.delay(0.05)
    apps = [App(config, registry=CollectorRegistry(),
                worker=WorkerRole(shared=True, delivers=i == 0, index=i, count=2))
            for i in range(2)]
    for app in apps:
        await app.startup()
    apps[1].webhooks.poll_s = 0.01  # the other process looks very often
    try:
        for n in range(20):
            assert (await send(apps[n % 2].smtp_port, message(f"w{n}")))[0] == 250
        await webhook.wait_for(20)
        await asyncio.sleep(0.3)
        assert webhook.posts == 20 and len({e["id"] for e in webhook.events}) == 20
        senders = [metric(a, "relay_webhook_deliveries_total", webhook="test", result="sent")
                   for a in apps]
        assert sum(senders) == 20
    finally:
        for app in apps:
            await app.shutdown(grace=2.0)


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://hooks.example.com/x",
     "events.webhooks.0.url: must be an http:// or https:// URL, not ftp scheme"),
    ("hooks.example.com/x", "events.webhooks.0.url: must be an http:// or https:// URL,"
                            " not no scheme"),
    ("https:///x", "events.webhooks.0.url: has no host"),
    ("https://hooks.example.com:70000/x",
     "events.webhooks.0.url: has a bad port: Port out of range 0-65535"),
])
def test_a_webhook_url_that_is_not_http_is_refused_naming_the_key(url: str, problem: str
                                                                  ) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"events": {"webhooks": [{"url": url, "secret_env": "HOME"}]}})
    assert caught.value.problems == [problem]


def test_plain_http_to_another_host_is_warned_and_credentials_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "k")
    config = parse_config({"events": {"webhooks": [
        {"url": "http://user:pw@hooks.example.com:8080/x", "secret_env": "HOOK_SECRET"},
        {"url": "http://127.0.0.1:9/x", "secret_env": "HOOK_SECRET"},
    ]}})
    assert config_warnings(config) == [
        "events.webhooks.0.url: plain http to hooks.example.com:8080; events (addresses,"
        " replies) cross the network unencrypted"]
    assert [h.label for h in config.events.webhooks] == ["hooks.example.com:8080",
                                                          "127.0.0.1:9"]


def test_a_webhook_needs_exactly_one_secret_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"events": {"webhooks": [{"url": "https://h.example/x"}]}})
    assert caught.value.problems == [
        "events.webhooks.0.secret_env: give exactly one of secret_env, secret_file (the key"
        " events are signed with)"]


def test_the_documented_verification_accepts_relays_signature_and_nothing_else() -> None:
    """docs/events.md's receiver example, run against relay's own signing."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()
    section = doc.split("### Verifying the signature", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/events.md", "exec"), namespace)  # our own docs
    verify = namespace["verify"]
    stamp, body = str(int(time.time())), '{"id":"e1","type":"delivered"}'
    good = signature("k3y", stamp, body)
    assert verify(b"k3y", body.encode(), stamp, good)
    assert not verify(b"other", body.encode(), stamp, good)
    assert not verify(b"k3y", body.encode() + b" ", stamp, good)
    old = str(int(time.time()) - 3600)
    assert not verify(b"k3y", body.encode(), old, signature("k3y", old, body))


def test_retries_back_off_exponentially_up_to_the_maximum() -> None:
    assert [retry_delay(n, 5.0, 60.0) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert retry_delay(10_000, 5.0, 600.0) == 600.0


def test_an_events_next_post_is_its_backoff_unless_that_is_past_max_age() -> None:
    """One rule for a failed POST and for a removed webhook's event: the next try is the
    backoff after this attempt, kept while it falls within max_age of the event's
    creation, given up (None) once it would fall after."""
    backoff = {"initial_s": 5.0, "max_s": 60.0, "max_age_s": 100.0}
    assert retry_at(1, 0.0, 10.0, **backoff) == 15.0
    assert retry_at(3, 0.0, 60.0, **backoff) == 80.0  # 5 * 2**2
    assert retry_at(1, 0.0, 95.0, **backoff) == 100.0  # exactly at max_age: kept
    assert retry_at(1, 0.0, 95.5, **backoff) is None
    assert retry_at(9, 0.0, 41.0, **backoff) is None  # at most 60 s apart, still past it


def test_check_config_names_an_unset_webhook_secret_and_shows_durations_as_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RELAY_TEST_HOOK_SECRET", raising=False)
    data = {"events": {"webhooks": [{"url": "https://hooks.example.com/x",
                                     "secret_env": "RELAY_TEST_HOOK_SECRET",
                                     "retry_max": "2m"}]}}
    config = parse_config(data, secrets=False)
    assert unresolved_secrets(config) == [
        "events.webhooks.0.secret_env: environment variable RELAY_TEST_HOOK_SECRET is not"
        " set here"]
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == [
        "events.webhooks.0.secret_env: environment variable RELAY_TEST_HOOK_SECRET is not set"]
    shown = effective_config(config)["events"]["webhooks"][0]
    assert (shown["timeout"], shown["retry_max"], shown["max_age"]) == ("10s", "2m", "1d")


async def test_events_are_written_only_with_the_outcome_and_claimed_by_one_owner(
    two_workers: TwoWorkers,
) -> None:
    """Store level (both stores), two owners on one queue: a stale owner's refused outcome writes
    no event; an outbox row claimed by one owner is not claimed by the other until its
    lease ends; settling is the holder's alone."""
    a, b = two_workers
    now = time.time()
    new = NewMessage(id=new_queue_id(), sender="s@example.com", recipients=("r@example.com",),
                     account="up", priority=Priority.NORMAL, body=b"x", created_at=now,
                     not_before=now)
    await a.enqueue(new)
    (by_a,) = await a.claim_due("up", now, 1, lease_s=1)
    assert await b.requeue_expired(now + 2) == 1
    (by_b,) = await b.claim_due("up", now + 2, 1, lease_s=30)
    policy = RetryPolicy(60, 600, 3600)
    sent = SendResult(accepted=["r@example.com"], reply="250 ok")
    late = settle(by_a, sent, now=now + 3, policy=policy, rng=random.Random(1))
    event = NewEvent("e1", "test", "delivered", "{}", now + 3)
    assert not await a.finish(late, events=[event])
    assert await a.next_event_at() is None  # refused outcome: no event
    done = settle(by_b, sent, now=now + 4, policy=policy, rng=random.Random(1))
    assert await b.finish(done, events=[NewEvent("e2", "test", "delivered", "{}", now + 4)])
    (held,) = await a.claim_events(now + 5, 10, lease_s=10)
    assert held.id == "e2" and held.claim.owner == "worker-a"
    assert await b.claim_events(now + 6, 10, lease_s=10) == []
    assert not await b.settle_event(held, retry_at=None)  # not b's to settle
    (taken,) = await b.claim_events(now + 16, 10, lease_s=10)  # a's lease ran out
    assert not await a.settle_event(held, retry_at=None)
    assert await b.settle_event(taken, retry_at=now + 30, error="HTTP 500")
    assert await a.next_event_at() == now + 30
    (again,) = await a.claim_events(now + 30, 10, lease_s=10)
    assert again.attempts == 1
    assert await a.settle_event(again, retry_at=None)
    assert await a.next_event_at() is None


async def test_two_owners_claiming_the_outbox_at_once_never_take_one_event_twice(
    make_store: MakeStore,
) -> None:
    """Concurrent claims (PostgreSQL: FOR UPDATE SKIP LOCKED on their own connections)
    split the outbox between owners, oldest first; every event is taken exactly once."""
    stores = [make_store(lock=False, owner=f"worker-{i}") for i in range(2)]
    for store in stores:
        await store.open()
    try:
        now = time.time()
        for n in range(30):
            new = NewMessage(id=new_queue_id(), sender="s@example.com",
                             recipients=("r@example.com",), account="up",
                             priority=Priority.NORMAL, body=b"x", created_at=now,
                             not_before=now)
            await stores[0].enqueue(new)
            claimed = await stores[0].claim_message("up", new.id, now, 30)
            assert claimed is not None
            done = settle(claimed, SendResult(accepted=["r@example.com"], reply="250 ok"),
                          now=now, policy=RetryPolicy(60, 600, 3600), rng=random.Random(1))
            assert await stores[0].finish(
                done, events=[NewEvent(f"e{n:02}", "test", "delivered", "{}", now + n)])
        taken: list[str] = []
        for _ in range(4):
            batches = await asyncio.gather(*(s.claim_events(now + 60, 5, lease_s=30)
                                             for s in stores for _ in range(2)))
            for batch in batches:
                assert [e.created_at for e in batch] == sorted(e.created_at for e in batch)
                taken += [e.id for e in batch]
        assert len(taken) == len(set(taken)) == 30
        assert await stores[1].claim_events(now + 60, 5, lease_s=30) == []
    finally:
        for store in stores:
            await store.close()


async def test_events_of_a_webhook_no_longer_configured_are_dropped_with_a_line(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restart with the webhook removed from the config: its waiting events go (logged),
    not kept in the queue file for ever."""
    caplog.set_level(logging.WARNING, "relay.events")
    webhook.fail_next(1000)
    app = App(_config(tmp_path, upstream, webhook), registry=CollectorRegistry())
    await app.startup()
    try:
        assert (await send(app.smtp_port, message("orphan")))[0] == 250
        await wait_until(lambda: webhook.posts >= 1, what="a first (failed) POST")
    finally:
        await app.shutdown(grace=2.0)
    bare = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    again = App(bare, registry=CollectorRegistry())
    await again.startup()
    try:
        await _outbox_empties(again)
        assert any("webhook_gave_up webhook=test" in r.getMessage()
                   and "no webhook of this name" in r.getMessage() for r in caplog.records)
        assert metric(again, "relay_webhook_deliveries_total", webhook="test",
                      result="gave_up") == 1  # counted, never a silent drop
    finally:
        await again.shutdown(grace=2.0)


async def test_a_hanging_webhook_delays_only_its_own_events(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay
) -> None:
    """Each event is POSTed on its own and more are claimed as POSTs end: a receiver that
    hangs (until its timeout) does not hold the other webhooks' events (a2 #7)."""
    async with WebhookReceiver(webhook.secret) as slow:
        slow.delay(5.0)
        hooks = [webhook_block(webhook, tmp_path),
                 webhook_block(slow, tmp_path, name="slow", timeout="10s")]
        app = await start_relay(relay_config(
            tmp_path, {"up": upstream_account(upstream, tmp_path)},
            events={"webhooks": hooks}))
        assert (await send(app.smtp_port, message("first")))[0] == 250
        await webhook.wait_for(1)
        assert (await send(app.smtp_port, message("second")))[0] == 250
        await webhook.wait_for(2, timeout=3.0)  # not after the slow POST's 5 s
        assert slow.posts >= 1 and slow.events == []  # still hanging meanwhile


async def test_a_webhook_a_reload_renamed_keeps_its_events_until_one_of_its_name_returns(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay,
) -> None:
    """a3 #3: fixing an unnamed webhook's URL changes its name (host:port); the events
    written for the old name wait (its backoff, its max_age) instead of being dropped, and
    go out when a webhook of that name is configured again."""
    webhook.fail_next(1000, status=503)
    app = await start_relay(_config(tmp_path, upstream, webhook))
    assert (await send(app.smtp_port, message("kept")))[0] == 250
    await wait_until(lambda: webhook.posts >= 1, what="a first (failed) POST")
    await app.reload(_config(tmp_path, upstream, webhook, webhook={"name": "renamed"}))
    await asyncio.sleep(0.6)  # several of the old webhook's retry delays
    assert await _outbox(app) == 1
    assert metric(app, "relay_webhook_deliveries_total", webhook="test", result="gave_up") == 0
    webhook.fail_next(0)
    await app.reload(_config(tmp_path, upstream, webhook))
    await webhook.wait_for(1)
    await _outbox_empties(app)
    assert webhook.events[0]["type"] == "delivered"


async def test_a_removed_webhooks_events_are_given_up_at_its_max_age_and_counted(
    tmp_path: Path, upstream: FakeUpstream, webhook: WebhookReceiver, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "relay.events")
    webhook.fail_next(1000, status=503)
    app = await start_relay(_config(tmp_path, upstream, webhook, webhook={"max_age": "1s"}))
    assert (await send(app.smtp_port, message("orphan")))[0] == 250
    await wait_until(lambda: webhook.posts >= 1, what="a first (failed) POST")
    await app.reload(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    await wait_until(lambda: metric(app, "relay_webhook_deliveries_total", webhook="test",
                                    result="gave_up") == 1, what="the counted give-up")
    await _outbox_empties(app)
    [line] = [r.getMessage() for r in caplog.records if "webhook_gave_up" in r.getMessage()]
    assert "none returned within max_age" in line
