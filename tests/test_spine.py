"""The spine end to end: real SMTP in, a real SQLite queue, real SMTP (or a Maildir) out.

Every test talks to the relay over loopback SMTP, lets it deliver to a FakeUpstream
(an aiosmtpd server with AUTH) and checks what arrived, the queue record and the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest

from relay.app import App
from relay.config.loading import load_config
from relay.queue.types import MessageState, RecipientState
from tests.conftest import StartRelay, message, metric, relay_config, send, upstream_account
from tests.upstream import FakeUpstream, Received

Envelope = tuple[str, list[str], bytes]  # sender, recipients, message bytes


def awkward_body(marker: str) -> bytes:
    """A message whose bytes SMTP can easily damage: dots, 8-bit UTF-8, long and odd lines."""
    return (
        f"Subject: spine {marker}\r\n"
        "From: app@example.com\r\n"
        "To: to@example.com\r\n"
        f"Message-ID: <{marker}@example.com>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"marker={marker}\r\n"
        ".leading dot\r\n"
        "..two leading dots\r\n"
        ".\r\n"
        " .\r\n"
        "caf\u00e9 \u2713 \u65e5\u672c\u8a9e \U0001f4e8\r\n"
        "trailing spaces and a tab \t \r\n"
        "\r\n"
        + "x" * 900
        + "\r\n"
        "..\r\n"
    ).encode()


def queue_id(reply_text: str) -> str:
    """The ID out of '2.0.0 queued as ID'."""
    assert reply_text.startswith("2.0.0 queued as "), reply_text
    return reply_text.rsplit(" ", 1)[-1]


async def send_over_one_connection(port: int, envelopes: list[Envelope]) -> list[str]:
    """Send several messages in one SMTP session; return their queue ids."""
    ids = []
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    async with client:
        for sender, recipients, data in envelopes:
            errors, reply = await client.sendmail(sender, recipients, data)
            assert errors == {}
            ids.append(queue_id(reply))
    return ids


async def send_in_parallel(
    port: int, clients: int, per_client: int, envelope: Callable[[int, int], Envelope]
) -> list[str]:
    """``clients`` concurrent sessions, session c sending ``envelope(c, i)`` for each i."""
    batches = [[envelope(c, i) for i in range(per_client)] for c in range(clients)]
    results = await asyncio.gather(*(send_over_one_connection(port, b) for b in batches))
    return [qid for ids in results for qid in ids]


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll ``predicate`` (for states that no event reports) until true or ``timeout``."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def by_marker(received: list[Received]) -> dict[str, list[Received]]:
    """Received messages grouped by the marker in their Message-ID (see awkward_body)."""
    found: dict[str, list[Received]] = {}
    for msg in received:
        match = re.search(rb"^Message-ID: <([^@>]+)@example\.com>\r$", msg.data, re.MULTILINE)
        assert match, msg.data[:200]
        found.setdefault(match.group(1).decode(), []).append(msg)
    return found


# -- 1. correctness under concurrency


async def test_parallel_clients_deliver_every_message_byte_identical(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """200 messages from 20 concurrent sessions arrive once each, bytes and envelope intact."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    sent: dict[str, Envelope] = {}

    def envelope(c: int, i: int) -> Envelope:
        marker = f"par-{c}-{i}"
        env = (f"app{c}@example.com", [f"r{c}-{i}@example.com", f"cc{c}@example.org"],
               awkward_body(marker))
        sent[marker] = env
        return env

    ids = await send_in_parallel(app.smtp_port, 20, 10, envelope)
    assert len(ids) == len(set(ids)) == 200

    await upstream.wait_for_messages(200, timeout=30)
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 200
    found = by_marker(upstream.messages)
    assert set(found) == set(sent)
    for marker, (sender, recipients, data) in sent.items():
        [got] = found[marker]
        assert got.data == data, marker
        assert got.mail_from == sender
        assert got.rcpt_tos == tuple(recipients)
    assert await app.store.counts() == {("up", "delivered"): 200}
    assert metric(app, "relay_messages_received_total") == 200
    assert metric(app, "relay_messages_delivered_total", account="up") == 200


async def test_utf8_envelope_and_8bitmime_are_passed_upstream(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """An SMTPUTF8 sender and recipient and BODY=8BITMIME reach the upstream unchanged."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    sender, rcpt = "j\u00f6rg@b\u00fccher.example", "\u00e9l\u00e8ve@\u00e9cole.example"
    data = awkward_body("utf8-envelope")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=False,
                             timeout=30)
    async with client:
        errors, reply = await client.sendmail(
            sender, [rcpt], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
    assert errors == {}
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    [got] = upstream.messages
    assert (got.mail_from, got.rcpt_tos, got.data) == (sender, (rcpt,), data)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= {o.upper() for o in got.mail_options}
    record = await app.store.get(queue_id(reply))
    assert record is not None and record.state is MessageState.DELIVERED


# -- 2. connection reuse


async def test_pool_reuses_at_most_max_connections(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """300 messages through pool.max_connections=3 open no more than 3 upstream connections."""
    # max_messages_per_connection is raised so that only reuse is measured here (its
    # default, 100, would legitimately recycle a connection at 300 messages).
    account = upstream_account(
        upstream, tmp_path, pool={"max_connections": 3, "max_messages_per_connection": 1000}
    )
    app = await start_relay(relay_config(tmp_path, {"up": account}))

    await send_in_parallel(
        app.smtp_port, 10, 30, lambda c, i: ("app@example.com", ["to@example.com"],
                                             message(f"reuse {c}-{i}"))
    )
    await upstream.wait_for_messages(300, timeout=30)
    await app.scheduler.run_until_idle()

    assert 1 <= upstream.connections_opened <= 3
    assert len({m.connection_id for m in upstream.messages}) == upstream.connections_opened
    assert upstream.auth_successes == upstream.connections_opened
    assert (metric(app, "relay_upstream_connections_opened_total", account="up")
            == upstream.connections_opened)
    assert metric(app, "relay_messages_delivered_total", account="up") == 300


async def test_pool_recycles_connection_after_max_messages(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """max_messages_per_connection=10: 50 messages need about 5 connections, none carries >10."""
    pool = {"max_connections": 3, "max_messages_per_connection": 10}
    app = await start_relay(
        relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path, pool=pool)})
    )
    await send_in_parallel(
        app.smtp_port, 5, 10, lambda c, i: ("app@example.com", ["to@example.com"],
                                            message(f"recycle {c}-{i}"))
    )
    await upstream.wait_for_messages(50, timeout=30)
    await app.scheduler.run_until_idle()

    per_connection = Counter(m.connection_id for m in upstream.messages)
    assert max(per_connection.values()) <= 10
    assert 5 <= upstream.connections_opened <= 5 + 3
    assert (metric(app, "relay_upstream_connections_opened_total", account="up")
            == upstream.connections_opened)


async def test_pooled_connection_closed_by_server_is_replaced_transparently(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """An idle pooled connection the server dropped is replaced; no deferral is counted."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    await send(app.smtp_port, message("first"))
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    await upstream.wait_for_connections_open(1)

    upstream.close_idle_connections()
    await upstream.wait_for_connections_open(0)

    code, text = await send(app.smtp_port, message("second"))
    assert code == 250
    await upstream.wait_for_messages(2)
    await app.scheduler.run_until_idle()
    assert upstream.messages[1].data == message("second")
    assert upstream.connections_opened == 2
    assert metric(app, "relay_messages_deferred_total", account="up") == 0
    assert metric(app, "relay_messages_delivered_total", account="up") == 2
    record = await app.store.get(queue_id(text))
    assert record is not None and record.attempts == 1


async def test_pooled_connection_that_died_unnoticed_is_retried_on_a_fresh_one(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A reused connection that fails at its next command is replaced; no deferral counted."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    await send(app.smtp_port, message("first"))
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()

    upstream.drop_connection_after("MAIL")  # the pooled connection dies on reuse
    code, text = await send(app.smtp_port, message("second"))
    assert code == 250
    await upstream.wait_for_messages(2)
    await app.scheduler.run_until_idle()
    assert [m.data for m in upstream.messages] == [message("first"), message("second")]
    assert upstream.connections_opened == 2
    assert metric(app, "relay_messages_deferred_total", account="up") == 0
    record = await app.store.get(queue_id(text))
    assert record is not None
    assert record.state is MessageState.DELIVERED and record.attempts == 1


async def test_reply_250_means_committed_to_the_queue_file(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """When the client reads 250, another connection to the queue file already sees the row."""
    upstream.fail_data(451, "4.3.0 try later", times=1000)  # keep it in the queue
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    body = awkward_body("committed")
    code, text = await send(app.smtp_port, body, recipients=["a@example.com", "b@example.com"])
    assert code == 250

    def read_row() -> tuple[object, ...] | None:
        with contextlib.closing(sqlite3.connect(config.queue.path)) as db:
            return db.execute(
                "SELECT m.sender, m.recipients, m.account, b.data FROM messages m"
                " JOIN bodies b ON b.id = m.id WHERE m.id = ?", (queue_id(text),)
            ).fetchone()

    row = await asyncio.to_thread(read_row)
    assert row is not None
    sender, recipients, account, data = row
    assert (sender, account, data) == ("app@example.com", "up", body)
    assert "a@example.com" in str(recipients) and "b@example.com" in str(recipients)


# -- 3. routing by X-Account


async def test_x_account_routes_and_is_stripped(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """X-Account: b goes to b only, minus that header; no header goes to the default (a)."""
    async with FakeUpstream() as other:
        app = await start_relay(relay_config(tmp_path, {
            "a": upstream_account(upstream, tmp_path),
            "b": upstream_account(other, tmp_path),
        }))
        head = b"Subject: routed\r\nFrom: app@example.com\r\n"
        tail = b"To: to@example.com\r\n\r\nbody for b\r\n.dot line\r\n"
        code, _ = await send(app.smtp_port, head + b"X-Account: b\r\n" + tail)
        assert code == 250
        code, _ = await send(app.smtp_port, message("default"))
        assert code == 250

        # Header names are case-insensitive and may be folded; the whole field goes.
        code, _ = await send(app.smtp_port, head + b"x-account:\r\n  b\r\n" + tail)
        assert code == 250
        # Only the header section routes: the same text in the body is just text.
        in_body = message("in body", body="X-Account: b\r\n")
        code, _ = await send(app.smtp_port, in_body)
        assert code == 250

        await other.wait_for_messages(2)
        await upstream.wait_for_messages(2)
        await app.scheduler.run_until_idle()
        assert [m.data for m in other.messages] == [head + tail, head + tail]
        assert sorted(m.data for m in upstream.messages) == sorted([message("default"), in_body])
        assert metric(app, "relay_messages_delivered_total", account="b") == 2
        assert metric(app, "relay_messages_delivered_total", account="a") == 2


async def test_without_control_headers_the_message_goes_byte_for_byte(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """No control header: the bytes go upstream exactly as sent (fields that only look
    like one, folds, tabs, trailing spaces, the names in the body); with X-Account and
    Deferred-Delivery both, only those fields (and their folded lines) are gone."""
    app = await start_relay(relay_config(tmp_path, {"a": upstream_account(upstream, tmp_path)}))
    plain = (b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc \r\nX-Account-Id: 7\r\n"
             b"X-Priority: 1\r\nX-Accounts : a\r\nSubject:  two  spaces\t\r\n"
             b"From: app@example.com\r\nTo: to@example.com\r\n\r\n"
             b"X-Account: a\r\nDeferred-Delivery: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
    assert (await send(app.smtp_port, plain))[0] == 250
    head = b"Subject: s\r\nFrom: app@example.com\r\n"
    tail = b"To: to@example.com\r\n\r\nbody\r\n"
    controlled = (head + b"X-ACCOUNT: a\r\n" + b"Deferred-Delivery: Mon, 1 Jan 2024\r\n"
                  b" 00:00:00 +0000\r\n" + tail)
    assert (await send(app.smtp_port, controlled))[0] == 250
    await upstream.wait_for_messages(2)
    assert sorted(m.data for m in upstream.messages) == sorted([plain, head + tail])


async def test_unknown_x_account_is_refused_and_nothing_queued(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """An unknown X-Account gets a 5xx naming the header; nothing is queued or delivered."""
    app = await start_relay(relay_config(tmp_path, {"a": upstream_account(upstream, tmp_path)}))
    code, text = await send(app.smtp_port, message("lost", headers={"X-Account": "nope"}))
    assert 500 <= code < 600
    assert "X-Account" in text and "nope" in text
    await app.scheduler.run_until_idle()
    assert await app.store.counts() == {}
    assert upstream.messages == [] and upstream.connections_opened == 0
    assert metric(app, "relay_messages_rejected_total", reason="unknown_account") == 1
    assert metric(app, "relay_messages_received_total") == 0


# -- 4. the Maildir default


async def test_maildir_account_writes_one_file_per_message(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """A maildir account delivers into new/: Return-Path line, then the body with LF endings."""
    outbox = tmp_path / "outbox"
    app = await start_relay(
        relay_config(tmp_path, {"outbox": {"transport": "maildir", "path": str(outbox)}})
    )
    bodies = {f"md-{i}": awkward_body(f"md-{i}") for i in range(3)}
    for marker, body in bodies.items():
        code, _ = await send(app.smtp_port, body, sender=f"{marker}@example.com")
        assert code == 250
    await app.scheduler.run_until_idle()

    files = sorted((outbox / "new").iterdir())
    assert len(files) == 3
    assert list((outbox / "tmp").iterdir()) == []
    contents = {f.read_bytes() for f in files}
    expected = {
        f"Return-Path: <{marker}@example.com>\n".encode() + body.replace(b"\r\n", b"\n")
        for marker, body in bodies.items()
    }
    assert contents == expected
    assert metric(app, "relay_messages_delivered_total", account="outbox") == 3


def test_load_config_none_is_the_builtin_defaults() -> None:
    """With no file, relay listens on 127.0.0.1:2525 and delivers into relay-data/outbox."""
    config = load_config(None)
    assert list(config.accounts) == ["outbox"]
    outbox = config.accounts["outbox"]
    assert outbox.transport == "maildir" and outbox.path == Path("relay-data/outbox")
    assert config.routing.default_account == "outbox"
    assert config.queue.path == Path("relay-data/queue.sqlite3")
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 2525)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9025)


# -- 5-7. retries and failures


async def test_temporary_failures_are_retried_until_delivered(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Two 451 replies to DATA, then success: delivered on attempt 3, both 451s logged."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.fail_data(451, "4.3.0 try later", times=2)
    code, text = await send(app.smtp_port, message("retry me"))
    assert code == 250

    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    assert [m.data for m in upstream.messages] == [message("retry me")]
    assert [verb for _, verb in upstream.commands].count("DATA") == 3
    assert metric(app, "relay_messages_deferred_total", account="up") == 2
    assert metric(app, "relay_messages_delivered_total", account="up") == 1

    record = await app.store.get(queue_id(text))
    assert record is not None
    assert record.state is MessageState.DELIVERED and record.attempts == 3
    log = record.attempts_log
    assert [a["outcome"] for a in log] == ["deferred", "deferred", "delivered"]
    assert all("451 4.3.0 try later" in str(a["reply"]) for a in log[:2])
    assert str(log[2]["reply"]).startswith("250")


async def test_permanent_failure_is_attempted_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A 550 to DATA fails the message after exactly one attempt; the reply is kept."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.fail_data(550, "5.1.1 no such user", times=5)  # a retry would hit this again
    code, text = await send(app.smtp_port, message("doomed"))
    assert code == 250
    await app.scheduler.run_until_idle()

    assert [verb for _, verb in upstream.commands].count("DATA") == 1
    assert upstream.messages == []
    record = await app.store.get(queue_id(text))
    assert record is not None
    assert record.state is MessageState.FAILED and record.attempts == 1
    assert "550" in record.last_error and "no such user" in record.last_error
    assert metric(app, "relay_messages_failed_total", account="up") == 1
    assert metric(app, "relay_messages_deferred_total", account="up") == 0
    assert metric(app, "relay_messages_delivered_total", account="up") == 0


async def test_each_recipient_gets_its_own_outcome(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """550 fails one recipient, 451 retries only that one, the accepted one is sent once."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    upstream.refuse_rcpt("busy@example.com", 451, "4.2.0 mailbox busy", times=1)
    rcpts = ["ok@example.com", "gone@example.com", "busy@example.com"]
    code, text = await send(app.smtp_port, message("three"), recipients=rcpts)
    assert code == 250

    await upstream.wait_for_messages(2)
    await app.scheduler.run_until_idle()
    assert [m.rcpt_tos for m in upstream.messages] == [
        ("ok@example.com",),
        ("busy@example.com",),
    ]
    assert all(m.data == message("three") for m in upstream.messages)
    # Three RCPTs in the first transaction, one (the pending recipient) in the second.
    assert [v for _, v in upstream.commands].count("RCPT") == 4, upstream.commands

    record = await app.store.get(queue_id(text))
    assert record is not None
    assert record.state is MessageState.DELIVERED and record.attempts == 2
    states = {r.address: r.state for r in record.recipients}
    assert states == {
        "ok@example.com": RecipientState.DELIVERED,
        "gone@example.com": RecipientState.FAILED,
        "busy@example.com": RecipientState.DELIVERED,
    }
    gone = next(r for r in record.recipients if r.address == "gone@example.com")
    assert "550" in gone.reply
    assert metric(app, "relay_messages_deferred_total", account="up") == 1
    assert metric(app, "relay_messages_delivered_total", account="up") == 1


# -- 9. restarts


async def test_queued_message_survives_restart_and_is_delivered_once_fault_clears(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A deferred message outlives shutdown; a new App on the same file delivers it later."""
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    upstream.fail_data(451, "4.3.0 try later", times=1000)
    first = await start_relay(config)
    code, text = await send(first.smtp_port, message("survivor"))
    assert code == 250
    await first.scheduler.run_until_idle()  # one attempt made, now deferred
    await first.shutdown()
    assert upstream.messages == []

    second = await start_relay(config)
    record = await second.store.get(queue_id(text))
    assert record is not None and record.state is MessageState.DEFERRED
    assert record.attempts >= 1

    upstream.clear_faults()
    await upstream.wait_for_messages(1)
    await second.scheduler.run_until_idle()
    assert [m.data for m in upstream.messages] == [message("survivor")]
    record = await second.store.get(queue_id(text))
    assert record is not None and record.state is MessageState.DELIVERED
    assert metric(second, "relay_messages_delivered_total", account="up") == 1


async def test_restart_with_healthy_upstream_delivers_what_was_queued(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Queued while the upstream refused connections (421 greeting); delivered after restart."""
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    upstream.greeting(421, "4.3.2 down for maintenance")
    first = await start_relay(config)
    code, text = await send(first.smtp_port, message("waited"))
    assert code == 250
    await eventually(lambda: metric(first, "relay_messages_deferred_total", account="up") >= 1,
                     "a deferred attempt")
    await first.shutdown()
    assert upstream.messages == []

    upstream.greeting(None)
    second = await start_relay(config)
    await upstream.wait_for_messages(1)
    await second.scheduler.run_until_idle()
    assert [m.data for m in upstream.messages] == [message("waited")]
    assert metric(second, "relay_messages_delivered_total", account="up") == 1
    record = await second.store.get(queue_id(text))
    assert record is not None and record.state is MessageState.DELIVERED


async def test_run_until_idle_returns_while_account_backs_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """run_until_idle returns when nothing is due, also while the account backs off as a whole."""
    upstream.greeting(421, "4.3.2 down for maintenance")  # an account-wide failure
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    code, text = await send(app.smtp_port, message("held back"))
    assert code == 250
    try:
        async with asyncio.timeout(5):  # retry.max_age is 30s: far beyond this
            await app.scheduler.run_until_idle()
    except TimeoutError:
        raise AssertionError("run_until_idle did not return during an account backoff") from None
    record = await app.store.get(queue_id(text))
    assert record is not None and record.state is MessageState.DEFERRED
    assert record.next_attempt_at > record.updated_at  # not due: waiting for the backoff


# -- 12. metrics and logs


async def test_metrics_and_health_endpoints(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """/metrics shows received and queue gauges from the queue file; /healthz says ok."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    await send(app.smtp_port, message("counted"))
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()

    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
    assert "relay_messages_received_total 1.0" in text
    assert 'relay_queue_messages{account="up",state="delivered"} 1.0' in text
    assert 'relay_messages_delivered_total{account="up"} 1.0' in text


async def test_logs_follow_a_message_by_queue_id_and_never_show_the_password(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """received/delivered lines carry the queue id; the upstream password is never logged."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="relay")
    password = "Pw-zebra-7f3c1-DoNotLog"
    async with FakeUpstream(password=password) as up:
        account = upstream_account(up, tmp_path)
        del account["password_file"]
        account["password"] = password  # literal: the riskiest source, warned about
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        up.fail_auth(True)  # an AUTH failure is logged too; it must not echo the secret
        code, text = await send(app.smtp_port, message("logged"))
        assert code == 250
        await eventually(lambda: up.auth_failures >= 1, "a refused AUTH")
        up.fail_auth(False)
        await up.wait_for_messages(1)
        await app.scheduler.run_until_idle()
        await app.shutdown()

    qid = queue_id(text)
    events = [(r.event, r.queue_id) for r in caplog.records if hasattr(r, "event")]
    assert ("received", qid) in events
    assert ("delivered", qid) in events
    assert ("account_auth_failed", None) in events
    for record in caplog.records:
        if getattr(record, "queue_id", None) == qid:
            assert record.getMessage().startswith(f"{qid}: ")

    auth_plain = base64.b64encode(f"\0user\0{password}".encode()).decode()
    for record in caplog.records:
        if record.name.startswith("mail.log"):  # aiosmtpd: the servers' own logs
            continue
        rendered = f"{record.getMessage()} {record.__dict__}"
        assert password not in rendered, record
        assert auth_plain not in rendered, record


async def test_app_refuses_a_queue_file_in_use(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A second App on the same queue file fails to start with a lock error."""
    from relay.errors import StoreLockedError

    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    await start_relay(config)
    second = App(config)
    try:
        await second.startup()
    except StoreLockedError as exc:
        assert "another relay" in str(exc)
    else:  # pragma: no cover - the bug path
        await second.shutdown()
        raise AssertionError("a second App started on a locked queue file")
