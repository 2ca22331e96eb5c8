"""Listener, round two: what a hostile-client attack found (real listener over loopback,
real upstream, raw SMTP from the tests)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import Config, ListenAuthConfig
from relay.ingest.addresses import recipient_key
from relay.ingest.auth import hash_password
from relay.ingest.throttle import client_key
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    upstream_account,
    wait_until,
)
from tests.smtpclient import RawSMTP
from tests.test_hardening import _auth_plain, _relay, _session
from tests.upstream import FakeUpstream


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- 1. STARTTLS, then no handshake: the slot is released at the timeout --


async def test_starttls_without_handshake_releases_the_slot_at_the_timeout(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay, max_connections_per_client=2,
                       timeout="300ms", tls={"cert": str(cert), "key": str(key)})
    stuck = []
    for _ in range(2):
        client = await _session(app.smtp_port)
        assert (await client.cmd("STARTTLS")).startswith("220")
        stuck.append(client)
    assert metric(app, "relay_smtp_sessions_active") == 2
    for client in stuck:  # the server ends them at listen.timeout
        assert await client.closed(timeout=5)
    await wait_until(lambda: metric(app, "relay_smtp_sessions_active") == 0,
                     what="the stuck sessions slots released", timeout=3)
    assert app.limits.sessions == 0 and app.limits.per_client == {}
    fresh = await RawSMTP.connect(app.smtp_port)
    assert (await fresh.reply()).startswith("220 ")
    await fresh.close()


async def test_client_leaving_during_the_tls_handshake_releases_the_slot(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay,
                       tls={"cert": str(cert), "key": str(key)})
    for _ in range(3):
        client = await _session(app.smtp_port)
        assert (await client.cmd("STARTTLS")).startswith("220")
        await client.send_raw(b"\x16\x03\x01\x00")  # half a ClientHello, then gone
        await client.close()
    await wait_until(lambda: metric(app, "relay_smtp_sessions_active") == 0,
                     what="the slots released")
    assert app.limits.sessions == 0


# -- 2. half-close after QUIT: every committed message gets its 250 --


async def test_half_closed_client_gets_every_reply(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    replies = []
    for i in range(12):
        client = await _session(app.smtp_port)
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        client.writer.write(message(f"half {i}") + b".\r\nQUIT\r\n")
        if i % 3:
            await asyncio.sleep(0.001 * (i % 3))
        client.writer.write_eof()  # like `nc -N`: nothing more to send, still reading
        replies.append((await asyncio.wait_for(client.reader.read(), 10)).decode())
        await client.close()
    for reply in replies:
        assert "250 2.0.0 queued as" in reply and "221" in reply, reply
    await upstream.wait_for_messages(12)
    await wait_until(lambda: metric(app, "relay_smtp_sessions_active") == 0,
                     what="the sessions closed")


async def test_half_close_without_quit_ends_the_session_after_the_reply(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    client.writer.write(b"NOOP\r\nNOOP\r\n")
    client.writer.write_eof()
    answer = (await asyncio.wait_for(client.reader.read(), 10)).decode()
    assert answer.count("250") == 2
    await client.close()
    await wait_until(lambda: metric(app, "relay_smtp_sessions_active") == 0,
                     what="the session closed")


# -- 3. STARTTLS inside TLS --


async def test_starttls_inside_tls_is_503_and_the_session_goes_on(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay, max_bad_commands=2,
                       tls={"cert": str(cert), "key": str(key)})
    client = await _session(app.smtp_port)
    assert (await client.cmd("STARTTLS")).startswith("220")
    await client.writer.start_tls(_client_tls())
    assert "250" in await client.cmd("EHLO client.example")
    assert (await client.cmd("STARTTLS")).startswith("503 5.5.1")
    assert (await client.cmd("NOOP")).startswith("250")
    # counted as a bad command: the second one ends the session
    assert (await client.cmd("STARTTLS")).startswith("503 5.5.1")
    assert (await client.reply()).startswith("421 4.7.0")
    assert await client.closed()
    await wait_until(lambda: metric(app, "relay_smtp_sessions_active") == 0,
                     what="the session closed")
    assert not [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]


# -- 4. the idle timeout counts every read, not only commands --


async def test_slow_data_transfer_is_not_cut_at_the_idle_timeout(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, timeout="600ms")
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(b"Subject: slow\r\n\r\n")
    for i in range(7):  # 7 x 200 ms: over twice the timeout, never idle for long
        await asyncio.sleep(0.2)
        await client.send_raw(b"line %d\r\n" % i)
    await client.send_raw(b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    # and idle is still idle
    assert (await client.reply()).startswith("421 4.4.2")
    assert await client.closed()



# -- 5. AUTH lockout per (client, user); all of loopback is one client --


async def _session_from(port: int, local: str) -> RawSMTP:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    client = RawSMTP(reader, writer)
    assert (await client.reply()).startswith("220 ")
    assert "250" in await client.cmd("EHLO client.example")
    return client


def _two_users(tmp_path: Path, upstream: FakeUpstream, **auth: Any) -> Config:
    users = {"billing": {"password_hash": hash_password("right")},
             "alerts": {"password_hash": hash_password("right")}}
    return relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                        listen={"auth": {"users": users, **auth}, "max_bad_commands": 50})


async def test_one_users_failures_do_not_lock_out_the_other_local_apps(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(_two_users(tmp_path, upstream, max_failures=2))
    client = await _session(app.smtp_port)
    assert (await client.cmd(_auth_plain("billing", "wrong"))).startswith("535 5.7.8")
    assert (await client.cmd(_auth_plain("billing", "wrong"))).startswith("421 4.7.0")
    assert await client.closed()
    other = await _session(app.smtp_port)  # another app, same address: not locked
    assert (await other.cmd(_auth_plain("alerts", "right"))).startswith("235")
    await other.close()
    again = await _session_from(app.smtp_port, "127.0.0.9")  # another 127.x: same client
    assert (await again.cmd(_auth_plain("billing", "right"))).startswith("421 4.7.0")
    assert await again.closed()


async def test_rotating_loopback_addresses_shares_one_failure_budget(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(_two_users(tmp_path, upstream, max_failures=2,
                                       max_failures_per_client=3))
    for n, user in enumerate(["u1", "u2"], start=2):
        client = await _session_from(app.smtp_port, f"127.0.0.{n}")
        assert (await client.cmd(_auth_plain(user, "guess"))).startswith("535 5.7.8")
        await client.close()
    client = await _session_from(app.smtp_port, "127.0.0.4")
    assert (await client.cmd(_auth_plain("u3", "guess"))).startswith("421 4.7.0")
    assert await client.closed()
    client = await _session_from(app.smtp_port, "127.0.0.5")
    assert (await client.cmd(_auth_plain("alerts", "right"))).startswith("421 4.7.0")
    assert await client.closed()


async def test_rotating_loopback_addresses_shares_one_connection_limit(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_connections_per_client=2)
    first = await _session_from(app.smtp_port, "127.0.0.2")
    second = await _session_from(app.smtp_port, "127.0.0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port,
                                                   local_addr=("127.0.0.4", 0))
    third = RawSMTP(reader, writer)
    assert (await third.reply()).startswith("421 4.7.0 Too many connections from your")
    assert await third.closed()
    await first.close()
    await second.close()
    await wait_until(lambda: app.limits.per_client == {}, what="the table emptied")


def test_client_key_folds_loopback_and_mapped_addresses() -> None:
    assert client_key("127.0.0.1") == client_key("127.8.9.10") == client_key("::1")
    assert client_key("::ffff:127.0.0.2") == client_key("127.0.0.1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" == client_key("192.0.2.1")
    assert client_key(None) is None


def test_per_client_failure_budget_must_cover_the_per_user_one() -> None:
    with pytest.raises(ValueError, match="max_failures_per_client"):
        ListenAuthConfig(max_failures=10, max_failures_per_client=5)


# -- 6. equivalent recipients are one recipient --


def test_recipient_key_unquotes_and_uses_a_labels() -> None:
    assert recipient_key('"r"@example.com') == recipient_key("r@example.com")
    assert recipient_key('"r.s"@Example.COM') == recipient_key("r.s@example.com")
    assert recipient_key('"\\r"@example.com') == recipient_key("r@example.com")
    assert recipient_key("a@xn--tda.example") == recipient_key("a@Ü.example")
    # quotes that matter, and the local part's case, are kept
    assert recipient_key('"a b"@example.com') != recipient_key("ab@example.com")
    assert recipient_key("R@example.com") != recipient_key("r@example.com")


async def test_equivalent_recipients_are_delivered_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<a@example.com> SMTPUTF8")).startswith("250")
    for rcpt in ("r@example.com", '"r"@example.com', "a@xn--tda.example", "a@ü.example"):
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(message("once each") + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    await upstream.wait_for_messages(1)
    assert upstream.messages[0].rcpt_tos == ("r@example.com", "a@xn--tda.example")


# -- 7. address literals and <Postmaster> --


@pytest.mark.parametrize("strict", [True, False])
async def test_address_literals_and_postmaster_are_accepted(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, strict: bool
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, strict_addresses=strict)
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<a@[127.0.0.1]>")).startswith("250")
    for rcpt in ("<a@[IPv6:::1]>", "<Postmaster>", "<b@[127.0.0.1]>"):
        answer = await client.cmd(f"RCPT TO:{rcpt}")
        assert answer.startswith("250 2.1.5"), (rcpt, answer)
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(message("literal") + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    await upstream.wait_for_messages(1)
    assert upstream.messages[0].mail_from == "a@[127.0.0.1]"
    assert upstream.messages[0].rcpt_tos == ("a@[IPv6:::1]", "Postmaster", "b@[127.0.0.1]")


async def test_postmaster_without_domain_is_only_a_recipient(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<Postmaster>")).startswith("501 5.1.7")
    assert (await client.cmd("MAIL FROM:<a@[300.0.0.1]>")).startswith("501 5.1.7")
    await client.close()


# -- 8. relay's bad-command limit, not aiosmtpd's, and no log line per unknown command --


async def test_unknown_commands_meet_relays_limit_quietly(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mail.log")
    app = await _relay(tmp_path, upstream, start_relay, max_bad_commands=8)
    client = await _session(app.smtp_port)
    for _ in range(7):
        assert (await client.cmd("XYZZY")).startswith('500 5.5.2 command "XYZZY" not recognized')
    assert (await client.cmd("XYZZY")).startswith("500 5.5.2")
    assert (await client.reply()).startswith("421 4.7.0 Too many errors")
    assert await client.closed()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "mail.log"]
    other = await _session(app.smtp_port)
    help_text = await other.cmd("HELP XYZZY")
    assert help_text.startswith("501") and "XYZZY" not in help_text.partition(":")[2]
    await other.close()


# -- 9. a DATA line is at most 1000 octets, CRLF included --


async def test_data_line_of_1001_octets_is_refused(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    for length, answer in ((998, "250 2.0.0"), (999, "500 5.5.2 Line too long")):
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send_raw(b"Subject: long\r\n\r\n" + b"x" * length + b"\r\n.\r\n")
        assert (await client.reply()).startswith(answer), length
    await client.close()


# -- 10. VRFY and AUTH PLAIN = --


async def test_vrfy_is_252_and_not_a_bad_command(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_bad_commands=2)
    client = await _session(app.smtp_port)
    for arg in ("alice", "<a@example.com>", "Some User <u@example.com>"):
        assert (await client.cmd(f"VRFY {arg}")).startswith("252 2.1.5")
    assert (await client.cmd("NOOP")).startswith("250")
    await client.close()


async def test_auth_plain_with_an_empty_initial_response_is_not_bad_base64(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    users = {"app": {"password_hash": hash_password("right")}}
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path)},
        listen={"auth": {"users": users}}))
    client = await _session(app.smtp_port)
    answer = await client.cmd("AUTH PLAIN =")
    assert answer.startswith("501 5.5.2 Empty authentication response"), answer
    assert (await client.cmd(_auth_plain("app", "right"))).startswith("235")
    await client.close()


async def test_client_leaving_mid_commit_does_not_cut_the_commit(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    app = await _relay(tmp_path, upstream, start_relay)
    real_submit = app.handler.submit
    committing = asyncio.Event()

    async def slow_submit(*args: Any) -> Any:  # the real commit, after a slow disk's pause
        committing.set()
        await asyncio.sleep(0.3)
        return await real_submit(*args)

    app.handler.submit = slow_submit
    client = await _session(app.smtp_port)
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(message("leaving") + b".\r\n")
    await committing.wait()
    sock = client.writer.get_extra_info("socket")  # gone before the 250, with a reset
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()
    await upstream.wait_for_messages(1)  # stored, so delivered...
    await wait_until(lambda: any(getattr(r, "event", None) == "received"
                                 for r in caplog.records), what="...and logged as received")
    assert metric(app, "relay_smtp_sessions_active") == 0


async def test_half_close_right_after_a_pipelined_transaction(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """The end of input arrives while relay is still busy with an earlier command (a
    password check, in a worker thread): the commands after the data (QUIT) are still
    carried out."""
    app = await start_relay(_two_users(tmp_path, upstream))
    client = await _session(app.smtp_port)
    client.writer.write(_auth_plain("billing", "right").encode() + b"\r\n"
                        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                        + message("pipelined") + b".\r\nQUIT\r\n")
    client.writer.write_eof()
    answer = (await asyncio.wait_for(client.reader.read(), 10)).decode()
    await client.close()
    assert "250 2.0.0 queued as" in answer and answer.endswith("221 Bye\r\n"), answer
    await upstream.wait_for_messages(1)
