"""SIGHUP reloads the config without dropping connections or messages (issue 7 point 5)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import yaml

from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import RelayProcess, write_config
from tests.smtpclient import RawSMTP
from tests.upstream import FakeUpstream


async def test_reload_adds_changes_and_removes_accounts(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        first_account = upstream_account(upstream, tmp_path)
        app = await start_relay(relay_config(tmp_path, {"up": first_account}))
        old_worker = app.scheduler.workers["up"]
        assert (await send(app.smtp_port, message("before"), )) [0] == 250
        await upstream.wait_for_messages(1)

        new = relay_config(tmp_path, {
            "up": {**first_account, "rate_limit": {"per_minute": 100}},
            "second": upstream_account(second, tmp_path),
        })
        notes = await app.reload(new)
        assert notes == []
        assert app.scheduler.workers["up"] is not old_worker  # changed: a new worker
        assert app.scheduler.workers["up"].limiter.limited
        code, _ = await send(app.smtp_port, message("to second", headers={"X-Account": "second"}))
        assert code == 250
        await second.wait_for_messages(1)
        assert b"X-Account" not in second.messages[0].data
        assert metric(app, "relay_messages_delivered_total", account="second") >= 0

        only_second = relay_config(tmp_path, {"second": upstream_account(second, tmp_path)})
        notes = await app.reload(only_second)
        assert any("account up removed" in n for n in notes)
        code, text = await send(app.smtp_port, message("to the old account"))  # default now
        assert code == 250
        await second.wait_for_messages(2)
        code, text = await send(app.smtp_port, message("gone", headers={"X-Account": "up"}))
        assert code == 550 and "X-Account" in text


async def test_restart_only_changes_are_reported_and_kept(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    moved = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                         queue={"path": str(tmp_path / "elsewhere.sqlite3")},
                         listen={"port": 1})
    notes = await app.reload(moved)
    assert any(n.startswith("queue changed") for n in notes)
    assert any(n.startswith("listen.host/port changed") for n in notes)
    assert app.config.queue.path == config.queue.path
    assert (await send(app.smtp_port, message("still here")))[0] == 250


async def test_sighup_in_a_real_process(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An open session survives the reload; a bad file is refused with every problem
    logged; the relay keeps serving and still stops cleanly."""
    async with FakeUpstream() as second:
        path = write_config(tmp_path, upstream)
        relay = await RelayProcess.spawn(path, tmp_path)
        try:
            await relay.wait_started()
            session = await RawSMTP.connect(relay.port)
            assert (await session.reply()).startswith("220")
            assert "250" in await session.cmd("EHLO client.example")

            data = yaml.safe_load(path.read_text())
            data["accounts"]["second"] = upstream_account(second, tmp_path)
            path.write_text(yaml.safe_dump(data))
            relay.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "relay: reloaded" in relay.stderr, what="the reload")

            # The session opened before the reload carries on, and the new account works.
            assert (await session.cmd("MAIL FROM:<a@example.com>")).startswith("250")
            assert (await session.cmd("RCPT TO:<b@example.com>")).startswith("250")
            assert (await session.cmd("DATA")).startswith("354")
            await session.send_raw(message("after hup", headers={"X-Account": "second"})
                                   + b".\r\n")
            assert (await session.reply()).startswith("250 2.0.0 queued as")
            await session.close()
            await second.wait_for_messages(1)

            data["accounts"]["second"]["tls"] = "sometimes"
            data["routing"]["default_account"] = "nobody"
            path.write_text(yaml.safe_dump(data))
            relay.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "still running with the previous one" in relay.stderr,
                             what="the rejected reload")
            assert "accounts.second.tls: must be one of" in relay.stderr
            assert "Traceback" not in relay.stderr
            await asyncio.sleep(0)
            assert (await _send_port(relay.port, "still serving")) == 250
            await upstream.wait_for_messages(1)
        finally:
            if relay.proc.returncode is None:
                relay.proc.send_signal(signal.SIGTERM)
        assert await relay.exit_code(within=10) == 0


async def _send_port(port: int, subject: str) -> int:
    code, _ = await send(port, message(subject))
    return code


async def test_reload_cannot_open_a_public_listener(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """The address changes only at a restart, so new access rules are checked against
    the old address: 'allow everyone' on a public address is refused, not applied."""
    import pytest

    from relay.errors import ConfigError

    public = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen={"host": "0.0.0.0", "allowed_networks": ["127.0.0.0/8"],
                                  "port": 0})
    app = await start_relay(public)
    loopback_open = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                 listen={"host": "127.0.0.1", "port": 0})
    with pytest.raises(ConfigError, match=r"listen\.host: 0\.0\.0\.0 is not a loopback address"):
        await app.reload(loopback_open)
    assert app.limits.networks == public.listen.networks()


async def test_a_reloaded_account_keeps_its_recent_sends_in_monotonic_time(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Found in review: a reload restored an account's stored (wall-clock) send times into
    its limiter, which counts in monotonic time, so they never left the window and a
    limited account could stop sending until a restart."""
    account = upstream_account(upstream, tmp_path, rate_limit={"per_minute": 2})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    for i in range(2):
        assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    await upstream.wait_for_messages(2)
    await app.scheduler.run_until_idle()

    changed = {**account, "rate_limit": {"per_minute": 3}}
    assert await app.reload(relay_config(tmp_path, {"up": changed})) == []
    limiter = app.scheduler.workers["up"].limiter
    now = app.scheduler.mono()
    assert limiter.available(now) == 1  # the two recent sends still count
    assert limiter.wait_time(now + 61) == 0 and limiter.available(now + 61) == 3
