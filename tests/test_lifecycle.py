"""Reload, shutdown and start-up as lifecycle steps (issue 11 points 4, 5; issue 19 point 4).

Real parts: a `relay serve` subprocess or an in-process App, the fault-injecting
FakeUpstream, the queue file on disk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import signal
import sqlite3
from pathlib import Path

import aiosmtplib
import pytest

from relay.errors import ConfigError
from relay.ingest.auth import hash_password
from relay.queue.types import MessageState
from tests.conftest import (
    Launch,
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import write_config
from tests.smtpclient import RawSMTP
from tests.upstream import FakeUpstream

QUEUED = re.compile(r"queued as ([0-9A-F]+)")


async def test_sigterm_mid_stream_answers_every_committed_message(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """SIGTERM while many clients send: every message in the queue file got a 250, and
    every 250 is in the queue file (no resend of a committed message, nothing lost)."""
    # One delivery a minute: no send is in flight to hold up the shutdown, so the store
    # closes right after the listener stops.
    relay = await launch(write_config(tmp_path, upstream, rate_limit={"per_minute": 1}))
    await relay.wait_started()
    acked: dict[str, str] = {}  # sender -> queue id, only after the 250
    enough = asyncio.Event()

    async def client(c: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False,
                               timeout=10)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            async with smtp:
                for i in range(100_000):
                    sender = f"c{c}-{i}@example.com"
                    _, reply = await smtp.sendmail(sender, ["to@example.com"], message(sender))
                    match = QUEUED.search(reply)
                    assert match, reply
                    acked[sender] = match.group(1)
                    if len(acked) >= 150:
                        enough.set()

    clients = [asyncio.create_task(client(c)) for c in range(16)]
    async with asyncio.timeout(30):
        await enough.wait()
    # A slow commit (here: another connection holds the queue file's write lock, as a
    # `relay queue` bulk command does) keeps a batch in the writer when SIGTERM comes.
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.sqlite3", timeout=10)) as lock:
        lock.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(0.3)
        relay.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        lock.rollback()
    assert await relay.exit_code(within=15) == 0, relay.stderr
    async with asyncio.timeout(15):
        await asyncio.gather(*clients)
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.sqlite3")) as db:
        stored = dict(db.execute("SELECT sender, id FROM messages").fetchall())
    assert set(stored) - set(acked) == set(), "committed but never answered 250: resent"
    assert set(acked) - set(stored) == set(), "answered 250 but not in the queue file"
    assert stored == acked
    assert "Traceback" not in relay.stderr


async def test_reload_removing_the_account_of_a_message_being_committed_answers_250(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A message routed under the old config is committed and answered 250 although a
    SIGHUP removed its account before the commit returned; it waits in the queue."""
    async with FakeUpstream() as second:
        both = {"up": upstream_account(upstream, tmp_path),
                "second": upstream_account(second, tmp_path)}
        app = await start_relay(relay_config(tmp_path, both))
        only_second = relay_config(tmp_path, {"second": both["second"]})
        with contextlib.closing(sqlite3.connect(app.config.queue.path, timeout=10)) as lock:
            lock.execute("BEGIN IMMEDIATE")  # the commit waits: a slow disk, a CLI command
            sending = asyncio.create_task(send(app.smtp_port, message("routed to up")))
            await wait_until(lambda: app._committing == 1, what="the message in the writer")
            await app.reload(only_second)
            lock.rollback()
        code, text = await sending
        assert code == 250, text
        queue_id = QUEUED.search(text)
        assert queue_id
        with contextlib.closing(sqlite3.connect(app.config.queue.path)) as db:
            row = db.execute("SELECT account, state FROM messages WHERE id=?",
                             (queue_id.group(1),)).fetchone()
        assert row == ("up", "queued")  # waits until the account returns
        assert metric(app, "relay_messages_rejected_total", reason="internal_error") == 0


async def test_two_reloads_at_once_run_one_after_the_other(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two SIGHUPs in a row: the second reload sees the first one's result, so an account
    both add is started once, not restarted by the second (its connections dropped)."""
    caplog.set_level(logging.INFO, logger="relay")
    async with FakeUpstream() as second:
        first = upstream_account(upstream, tmp_path)
        app = await start_relay(relay_config(tmp_path, {"up": first}))
        # A rate limit makes the new worker read its send times: an await mid-reload.
        added = relay_config(tmp_path, {"up": first, "second": upstream_account(
            second, tmp_path, rate_limit={"per_minute": 100})})
        notes = await asyncio.gather(app.reload(added), app.reload(added))
        assert notes == [[], []]
        reloads = [m for m in caplog.messages if m.startswith("reloaded")]
        assert reloads == ["reloaded changed=second", "reloaded"]
        worker = app.scheduler.workers["second"]
        assert worker.transport is app.transports["second"]
        await app.reload(added)  # unchanged: the worker the first reload started stays
        assert app.scheduler.workers["second"] is worker
        assert (await send(app.smtp_port, message("x", headers={"X-Account": "second"})))[0] \
            == 250
        await second.wait_for_messages(1)


async def test_reload_that_weakens_tls_logs_the_start_warnings(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    account = upstream_account(upstream, tmp_path)
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    caplog.set_level(logging.WARNING, logger="relay")
    weak = relay_config(tmp_path, {"up": {**account, "host": "localhost",
                                          "tls_verify": False}})
    await app.reload(weak)
    assert "config: accounts.up.tls_verify: false; certificates are not checked" in \
        caplog.messages


async def test_a_reload_that_cannot_be_applied_leaves_the_old_config_running(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A CA file that is not PEM (it passed validation: it exists) fails while the new
    pools are built, before anything is switched."""
    account = upstream_account(upstream, tmp_path)
    old = relay_config(tmp_path, {"up": account})
    app = await start_relay(old)
    worker, pool = app.scheduler.workers["up"], app.transports["up"]
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    broken = relay_config(tmp_path, {"up": {**account, "tls": "starttls",
                                            "tls_ca_file": str(bad_ca)},
                                     "more": account})
    with pytest.raises(ConfigError, match=r"accounts\.up\.tls_ca_file: "):
        await app.reload(broken)
    assert app.config is old
    assert app.scheduler.workers == {"up": worker} and app.transports == {"up": pool}
    assert (await send(app.smtp_port, message("still the old config")))[0] == 250
    await upstream.wait_for_messages(1)


async def test_an_authenticated_session_logs_no_aiosmtpd_warnings(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture,
) -> None:
    """AUTH required without TLS (loopback) and a successful login: aiosmtpd warned about
    both on every session (issue 19 point 4). A Maildir account: no other aiosmtpd
    server (the FakeUpstream is one) in the log."""
    users = {"app": {"password_hash": hash_password("right")}}
    box = tmp_path / "box"
    config = relay_config(tmp_path, {"box": {"transport": "maildir", "path": str(box)}},
                          listen={"auth": {"required": True, "users": users}})
    caplog.set_level(logging.WARNING)
    app = await start_relay(config)
    client = await RawSMTP.connect(app.smtp_port)
    await client.reply()
    await client.cmd("EHLO client.example")
    login = base64.b64encode(b"\0app\0right").decode()
    assert (await client.cmd(f"AUTH PLAIN {login}")).startswith("235")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.com>")
    await client.cmd("DATA")
    await client.send_raw(message("authenticated") + b".\r\n")
    assert (await client.reply()).startswith("250")
    await client.close()
    await app.scheduler.run_until_idle()
    assert len(list((box / "new").iterdir())) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "mail.log"] == []


async def test_a_reload_whose_log_file_cannot_be_opened_changes_nothing(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGHUP with an unopenable logging.file: rejected, and the accounts stay as they
    were (the log file used to be opened after the switch: 'rejected', yet applied)."""
    from relay.cli.commands import _reload

    account = upstream_account(upstream, tmp_path)
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    before = app.config
    path = tmp_path / "relay.yaml"
    data = {"listen": {"host": "127.0.0.1", "port": 0},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "queue": {"path": str(before.queue.path)},
            "logging": {"file": str(tmp_path / "no-such-dir" / "relay.log")},
            "accounts": {"up": account, "more": account},
            "routing": {"default_account": "up"}}
    path.write_text(json.dumps(data))
    caplog.set_level(logging.ERROR, logger="relay")
    await _reload(app, str(path))
    assert app.config is before and set(app.scheduler.workers) == {"up"}
    assert any(m.startswith("reload_rejected reason=\"logging.file: cannot open")
               for m in caplog.messages), caplog.messages


async def test_a_send_cut_off_by_shutdown_is_recorded_and_logged(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM while the upstream holds the final reply: after the grace the send is an
    attempt with its reason (was: queued, TRIES 0, no error, only `stopped` logged), so a
    duplicate after the restart can be explained."""
    caplog.set_level(logging.WARNING, logger="relay")
    upstream.delay("DATA", 30)  # the message is recorded, the 250 never comes in time
    account = upstream_account(upstream, tmp_path, retry={"initial_delay": "1h",
                                                          "max_delay": "1h", "max_age": "2d"})
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    code, text = await send(app.smtp_port, message("held"))
    assert code == 250
    queue_id = text.split()[-1]
    await upstream.wait_for_messages(1)
    await app.shutdown(grace=0.3)
    [line] = [m for m in caplog.messages if " interrupted " in m]
    assert line.startswith(f"{queue_id}: interrupted account=up") and "attempt=1" in line

    upstream.delay("DATA", 0)
    app2 = await start_relay(config)
    stored = await app2.store.get(queue_id)
    assert stored is not None and stored.attempts == 1
    assert stored.last_error == "interrupted by shutdown; may have been delivered"
    assert stored.state is MessageState.DEFERRED
