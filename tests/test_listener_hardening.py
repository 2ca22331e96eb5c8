"""Listener hardening (issue 11 points 7-12, issue 19 point 2): real listener, real
upstream, raw SMTP from the tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from tests.conftest import StartRelay, message, metric, send
from tests.smtpclient import RawSMTP
from tests.test_hardening import _relay, _session
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
