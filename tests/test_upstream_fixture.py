"""Self-tests for tests/upstream.py: each fault is observable by a real SMTP client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from tests.upstream import FakeUpstream

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]

# CRLF line endings, a leading dot (must be unstuffed back), 8-bit UTF-8.
MESSAGE = (
    "From: a@example.com\r\n"
    "To: b@example.com\r\n"
    "Subject: h\u00e9llo\r\n"
    "\r\n"
    ".leading dot\r\n"
    "..two dots\r\n"
    "caf\u00e9\r\n"
).encode()


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


def client(up: FakeUpstream, *, login: bool = True) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=up.host,
        port=up.port,
        username="user" if login else None,
        password="secret" if login else None,
        start_tls=False,
        timeout=2,
    )


async def test_authenticated_delivery_recorded_byte_identically(up: FakeUpstream) -> None:
    async with client(up) as smtp:
        errors, _ = await smtp.sendmail(
            "a@example.com", ["b@example.com", "c@example.com"], MESSAGE
        )
    assert errors == {}
    assert up.auth_successes == 1 and up.auth_failures == 0
    await up.wait_for_messages(1)
    [msg] = up.messages
    assert msg.data == MESSAGE
    assert msg.mail_from == "a@example.com"
    assert msg.rcpt_tos == ("b@example.com", "c@example.com")
    assert msg.connection_id == 1
    assert msg.received_at <= time.monotonic()
    assert up.recipients_received() == ["b@example.com", "c@example.com"]
    assert [verb for _, verb in up.commands] == [
        "EHLO",
        "AUTH",
        "MAIL",
        "RCPT",
        "RCPT",
        "DATA",
        "QUIT",
    ]


async def test_auth_login_and_plain_and_required(up: FakeUpstream) -> None:
    async with client(up, login=False) as smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("auth")
        assert set(smtp.server_auth_methods) == {"plain", "login"}
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc_info:
            await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert exc_info.value.code == 530
        await smtp.auth_login("user", "secret")
    async with client(up, login=False) as smtp:
        await smtp.ehlo()
        await smtp.auth_plain("user", "secret")
    assert up.auth_successes == 2
    assert up.messages == []


async def test_auth_failure(up: FakeUpstream) -> None:
    async with client(up, login=False) as smtp:
        await smtp.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc_info:
            await smtp.auth_plain("user", "wrong")
        assert exc_info.value.code == 535
    up.fail_auth(True)
    async with client(up, login=False) as smtp:
        await smtp.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc_info:
            await smtp.auth_login("user", "secret")
        assert exc_info.value.code == 535
        assert "5.7.8" in exc_info.value.message
    up.fail_auth(False)
    async with client(up) as smtp:  # connect() logs in with the right password
        await smtp.noop()
    assert (up.auth_failures, up.auth_successes) == (2, 1)


async def test_no_auth_when_username_is_none() -> None:
    async with FakeUpstream(username=None) as up, client(up, login=False) as smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("8bitmime") and smtp.supports_extension("smtputf8")
        assert not smtp.supports_extension("auth")
        await smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(up.messages) == 1 and up.auth_successes == 0


async def test_fail_data_then_success(up: FakeUpstream) -> None:
    up.fail_data(451, "4.3.0 try later", times=2)
    async with client(up) as smtp:
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPDataError) as exc_info:
                await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            assert (exc_info.value.code, exc_info.value.message) == (451, "4.3.0 try later")
        assert up.messages == []
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert [m.data for m in up.messages] == [MESSAGE]


async def test_fail_message_attempts_per_marker(up: FakeUpstream) -> None:
    up.fail_message_attempts(b"X-Id: bad", 550, "5.7.1 rejected", times=1)
    bad = b"X-Id: bad\r\n\r\nbody\r\n"
    good = b"X-Id: good\r\n\r\nbody\r\n"
    async with client(up) as smtp:
        await smtp.sendmail("a@example.com", ["b@example.com"], good)
        with pytest.raises(aiosmtplib.SMTPDataError) as exc_info:
            await smtp.sendmail("a@example.com", ["b@example.com"], bad)
        assert exc_info.value.code == 550
        await smtp.sendmail("a@example.com", ["b@example.com"], bad)
    assert [m.data for m in up.messages] == [good, bad]


async def test_refuse_rcpt_partial(up: FakeUpstream) -> None:
    up.refuse_rcpt("bad@example.com", 550, "5.1.1 no such user")
    up.refuse_rcpt("busy@example.com", 450, "4.2.1 busy", times=1)
    rcpts = ["ok@example.com", "bad@example.com", "busy@example.com"]
    async with client(up) as smtp:
        errors, _ = await smtp.sendmail("a@example.com", rcpts, MESSAGE)
        assert {addr: r.code for addr, r in errors.items()} == {
            "bad@example.com": 550,
            "busy@example.com": 450,
        }
        errors, _ = await smtp.sendmail("a@example.com", rcpts, MESSAGE)
        assert set(errors) == {"bad@example.com"}
    assert up.recipients_received() == ["ok@example.com", "ok@example.com", "busy@example.com"]


async def test_greeting_421(up: FakeUpstream) -> None:
    up.greeting(421, "4.7.0 too many connections")
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as exc_info:
        await client(up).connect()
    assert exc_info.value.code == 421
    await up.wait_for_connections_open(0)
    up.greeting(None)
    async with client(up) as smtp:
        await smtp.noop()
    assert up.connections_opened == 2


async def test_drop_connection_after_data(up: FakeUpstream) -> None:
    up.drop_connection_after("DATA")
    smtp = client(up)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    await up.wait_for_connections_open(0)
    assert up.messages == []
    assert up.commands[-1] == (1, "DATA")  # the body was sent; no reply came back
    async with client(up) as smtp2:
        await smtp2.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert len(up.messages) == 1


async def test_drop_connection_after_accepted_data(up: FakeUpstream) -> None:
    up.drop_connection_after("DATA", accepted=True)
    smtp = client(up)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    # The upstream kept the message even though the client never saw a 250.
    assert [m.data for m in up.messages] == [MESSAGE]


async def test_slow_data_reply_still_delivers_after_client_timeout(up: FakeUpstream) -> None:
    up.delay("DATA", 1)
    async with client(up) as smtp:
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE, timeout=0.1)
    assert len(up.messages) == 1


async def test_drop_connection_after_rcpt(up: FakeUpstream) -> None:
    up.drop_connection_after("rcpt")
    smtp = client(up)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert up.commands[-1] == (1, "RCPT")


async def test_delay_data_reply(up: FakeUpstream) -> None:
    up.delay("DATA", 0.3)
    async with client(up) as smtp:
        started = time.monotonic()
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert time.monotonic() - started >= 0.3
        up.clear_faults()
        started = time.monotonic()
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert time.monotonic() - started < 0.3


async def test_delay_greeting_hits_client_timeout(up: FakeUpstream) -> None:
    up.delay("GREETING", 1)
    smtp = aiosmtplib.SMTP(hostname=up.host, port=up.port, timeout=0.2)
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await smtp.connect()


async def test_connection_counting(up: FakeUpstream) -> None:
    a, b = client(up), client(up)
    await a.connect()
    await b.connect()
    assert (up.connections_opened, up.connections_open) == (2, 2)
    await a.quit()
    await up.wait_for_connections_open(1)
    await b.quit()
    await up.wait_for_connections_open(0)
    assert up.connections_opened == 2
    assert {cid for cid, _ in up.commands} == {1, 2}


async def test_close_idle_connections(up: FakeUpstream) -> None:
    smtp = client(up)
    await smtp.connect()
    await smtp.noop()
    up.close_idle_connections()
    await up.wait_for_connections_open(0)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.noop()
    assert up.connections_opened == 1


async def test_wait_for_messages_times_out_with_assertion(up: FakeUpstream) -> None:
    with pytest.raises(AssertionError, match=r"at least 1 message.*messages=0"):
        await up.wait_for_messages(1, timeout=0.05)


async def test_wait_for_messages_wakes_on_delivery(up: FakeUpstream) -> None:
    async def send() -> None:
        async with client(up) as smtp:
            await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)

    waiter = asyncio.create_task(up.wait_for_messages(1, timeout=2))
    await send()
    await waiter
    assert len(up.messages) == 1


async def test_stop_closes_open_clients() -> None:
    up = FakeUpstream()
    await up.start()
    smtp = client(up)
    await smtp.connect()
    up.delay("NOOP", 5)
    noop = asyncio.create_task(smtp.noop())
    await asyncio.sleep(0.05)
    await up.stop()
    assert up.connections_open == 0
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await noop


async def test_reply_to_answers_instead_and_keeps_or_closes_the_connection(
    up: FakeUpstream,
) -> None:
    up.reply_to("MAIL", 421, "4.7.0 too many messages in this connection", after=1)
    async with client(up) as smtp:
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await smtp.mail("a@example.com")
        assert refused.value.code == 421
    up.reply_to("RCPT", 421, "4.3.2 shutting down", close=True)
    smtp = client(up)
    await smtp.connect()
    await smtp.mail("a@example.com")
    with pytest.raises(aiosmtplib.SMTPResponseException):
        await smtp.rcpt("b@example.com")
    await up.wait_for_connections_open(0)
    smtp.close()


async def test_recipient_limit_ehlo_names_and_no_8bitmime() -> None:
    async with FakeUpstream(recipient_limit=1, eightbitmime=False) as up:
        smtp = aiosmtplib.SMTP(hostname=up.host, port=up.port, username="user",
                               password="secret", start_tls=False, timeout=2,
                               local_hostname="client.example.com")
        async with smtp:
            assert not smtp.supports_extension("8bitmime")
            errors, _ = await smtp.sendmail("a@example.com", ["b@example.com",
                                                              "c@example.com"], b"x\r\n")
        assert errors["c@example.com"][0] == 452
        assert up.recipients_received() == ["b@example.com"]
        assert up.ehlo_names == ["client.example.com"]
