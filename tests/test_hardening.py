"""Hardening (issue 5): bad input gets the right RFC 5321 reply, nothing smuggles through,
nobody unauthorised gets in."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config.loading import parse_config
from relay.errors import ConfigError
from relay.ingest.addresses import parse_path
from relay.ingest.auth import hash_password
from relay.ingest.listener import RelaySMTP
from relay.queue.types import NewMessage
from tests.conftest import StartRelay, message, metric, relay_config, send, upstream_account
from tests.smtpclient import RawSMTP
from tests.upstream import FakeUpstream


async def _relay(tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
                 **listen: Any) -> Any:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen=listen)
    return await start_relay(config)


async def _session(port: int) -> RawSMTP:
    client = await RawSMTP.connect(port)
    assert (await client.reply()).startswith("220 ")
    assert "250" in await client.cmd("EHLO client.example")
    return client


# -- 1. limits --


async def test_size_limits_answer_552_534(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_message_size=4096)
    client = await _session(app.smtp_port)
    ehlo = await client.cmd("EHLO again.example")
    assert "250-SIZE 4096" in ehlo and "ENHANCEDSTATUSCODES" in ehlo
    assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=5000")).startswith("552 5.3.4")
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send_raw(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 10 + b".\r\n")
    assert (await client.reply()).startswith("552 5.3.4")
    # The session goes on and a small message still goes through.
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    await client.close()
    assert metric(app, "relay_messages_rejected_total", reason="too_big") == 2
    assert await app.store.counts() == {}


async def test_too_many_recipients_452_453(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_recipients=3)
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    replies = [await client.cmd(f"RCPT TO:<r{i}@example.com>") for i in range(5)]
    assert [r[:3] for r in replies] == ["250", "250", "250", "452", "452"]
    assert replies[3].startswith("452 4.5.3")
    await client.close()


async def test_long_lines_get_5xx_and_the_server_carries_on(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    assert (await client.cmd(b"NOOP " + b"a" * 2000)).startswith("500 5.5.2")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.com>")
    await client.cmd("DATA")
    await client.send_raw(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
    assert (await client.reply()).startswith("500 5.5.2")
    assert (await client.cmd("NOOP")).startswith("250")
    await client.close()
    # And the next client is served normally.
    assert (await send(app.smtp_port, message("after")))[0] == 250


async def test_too_many_bad_commands_421_and_close(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_bad_commands=4)
    client = await _session(app.smtp_port)
    answers = [await client.cmd("BOGUS") for _ in range(3)]
    assert all(a.startswith("500 5.5.") for a in answers)
    last = await client.cmd("RCPT TO:<x@example.com>")  # out of order: 503, the 4th error
    assert last.startswith("503 5.5.1")
    assert (await client.reply()).startswith("421 4.7.0")
    assert await client.closed()


async def test_idle_client_gets_421_442(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, timeout="300ms")
    client = await _session(app.smtp_port)
    assert (await client.reply(timeout=5)).startswith("421 4.4.2")
    assert await client.closed()


async def test_connection_limit_421_470(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, max_connections=2)
    first, second = await _session(app.smtp_port), await _session(app.smtp_port)
    third = await RawSMTP.connect(app.smtp_port)
    assert (await third.reply()).startswith("421 4.7.0")
    assert await third.closed()
    await first.close()
    await second.close()
    await asyncio.sleep(0.1)  # let the server see both sessions end
    assert (await send(app.smtp_port, message("room again")))[0] == 250


async def test_smtputf8_and_8bitmime_pass_through(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    body = "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nGrüße, café\r\n".encode()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=False)
    async with client:
        await client.sendmail("app@example.com", ["josé@exämple.com"], body,
                              mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    await upstream.wait_for_messages(1)
    got = upstream.messages[0]
    assert got.data == body and got.rcpt_tos == ("josé@exämple.com",)
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options


async def test_upstream_without_smtputf8_fails_with_a_clear_reason(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with FakeUpstream(smtputf8=False) as up:
        app = await start_relay(relay_config(tmp_path, {"up": upstream_account(up, tmp_path)}))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=False)
        async with client:
            _, reply = await client.sendmail("app@example.com", ["josé@example.com"],
                                             b"Subject: x\r\n\r\nx\r\n",
                                             mail_options=["SMTPUTF8"])
        queue_id = reply.split()[-1]
        await app.scheduler.run_until_idle()
        row = await app.store.get(queue_id)
        assert row is not None and str(row.state) == "failed"
        assert "SMTPUTF8" in row.last_error and up.messages == []


# -- 2. SMTP smuggling

SMUGGLING_ENDINGS = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r\n.\r"]


def _smuggle(ending: bytes) -> bytes:
    return (b"Subject: smuggle\r\n\r\nfirst" + ending + b"MAIL FROM:<evil@example.com>\r\n"
            b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: second\r\n\r\nspoofed\r\n"
            b".\r\n")


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
async def test_bare_newlines_are_rejected_and_never_split_a_message(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, ending: bytes
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.com>")
    await client.cmd("DATA")
    await client.send_raw(_smuggle(ending))
    first = await client.reply()
    assert first.startswith("550 5.5.2"), first
    # Whatever followed was message text, not commands: nothing else was answered as one.
    assert (await client.cmd("NOOP")).startswith("250")
    await client.close()
    await app.scheduler.run_until_idle()
    assert await app.store.counts() == {} and upstream.messages == []


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
async def test_normalize_mode_delivers_exactly_one_message(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, ending: bytes
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, bare_newlines="normalize")
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.com>")
    await client.cmd("DATA")
    await client.send_raw(_smuggle(ending))
    assert (await client.reply()).startswith("250 2.0.0 queued as")
    await client.close()
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    assert len(upstream.messages) == 1
    got = upstream.messages[0]
    assert got.rcpt_tos == ("b@example.com",) and got.mail_from == "a@example.com"
    assert b"MAIL FROM:<evil@example.com>" in got.data  # still inside the one message
    assert b"\r\n" in got.data and got.data.count(b"\n") == got.data.count(b"\r\n")


def test_aiosmtpd_is_a_fixed_version() -> None:
    """CVE-2024-27305 (smuggling) and CVE-2024-34083 are fixed in aiosmtpd 1.4.6."""
    parts = tuple(int(p) for p in version("aiosmtpd").split(".")[:3])
    assert parts >= (1, 4, 6)


# -- 3. cross-protocol and internal errors --


@pytest.mark.parametrize("verb", ["GET", "POST", "PUT", "CONNECT", "HEAD", "OPTIONS"])
async def test_http_request_line_closes_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, verb: str
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await RawSMTP.connect(app.smtp_port)
    assert (await client.reply()).startswith("220")
    await client.send_raw(f"{verb} / HTTP/1.1\r\nHost: 127.0.0.1:2525\r\n\r\n".encode())
    assert await client.closed()
    assert metric(app, "relay_messages_rejected_total", reason="cross_protocol") == 1


async def test_internal_error_answers_451_430_and_keeps_serving(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    real_submit = app.handler.submit

    async def broken(*_: Any) -> None:
        raise RuntimeError("injected fault")

    app.handler.submit = broken
    code, text = await send(app.smtp_port, message("boom"))
    assert code == 451 and text.startswith("4.3.0") and "RuntimeError" not in text
    app.handler.submit = real_submit
    assert (await send(app.smtp_port, message("fine")))[0] == 250


# -- 4. addresses --


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:<not an address>", "501"),
        ("MAIL FROM:", "501"),
        ("MAIL FROM:<a@example.com> SIZE=lots", "501"),
        ("MAIL FROM:<" + "l" * 65 + "@example.com>", "553"),
        ("MAIL FROM:<a@" + "d" * 250 + ".com>", "553"),
        ("MAIL FROM:<>", "250"),
    ],
)
async def test_sender_addresses(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, command: str, code: str
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    answer = await client.cmd(command)
    assert answer.startswith(code), answer
    if code != "250":
        assert answer[4:5] == "5" and answer[5] == "."  # an enhanced status code
    await client.close()


async def test_recipient_addresses(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<>")).startswith("553 5.1.3")
    assert (await client.cmd("RCPT TO:<" + "x" * 65 + "@example.com>")).startswith("553 5.1.3")
    assert (await client.cmd("RCPT TO:<ok@example.com>")).startswith("250")
    await client.close()


# -- 5. access --


async def test_clients_outside_allowed_networks_get_554_571(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await _relay(tmp_path, upstream, start_relay, allowed_networks=["10.0.0.0/8"])
    client = await RawSMTP.connect(app.smtp_port)
    assert (await client.reply()).startswith("554 5.7.1")
    assert await client.closed()


def test_non_loopback_without_auth_or_networks_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"listen": {"host": "0.0.0.0"}})
    assert info.value.problems[0].startswith("listen.host: 0.0.0.0 is not a loopback address")
    assert parse_config({"listen": {"host": "0.0.0.0", "allowed_networks": ["192.0.2.0/24"]}})


def _auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_listener_auth_and_per_user_accounts(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "correct-horse-battery-staple"
    users = {
        "billing": {"password_hash": hash_password(secret), "accounts": ["up"]},
        "marketing": {"password_hash": hash_password(secret + "2"), "accounts": ["other"]},
    }
    async with FakeUpstream() as other:
        accounts = {"up": upstream_account(upstream, tmp_path),
                    "other": upstream_account(other, tmp_path)}
        config = relay_config(tmp_path, accounts,
                              listen={"auth": {"required": True, "users": users}})
        app = await start_relay(config)
        client = await _session(app.smtp_port)
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("530 5.7.0")
        assert (await client.cmd(_auth_plain("billing", "wrong"))).startswith("535 5.7.8")
        assert (await client.cmd(_auth_plain("billing", secret))).startswith("235")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.com>")
        await client.cmd("DATA")
        await client.send_raw(message("not yours", headers={"X-Account": "other"}) + b".\r\n")
        assert (await client.reply()).startswith("550 5.7.1")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.com>")
        await client.cmd("DATA")
        await client.send_raw(message("yours") + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        await client.close()
        await upstream.wait_for_messages(1)
        assert other.messages == []
    assert all(secret not in record.getMessage() for record in caplog.records)


async def test_starttls_listener(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    app = await _relay(tmp_path, upstream, start_relay,
                       tls={"cert": str(cert), "key": str(key), "required": True})
    plain = await _session(app.smtp_port)
    assert (await plain.cmd("MAIL FROM:<a@example.com>")).startswith("530")
    await plain.close()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=True,
                             validate_certs=False)
    async with client:
        await client.sendmail("app@example.com", ["to@example.com"], message("over tls"))
    await upstream.wait_for_messages(1)


# -- the listener's fast paths agree with aiosmtpd --

_PATH_ALPHABET = "abcXYZ019.-_+@<>\"[] ()!#$%&'*/=?^`{|}~;:,\\"


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(alphabet=_PATH_ALPHABET, max_size=40),
    st.builds(lambda local, domain, rest: f"<{local}@{domain}>{rest}",
              st.text(alphabet="abc.+-_'", min_size=1, max_size=12),
              st.text(alphabet="abc.-0", min_size=1, max_size=12),
              st.sampled_from(["", " SIZE=10", "  BODY=8BITMIME", "junk", " "])),
))
def test_fast_address_parsing_matches_aiosmtpd(arg: str) -> None:
    """RelaySMTP._getaddr's shortcut returns exactly what the full parser would: RFC 5321's
    (relay.addresses) by default, aiosmtpd's with strict_addresses off (where that parser
    crashes, as it does on '<' or '0@', 'malformed')."""
    strict = parse_path(arg) if arg else ("", "")
    assert _bare_smtp()._getaddr(arg) == (strict or (None, None))
    smtp = _bare_smtp(strict=False)
    try:
        expected = SMTP._getaddr(smtp, arg)
    except Exception:  # the parser's own crashes ('<', '0@[') mean: malformed
        expected = (None, None)
    assert smtp._getaddr(arg) == expected


@pytest.mark.parametrize("fragment", ["<", '"', "0@", "<a@", "0@["])
async def test_address_fragments_get_a_syntax_reply_not_an_internal_error(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, fragment: str
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    answer = await client.cmd(f"MAIL FROM:{fragment}")
    assert answer[:3] in ("501", "553"), answer
    await client.close()


def _bare_smtp(*, strict: bool = True) -> RelaySMTP:
    if strict not in _SMTP_FOR_PARSING:
        from prometheus_client import CollectorRegistry

        from relay.config.schema import Config, ListenConfig
        from relay.ingest.handler import IngestHandler
        from relay.ingest.listener import SessionLimits
        from relay.observe.metrics import Metrics

        config = Config(listen=ListenConfig(strict_addresses=strict))
        metrics = Metrics(CollectorRegistry(), config.accounts)

        async def submit(new: Sequence[NewMessage],
                         gone: asyncio.Future[None] | None = None) -> tuple[list[str], None]:
            return [m.id for m in new], None

        loop = asyncio.new_event_loop()
        handler = IngestHandler(config, submit, metrics)
        _SMTP_FOR_PARSING[strict] = RelaySMTP(handler, SessionLimits(config, metrics),
                                              hostname="x", loop=loop)
        loop.close()
    return _SMTP_FOR_PARSING[strict]


_SMTP_FOR_PARSING: dict[bool, RelaySMTP] = {}


@pytest.mark.parametrize("address", ["a\x01b@example.com", "\x00@example.com", "a\x7f@x.com"])
async def test_control_characters_in_addresses_are_refused(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, address: str
) -> None:
    app = await _relay(tmp_path, upstream, start_relay)
    client = await _session(app.smtp_port)
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd(f"RCPT TO:<{address}>".encode())).startswith("501 5.1.3")
    await client.close()


async def test_failed_logins_count_toward_the_error_limit(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    users = {"app": {"password_hash": hash_password("right")}}
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen={"auth": {"users": users}, "max_bad_commands": 3})
    app = await start_relay(config)
    client = await _session(app.smtp_port)
    for _ in range(2):
        assert (await client.cmd(_auth_plain("app", "wrong"))).startswith("535")
    assert (await client.cmd(_auth_plain("app", "wrong"))).startswith("535")
    assert (await client.reply()).startswith("421 4.7.0")
    assert await client.closed()


def test_queue_file_is_private(tmp_path: Path) -> None:
    import asyncio as aio
    import stat

    from relay.queue.sqlite.store import SQLiteStore

    store = SQLiteStore(tmp_path / "new-dir" / "queue.sqlite3")

    async def open_and_close() -> None:  # in one loop: close() waits for the writer task
        await store.open()
        await store.close()

    aio.run(open_and_close())
    assert stat.S_IMODE((tmp_path / "new-dir").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new-dir" / "queue.sqlite3").stat().st_mode) == 0o600
