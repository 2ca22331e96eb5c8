"""The spine in one pass: accept over SMTP, commit, deliver upstream with AUTH."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartRelay, message, metric, relay_config, send, upstream_account
from tests.upstream import FakeUpstream


async def test_message_is_queued_then_delivered_upstream(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    code, text = await send(app.smtp_port, message("one"))
    assert code == 250 and text.startswith("2.0.0 queued as ")
    await upstream.wait_for_messages(1)
    got = upstream.messages[0]
    assert got.data == message("one")
    assert got.mail_from == "app@example.com" and got.rcpt_tos == ("to@example.com",)
    await app.scheduler.run_until_idle()
    assert metric(app, "relay_messages_delivered_total", account="up") == 1
    assert upstream.auth_successes == 1
