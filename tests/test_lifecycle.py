"""Reload, shutdown and start-up as lifecycle steps (issue 11 points 4, 5; issue 19 point 4).

Real parts: a `relay serve` subprocess or an in-process App, the fault-injecting
FakeUpstream, the queue file on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
from pathlib import Path

import aiosmtplib

from tests.conftest import Launch, message
from tests.relayproc import write_config
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
