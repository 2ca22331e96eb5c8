"""Scheduling promises (issue 4), each proved against a real fault-injecting upstream."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import sqlite3
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from relay.queue.sqlite.schema import CLAIM_SQL
from relay.queue.types import MessageState
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    send_many,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream, Received


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_for_subject(up: FakeUpstream, subject: str, timeout: float = 10) -> Received:
    needle = f"Subject: {subject}\r\n".encode()
    deadline = time.monotonic() + timeout
    while True:
        for received in up.messages:
            if needle in received.data:
                return received
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{subject!r} never reached the upstream")
        await up.wait_for_messages(len(up.messages) + 1, timeout=left)


# -- 1. priority


@pytest.mark.usefixtures("each_store")
async def test_high_priority_overtakes_a_low_backlog(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """With 300 low messages waiting on a 10/s account, a high one arrives within 2 s."""
    account = upstream_account(upstream, tmp_path, rate_limit={"per_second": 10})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    lows = [message(f"low {i}", headers={"X-Priority": "5 (Lowest)"}) for i in range(300)]
    replies = await send_many(app.smtp_port, lows, sessions=10)
    assert all(code == 250 for code, _ in replies)
    submitted = time.monotonic()
    assert (await send(app.smtp_port, message("urgent", headers={"X-Priority": "1"})))[0] == 250
    urgent = await _wait_for_subject(upstream, "urgent", timeout=5)
    assert urgent.received_at - submitted < 2.0
    overtaken = [m for m in upstream.messages if submitted < m.received_at < urgent.received_at]
    # Only sends already started (at most one pool's worth) may arrive before it.
    assert len(overtaken) <= 5
    assert len(upstream.messages) < 100  # the low backlog is still waiting


async def test_fifo_within_a_priority(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 1})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    await app.shutdown(grace=1)  # queue first, deliver after a restart: one batch, in order
    config = relay_config(tmp_path, {"up": account})
    from relay.app import App

    stopped = App(config)
    await stopped.store.open()
    from relay.queue.types import NewMessage, Priority

    now = time.time()
    for i, prio in enumerate([Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.NORMAL,
                              Priority.HIGH, Priority.LOW]):
        await stopped.store.enqueue(NewMessage(
            id=f"M{i}", sender="a@x", recipients=("b@y",), account="up", priority=prio,
            body=message(f"m{i} {prio.name}"), created_at=now + i / 1000, not_before=now))
    await stopped.store.close()
    app = await start_relay(config)
    await upstream.wait_for_messages(6)
    order = [r.data.split(b"\r\n")[0].decode() for r in upstream.messages]
    assert order == ["Subject: m2 HIGH", "Subject: m4 HIGH", "Subject: m1 NORMAL",
                     "Subject: m3 NORMAL", "Subject: m0 LOW", "Subject: m5 LOW"]


# -- 2. rate limits


@pytest.mark.usefixtures("each_store")
async def test_rate_limit_holds_over_every_sliding_window(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path, rate_limit={"per_second": 5})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    await send_many(app.smtp_port, [message(f"r{i}") for i in range(16)], sessions=4)
    await upstream.wait_for_messages(16, timeout=10)
    arrivals = sorted(m.received_at for m in upstream.messages)
    for i, start in enumerate(arrivals):
        assert len([t for t in arrivals[i:] if t < start + 1.0]) <= 5
    assert arrivals[-1] - arrivals[0] >= 2.0  # 16 messages at 5/s need > 3 windows
    assert metric(app, "relay_rate_limited_total", account="up") >= 1
    assert metric(app, "relay_messages_failed_total", account="up") == 0


def _most_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    return max((len([t for t in times[i:] if t < start + 1.0])
                for i, start in enumerate(times)), default=0)


async def test_rate_limit_counts_split_and_retried_transactions(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """per_second: 2 holds at the upstream for every transaction: the further ones after
    '452 too many recipients' and the immediate retry after a plain 421 (was: 8 in 1 s)."""
    async with FakeUpstream(recipient_limit=2) as upstream:
        account = upstream_account(upstream, tmp_path, rate_limit={"per_second": 2})
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        rcpts = [f"r{k}@example.com" for k in range(6)]  # three transactions each
        await send_many(app.smtp_port, [message(f"s{i}") for i in range(2)], sessions=2,
                        recipients=rcpts)
        await upstream.wait_for_messages(6, timeout=10)
        assert _most_in_any_second(upstream.times_of("MAIL")) <= 2

        # A plain 421 at MAIL: the same message goes out at once on a fresh connection.
        upstream.reply_to("MAIL", 421, "4.7.0 Too many messages in this connection",
                          times=3, close=True)
        sent_before = len(upstream.times_of("MAIL"))
        await send_many(app.smtp_port, [message(f"e{i}") for i in range(3)], sessions=3)
        await upstream.wait_for_messages(9, timeout=10)
        assert len(upstream.times_of("MAIL")) - sent_before >= 6  # each one retried
        assert _most_in_any_second(upstream.times_of("MAIL")[sent_before:]) <= 2
        assert metric(app, "relay_messages_failed_total", account="up") == 0


@pytest.mark.usefixtures("each_store")
async def test_rate_limit_survives_a_restart(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """per_hour: 3 — three sent, restart, a fourth waits in the queue (no attempt, no error)."""
    account = upstream_account(upstream, tmp_path, rate_limit={"per_hour": 3})
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    await send_many(app.smtp_port, [message(f"h{i}") for i in range(3)], sessions=1)
    await upstream.wait_for_messages(3)
    await app.scheduler.run_until_idle()
    await app.shutdown(grace=1)

    app2 = await start_relay(config)
    code, text = await send(app2.smtp_port, message("fourth"))
    assert code == 250
    queue_id = text.split()[-1]
    await wait_until(lambda: metric(app2, "relay_rate_limited_total", account="up") >= 1,
                     what="a rate-limit hold")
    held = await app2.store.get(queue_id)
    assert held is not None and held.state is MessageState.QUEUED and held.attempts == 0
    assert len(upstream.messages) == 3


async def test_on_limit_reject_answers_451_471(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path,
                               rate_limit={"per_minute": 2, "on_limit": "reject"})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    replies = await send_many(app.smtp_port, [message(f"x{i}") for i in range(8)], sessions=1)
    rejected = [text for code, text in replies if code == 451]
    accepted = [text for code, text in replies if code == 250]
    assert rejected and all(text.startswith("4.7.1") for text in rejected)
    assert len(accepted) <= 2 + 2 + 1  # two sent, two waiting, one count refresh of slack
    await upstream.wait_for_messages(2)
    assert metric(app, "relay_messages_rejected_total", reason="rate_limited") == len(rejected)


# -- 3. isolation


async def test_a_slow_or_dead_account_never_delays_another(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as slow:
        slow.delay("DATA", 3.0)
        accounts = {
            "fast": upstream_account(upstream, tmp_path),
            "slow": upstream_account(slow, tmp_path, pool={"max_connections": 2}),
            "dead": {"host": "127.0.0.1", "port": _free_port(), "tls": "none"},
        }
        app = await start_relay(relay_config(tmp_path, accounts))
        flood = [message(f"s{i}", headers={"X-Account": "slow"}) for i in range(20)]
        flood += [message(f"d{i}", headers={"X-Account": "dead"}) for i in range(20)]
        await send_many(app.smtp_port, flood, sessions=4)
        started = time.monotonic()
        await send_many(app.smtp_port, [message(f"f{i}") for i in range(10)], sessions=2)
        await upstream.wait_for_messages(10, timeout=5)
        await wait_until(lambda: metric(app, "relay_messages_delivered_total",
                                        account="fast") == 10, what="fast deliveries")
        assert time.monotonic() - started < 2.5
        assert metric(app, "relay_messages_delivered_total", account="slow") == 0
        assert metric(app, "relay_messages_delivered_total", account="dead") == 0
        assert slow.connections_open <= 2


# -- 4. retry and account backoff


async def test_account_wide_failure_backs_off_with_one_probe(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """421 at greeting: the account backs off as a whole instead of trying every message."""
    upstream.greeting(421, "4.3.2 service not available")
    account = upstream_account(upstream, tmp_path,
                               retry={"initial_delay": "300ms", "max_delay": "5s",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    await send_many(app.smtp_port, [message(f"b{i}") for i in range(20)], sessions=2)
    await wait_until(lambda: upstream.connections_opened >= 3, what="three probes")
    # 20 messages, 5 connections allowed: without account backoff this would be 20+.
    # With it: up to the pool's 5 opened at once before the first 421 arrives, then one
    # probe per backoff step (0.3 s doubling); room for a loaded machine's late steps.
    await asyncio.sleep(0.5)
    assert upstream.connections_opened <= 9
    assert metric(app, "relay_messages_failed_total", account="up") == 0
    upstream.greeting(None)
    await app.store.request_flush(time.time())  # what `relay queue flush` does
    app.scheduler.workers["up"].resume()
    await upstream.wait_for_messages(20, timeout=10)
    await app.scheduler.run_until_idle()
    assert metric(app, "relay_messages_delivered_total", account="up") == 20


async def test_auth_failure_keeps_messages_queued_and_is_counted(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with FakeUpstream(password="hunter2-very-secret") as upstream:
        await _auth_failure_scenario(tmp_path, upstream, start_relay, caplog, monkeypatch)


async def _auth_failure_scenario(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.fail_auth(True)
    account = upstream_account(upstream, tmp_path, password_file=None,
                               password_env="RELAY_TEST_UPSTREAM_PW")
    monkeypatch.setenv("RELAY_TEST_UPSTREAM_PW", "hunter2-very-secret")
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    _, text = await send(app.smtp_port, message("auth"))
    queue_id = text.split()[-1]
    await wait_until(lambda: metric(app, "relay_upstream_auth_failures_total", account="up") >= 1,
                     what="an auth failure")
    row = await app.store.get(queue_id)
    assert row is not None and row.state in (MessageState.DEFERRED, MessageState.QUEUED)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "account_auth_failed" in r.getMessage()]
    assert errors and "535" in errors[0].getMessage()
    assert all("hunter2-very-secret" not in r.getMessage() for r in caplog.records)
    upstream.fail_auth(False)
    app.scheduler.workers["up"].resume()
    await upstream.wait_for_messages(1, timeout=10)


@pytest.mark.parametrize(
    ("fault", "extra"),
    [
        ("refused", {}),
        ("tls", {"tls": "implicit", "tls_verify": False}),
        ("dns", {"host": "no-such-host.invalid"}),
        ("timeout", {"timeouts": {"command": "300ms"}}),
        ("reset", {}),
    ],
)
@pytest.mark.usefixtures("each_store")
async def test_temporary_failures_are_retried_not_failed(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    fault: str, extra: dict[str, object],
) -> None:
    account = upstream_account(upstream, tmp_path, **extra)
    if fault == "refused":
        account["port"] = _free_port()
    if fault == "timeout":
        upstream.delay("MAIL", 2.0)
    if fault == "reset":
        upstream.drop_connection_after("DATA", times=1)
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    code, text = await send(app.smtp_port, message(fault))
    assert code == 250
    queue_id = text.split()[-1]
    await wait_until(lambda: metric(app, "relay_messages_deferred_total", account="up") >= 1,
                     what=f"a deferral after {fault}")
    row = await app.store.get(queue_id)
    assert row is not None and row.state is not MessageState.FAILED
    assert row.last_error
    if fault == "reset":  # the next attempt goes through
        await upstream.wait_for_messages(1)


# -- 5. scheduled sending


@pytest.mark.usefixtures("each_store")
async def test_deferred_delivery_header(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    later = time.time() + 2.5
    await send(app.smtp_port, message("later", headers={"Deferred-Delivery": formatdate(later)}))
    await send(app.smtp_port, message("past", headers={
        "Deferred-Delivery": "Mon, 01 Jan 2024 00:00:00 +0000"}))
    past = await _wait_for_subject(upstream, "past", timeout=3)
    assert b"Deferred-Delivery" not in past.data
    assert not any(b"Subject: later" in m.data for m in upstream.messages)
    got = await _wait_for_subject(upstream, "later", timeout=6)
    assert time.time() >= int(later) - 0.01  # RFC 5322 dates have whole seconds
    assert b"Deferred-Delivery" not in got.data
    code, text = await send(app.smtp_port, message("bad", headers={
        "Deferred-Delivery": "tomorrow-ish"}))
    assert code == 550 and "Deferred-Delivery" in text


# -- 6. bounces


@pytest.mark.usefixtures("each_store")
async def test_bounce_to_sender_on_permanent_failure_but_never_to_null_sender(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          bounces={"enabled": True})
    app = await start_relay(config)
    from tests.conftest import send as send_one

    await send_one(app.smtp_port, message("doomed"), recipients=["gone@example.com"])
    await send_one(app.smtp_port, message("no bounce"), sender="",
                   recipients=["gone@example.com"])
    await upstream.wait_for_messages(1, timeout=5)
    await app.scheduler.run_until_idle()
    bounces = [m for m in upstream.messages if m.mail_from in ("", "<>")]  # aiosmtpd: "<>"
    assert len(bounces) == 1
    dsn = bounces[0]
    assert dsn.rcpt_tos == ("app@example.com",)
    assert b"multipart/report" in dsn.data and b"report-type=\"delivery-status\"" in dsn.data
    assert b"Final-Recipient: rfc822; gone@example.com" in dsn.data
    assert b"Status: 5.1.1" in dsn.data and b"Subject: doomed" in dsn.data
    assert metric(app, "relay_messages_failed_total", account="up") == 2


async def test_bounce_goes_through_the_failed_messages_account_and_is_clean(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Issue 11.6: a non-ASCII recipient and a multi-line reply neither crash the DSN nor
    add a header to it; the bounce uses the account the message used, not the default."""
    async with FakeUpstream() as other:
        reply = "5.1.1 no such user\nX-Injected: yes\n5.1.1 see the help page"
        for address in ("gone@example.com", "jörg@exämple.com"):
            other.refuse_rcpt(address, 550, reply)
        config = relay_config(tmp_path, {"main": upstream_account(upstream, tmp_path),
                                         "other": upstream_account(other, tmp_path)},
                              bounces={"enabled": True})
        app = await start_relay(config)
        code, text = await send(app.smtp_port, message("doomed", headers={"X-Account": "other"}),
                                recipients=["gone@example.com", "jörg@exämple.com"],
                                mail_options=["SMTPUTF8"])
        assert code == 250, text
        await other.wait_for_messages(1, timeout=10)
        await app.scheduler.run_until_idle()
        assert upstream.messages == []  # nothing through the default account
        [dsn] = other.messages
        assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ("app@example.com",)
        report = email.message_from_bytes(dsn.data, policy=email.policy.SMTP)
        assert "X-Injected" not in report
        status = next(p for p in report.walk()
                      if p.get_content_type() == "message/delivery-status")
        blocks = status.get_payload()
        assert all("X-Injected" not in block for block in blocks)
        finals = [b["Final-Recipient"] for b in blocks[1:]]
        assert finals == ["rfc822; gone@example.com", "utf-8; j\\x{F6}rg@ex\\x{E4}mple.com"]
        diagnostic = " ".join(blocks[1]["Diagnostic-Code"].split())  # unfolded
        assert diagnostic == ("smtp; 550 5.1.1 no such user X-Injected: yes"
                              " 5.1.1 see the help page")
        assert all(line.isascii() for line in bytes(status).splitlines())


async def test_a_failed_bounce_bounces_no_further(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A bounce is from <>, so when it fails in turn nothing more is sent."""
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    upstream.refuse_rcpt("bad@example.com", 550, "5.1.1 no such sender")
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         bounces={"enabled": True}))
    await send(app.smtp_port, message("doomed"), sender="bad@example.com",
               recipients=["gone@example.com"])
    await wait_until(lambda: metric(app, "relay_messages_failed_total", account="up") == 2,
                     what="the message and its bounce failed")
    await app.scheduler.run_until_idle()
    rows = await app.store.list_messages()
    assert sorted((m.sender, m.state) for m in rows) == [("", "failed"),
                                                          ("bad@example.com", "failed")]


async def test_bounce_is_committed_with_the_failure_that_causes_it(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If the bounce cannot be written, neither is the failure: the message is not
    'failed' without its bounce, and once writes work both are committed together."""
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          bounces={"enabled": True})
    app = await start_relay(config)
    db = sqlite3.connect(config.queue.path)
    db.execute("CREATE TRIGGER no_bounces BEFORE INSERT ON messages WHEN NEW.sender=''"
               " BEGIN SELECT RAISE(ABORT, 'bounces cannot be written'); END")
    db.commit()
    _, text = await send(app.smtp_port, message("doomed"), recipients=["gone@example.com"])
    queue_id = text.split()[-1]
    await wait_until(lambda: "cannot record outcome" in caplog.text, what="a failed write")
    assert await app.store.state_of(queue_id) is MessageState.SENDING
    assert [m for m in await app.store.list_messages() if m.sender == ""] == []
    db.execute("DROP TRIGGER no_bounces")
    db.commit()
    db.close()
    await upstream.wait_for_messages(1, timeout=10)
    assert upstream.messages[0].rcpt_tos == ("app@example.com",)
    assert await app.store.state_of(queue_id) is MessageState.FAILED


# -- 8. scale


async def test_claim_is_an_indexed_query(tmp_path: Path) -> None:
    """Picking the next message uses the partial index, never a scan of the queue."""
    import sqlite3

    from relay.queue.sqlite.schema import SCHEMA

    db = sqlite3.connect(tmp_path / "plan.sqlite3")
    db.executescript(SCHEMA)
    plan = db.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL,
                      {"a": "x", "now": 0.0, "n": 5, "lease": 1.0, "owner": "w"}).fetchall()
    details = " | ".join(str(row[-1]) for row in plan)
    assert "messages_ready" in details
    assert "SCAN messages" not in details.replace("SCAN messages USING", "")
    db.close()


async def test_deleting_records_does_not_reset_rate_limits(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Purging delivered records must not let a restarted relay exceed a daily limit."""
    account = upstream_account(upstream, tmp_path, rate_limit={"per_day": 2})
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    await send_many(app.smtp_port, [message("d1"), message("d2")], sessions=1)
    await upstream.wait_for_messages(2)
    await app.scheduler.run_until_idle()
    # What `relay queue purge` / `delete` do to the records:
    await app.store.delete_messages(states=[str(s) for s in MessageState])
    await app.shutdown(grace=1)
    app2 = await start_relay(config)
    await send(app2.smtp_port, message("d3"))
    await wait_until(lambda: metric(app2, "relay_rate_limited_total", account="up") >= 1,
                     what="the third message held by the daily limit")
    assert len(upstream.messages) == 2
