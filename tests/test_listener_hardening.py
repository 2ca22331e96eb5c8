"""Listener hardening (issue 11 points 7-12, issue 19 point 2): real listener, real
upstream, raw SMTP from the tests."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from argon2 import PasswordHasher, extract_parameters

from relay.config.schema import Config, ListenAuthConfig, ListenUserConfig
from relay.ingest.auth import ListenerAuth, hash_password
from relay.ingest.throttle import FailureThrottle
from relay.smtp.headers import header_section_exceeds, parse_headers
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.smtpclient import RawSMTP
from tests.test_hardening import _auth_plain, _relay, _session
from tests.upstream import FakeUpstream

# -- 10. STARTTLS sessions are counted once --


async def test_starttls_sessions_do_not_leak_connection_slots(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay, max_connections=3,
                       tls={"cert": str(cert), "key": str(key)})
    for i in range(8):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=True,
                                 validate_certs=False)
        async with client:
            await client.sendmail("app@example.com", ["to@example.com"], message(f"tls {i}"))
    await asyncio.sleep(0.1)  # let the server see the last session end
    assert metric(app, "relay_smtp_sessions_active") == 0
    plain = await RawSMTP.connect(app.smtp_port)
    assert (await plain.reply()).startswith("220 ")
    await plain.close()
    assert metric(app, "relay_messages_rejected_total", reason="too_many_connections") == 0


# -- 12. concurrent sessions per client address --


async def test_sessions_per_client_address_are_limited(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_connections_per_client=2)
    first, second = await _session(app.smtp_port), await _session(app.smtp_port)
    third = await RawSMTP.connect(app.smtp_port)
    assert (await third.reply()).startswith("421 4.7.0 Too many connections from your address")
    assert await third.closed()
    assert metric(app, "relay_messages_rejected_total",
                  reason="too_many_client_connections") == 1
    assert metric(app, "relay_messages_rejected_total", reason="too_many_connections") == 0
    await first.close()
    await asyncio.sleep(0.1)
    assert (await send(app.smtp_port, message("room again")))[0] == 250
    await second.close()
    await asyncio.sleep(0.1)
    assert app.limits.per_client == {}  # nothing kept for clients that left


# -- 7. duplicate recipients --


async def test_duplicate_recipients_are_stored_and_delivered_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_recipients=2)
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    answers = [await client.cmd(f"RCPT TO:<{r}>") for r in (
        "x@Example.COM", "x@example.com", "X@example.com", "x@EXAMPLE.com")]
    # The repeats of x@example.com get 250, even with max_recipients already reached.
    assert [a[:9] for a in answers] == ["250 2.1.5"] * 4
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(message("twice") + b".\r\n")
    queued = await client.reply()
    assert queued.startswith("250 2.0.0 queued as")
    await client.close()
    row = await app.store.get(queued.split()[-1])
    assert row is not None
    assert [r.address for r in row.recipients] == ["x@Example.COM", "X@example.com"]
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    assert [m.rcpt_tos for m in upstream.messages] == [("x@Example.COM", "X@example.com")]


# -- 9. listener AUTH: off the loop, throttled per client, same cost for every failure --


def _auth_config(tmp_path: Path, upstream: FakeUpstream, **auth: Any) -> Config:
    users = {"app": {"password_hash": hash_password("right")}}
    return relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                        listen={"auth": {"users": users, **auth}, "max_bad_commands": 50})


async def test_password_verification_runs_in_a_worker_thread(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(_auth_config(tmp_path, upstream))
    threads: list[str] = []
    real_check = app.handler.auth.check

    def check(username: str, password: bytes) -> bool:  # the real check, and where it ran
        threads.append(threading.current_thread().name)
        return real_check(username, password)

    app.handler.auth.check = check  # type: ignore[method-assign]
    client = await _session(app.smtp_port)
    assert (await client.cmd(_auth_plain("app", "wrong"))).startswith("535 5.7.8")
    assert (await client.cmd(_auth_plain("nobody", "x"))).startswith("535 5.7.8")
    assert (await client.cmd(_auth_plain("app", "right"))).startswith("235")
    await client.close()
    assert len(threads) == 3
    assert all(name.startswith("relay-auth") for name in threads), threads


async def test_failed_logins_from_one_address_lock_it_out(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await start_relay(_auth_config(tmp_path, upstream, max_failures=3, lockout="1s"))
    first = await _session(app.smtp_port)
    for _ in range(2):
        assert (await first.cmd(_auth_plain("app", "wrong"))).startswith("535 5.7.8")
    assert (await first.cmd(_auth_plain("app", "wrong"))).startswith("421 4.7.0")
    assert await first.closed()
    # Locked: even the right password is not checked from this address for a while.
    second = await _session(app.smtp_port)
    assert (await second.cmd(_auth_plain("app", "right"))).startswith("421 4.7.0")
    assert await second.closed()
    assert metric(app, "relay_messages_rejected_total", reason="auth_locked") == 2
    assert any("auth_locked" in r.getMessage() for r in caplog.records)
    await asyncio.sleep(1.1)  # the lockout ends
    third = await _session(app.smtp_port)
    assert (await third.cmd(_auth_plain("app", "right"))).startswith("235")
    await third.close()


def test_unknown_users_cost_a_verification_with_the_users_parameters() -> None:
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    auth = ListenerAuth(ListenAuthConfig(users={
        "app": ListenUserConfig(password_hash=cheap.hash("right"))}))
    assert auth.decoy_parameters == extract_parameters(cheap.hash("x"))
    assert not auth.check("nobody", b"right") and not auth.check("app", b"wrong")
    assert auth.check("app", b"right")


def test_failure_throttle_window_and_lockout() -> None:
    throttle = FailureThrottle(limit=3, window=10.0, lockout=60.0)
    assert not throttle.failed("a", 0.0) and not throttle.failed("a", 1.0)
    assert not throttle.failed("a", 10.5)  # the first fell out of the window
    assert not throttle.locked("a", 10.5) and not throttle.failed("b", 10.5)
    assert throttle.failed("a", 10.9)  # three within ten seconds: 1.0, 10.5, 10.9
    assert throttle.locked("a", 70.8) and not throttle.locked("b", 10.9)
    assert not throttle.locked("a", 70.9)


# -- 11. over-long lines inside AUTH are bad commands, not internal errors --


async def test_overlong_auth_reply_is_a_counted_bad_command(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen={"auth": {"users": {"app": {"password_hash": hash_password(
                              "right")}}}, "max_bad_commands": 3})
    app = await start_relay(config)
    client = await _session(app.smtp_port)
    for _ in range(3):
        assert (await client.cmd("AUTH LOGIN")).startswith("334 ")
        answer = await client.cmd(b"A" * 3000)
        assert answer.startswith("500 5.5.6"), answer
    assert (await client.reply()).startswith("421 4.7.0 Too many errors")
    assert await client.closed()
    assert metric(app, "relay_messages_rejected_total", reason="internal_error") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # An over-long line after the user name, and then a good login, in a new session.
    client = await _session(app.smtp_port)
    await client.cmd("AUTH LOGIN")
    assert (await client.cmd(base64.b64encode(b"app"))).startswith("334 ")
    assert (await client.cmd(b"B" * 70_000)).startswith("500 5.5.6")
    assert (await client.cmd(_auth_plain("app", "right"))).startswith("235")
    await client.close()


async def test_failed_tls_handshake_is_the_clients_problem(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay, max_connections=2,
                       tls={"cert": str(cert), "key": str(key)})
    for _ in range(3):
        client = await _session(app.smtp_port)
        assert (await client.cmd("STARTTLS")).startswith("220")
        await client.send_raw(b"this is not a TLS ClientHello\r\n" * 20)
        assert await client.closed()
    await asyncio.sleep(0.1)
    assert metric(app, "relay_smtp_sessions_active") == 0
    assert metric(app, "relay_messages_rejected_total", reason="internal_error") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await send(app.smtp_port, message("after")))[0] == 250


# -- issue 19.2: RFC 5321 path syntax --

MALFORMED_PATHS = ["<a b@example.com>", "<x@example.com", "<foo@>", "<@@>", "a@example.com",
                   "<a@example.com>junk", "<a..b@example.com>", "<a@-example.com>",
                   "<a@[999.1.1.1]>"]


async def test_malformed_paths_get_501_and_are_counted(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_bad_commands=100)
    client = await _session(app.smtp_port)
    for path in MALFORMED_PATHS:
        assert (await client.cmd(f"MAIL FROM:{path}")).startswith("501 5.1.7"), path
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    for path in MALFORMED_PATHS:
        assert (await client.cmd(f"RCPT TO:{path}")).startswith("501 5.1.3"), path
    await client.close()
    assert metric(app, "relay_messages_rejected_total", reason="bad_address") == (
        2 * len(MALFORMED_PATHS))


async def test_well_formed_paths_of_every_kind_are_accepted(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<> SIZE=100")).startswith("250")
    for path in ['<"john smith"@example.com>', "<@relay.example,@b.example:u@example.com>",
                 "<o'brien+tag@sub-domain.example.com>"]:
        assert (await client.cmd(f"RCPT TO:{path}")).startswith("250"), path
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(message("kinds") + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    await upstream.wait_for_messages(1)
    assert upstream.messages[0].rcpt_tos == (
        '"john smith"@example.com', "u@example.com", "o'brien+tag@sub-domain.example.com")


async def test_strict_addresses_off_takes_what_aiosmtpd_takes(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, strict_addresses=False)
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:a.@example.com")).startswith("250")  # no <>
    assert (await client.cmd("RCPT TO:<foo@>")).startswith("501 5.1.3")  # still counted
    await client.close()
    assert metric(app, "relay_messages_rejected_total", reason="bad_address") == 1


# -- 8. nothing per message blocks the loop: header section bounded, parsing linear --


def _folded(lines: int) -> bytes:
    return b"Subject: start\r\n" + b" x\r\n" * lines + b"From: a@example.com\r\n\r\nbody\r\n"


async def test_header_section_over_the_limit_is_refused_552_534(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_header_size=4096)
    code, text = await send(app.smtp_port, _folded(2000))  # 8 KB of one folded field
    assert code == 552 and text.startswith("5.3.4 Header section exceeds 4096 bytes")
    assert metric(app, "relay_messages_rejected_total", reason="header_too_big") == 1
    assert metric(app, "relay_messages_rejected_total", reason="too_big") == 0
    # A big body after a small header section is not a big header section, nor is a
    # message whose first line is not a header field at all.
    assert (await send(app.smtp_port, message(body=("y" * 900 + "\r\n") * 20)))[0] == 250
    assert (await send(app.smtp_port, b"no header here\r\n" + (b"z" * 900 + b"\r\n") * 10)
            )[0] == 250
    assert await app.store.counts() != {}


async def test_the_default_limit_refuses_a_field_folded_400000_times(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    code, text = await send(app.smtp_port, _folded(400_000))
    assert code == 552 and "102400 bytes" in text


def test_folded_fields_unfold_to_one_value() -> None:
    fields = parse_headers(_folded(50_000))
    assert fields[0] == ("Subject", "start" + " x" * 50_000)
    assert fields[1] == ("From", "a@example.com")


def test_header_section_size_ends_at_the_first_line_that_is_not_a_field() -> None:
    assert not header_section_exceeds(b"A: 1\r\n\r\n" + b"b" * 5000, 1024)
    assert header_section_exceeds(b"A: 1\r\n" + b" folded\r\n" * 200 + b"\r\n", 1024)
    assert not header_section_exceeds(b"A: 1\r\nnot a field\r\n" + b"b" * 5000, 1024)


async def test_event_loop_lag_is_exported(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    await asyncio.sleep(0.01)  # let the monitor start its first sleep
    time.sleep(0.6)  # noqa: ASYNC251 (holding the loop, as a slow parse would, is the point)
    await wait_until(lambda: metric(app, "relay_event_loop_lag_seconds_count") >= 1,
                     what="a lag sample")
    assert metric(app, "relay_event_loop_lag_seconds_sum") >= 0.1
