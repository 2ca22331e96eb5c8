"""relay against a REAL Postfix as its upstream (issue 17), with the limits that bit it.

A private instance (``postfix -c DIR``, its own queue, a loopback port; no system
instance) refuses bare EHLO names, takes 2 recipients per transaction and 2 connections
per client, and hides 8BITMIME; it relays what it accepts to a FakeUpstream, where the
test reads it. Skipped, with the reason, where Postfix cannot run (not installed, not
root): .ci/run installs the Debian package `postfix`.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.app import App
from relay.bench.sink import BenchSetupError, PostfixInstance, postfix_problem
from relay.queue.types import MessageState
from tests.conftest import StartRelay, message, relay_config, send
from tests.upstream import FakeUpstream

STRICT = """\
smtpd_helo_required = yes
smtpd_helo_restrictions = reject_non_fqdn_helo_hostname
smtpd_recipient_limit = 2
smtpd_discard_ehlo_keywords = 8bitmime
smtpd_client_connection_count_limit = 2
# (the default exempts $mynetworks, i.e. relay on loopback)
smtpd_client_event_limit_exceptions =
"""


class StrictPostfix(PostfixInstance):
    def _write_config(self) -> None:
        super()._write_config()
        with (self.root / "etc" / "main.cf").open("a") as main:
            main.write(STRICT)


@pytest.fixture
async def postfix() -> AsyncIterator[tuple[StrictPostfix, FakeUpstream]]:
    problem = postfix_problem()
    if problem:
        pytest.skip(problem)
    # Not under pytest's tmp_path: its parents are 0700, and Postfix's daemons run as
    # the postfix user.
    with tempfile.TemporaryDirectory(prefix="relay-postfix-") as root:
        async with FakeUpstream(username=None) as sink:
            instance = StrictPostfix(Path(root), sink_port=sink.port, hold=False)
            try:
                await instance.start(timeout_s=30)
            except BenchSetupError as exc:
                pytest.skip(f"postfix did not start: {exc}")
            try:
                yield instance, sink
            finally:
                await instance.stop()


async def final(app: App, queue_id: str) -> tuple[MessageState, int, str]:
    for _ in range(500):
        record = await app.store.get(queue_id)
        assert record is not None
        if record.state in (MessageState.DELIVERED, MessageState.FAILED):
            return record.state, record.attempts, record.last_error
        await asyncio.sleep(0.02)
    raise AssertionError(f"{queue_id} not finished: {record.state} {record.last_error}")


async def test_relay_delivers_through_a_strict_postfix(
    tmp_path: Path, start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch,
    postfix: tuple[StrictPostfix, FakeUpstream],
) -> None:
    instance, sink = postfix
    # A machine whose name has no dot (relay used to say `EHLO vm`: 504 5.5.2).
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "vm")
    account = {"host": "127.0.0.1", "port": instance.port, "tls": "none",
               "timeouts": {"command": "10s", "data": "10s"}}
    app = await start_relay(relay_config(tmp_path, {"pf": account}))

    # Five recipients, two per transaction: all in the first attempt.
    rcpts = [f"r{i}@example.com" for i in range(5)]
    code, text = await send(app.smtp_port, message("five"), recipients=rcpts)
    assert code == 250
    assert await final(app, text.split()[-1]) == (MessageState.DELIVERED, 1, "")

    # 8-bit data to a Postfix that hides 8BITMIME: a clear failure, nothing sent.
    code, text = await send(app.smtp_port, message("8bit", body="caf\u00e9\r\n"))
    assert code == 250
    state, _, error = await final(app, text.split()[-1])
    assert state is MessageState.FAILED and "554 5.6.3" in error, error

    # More messages at once than Postfix allows connections: none lost.
    replies = await asyncio.gather(*(send(app.smtp_port, message(f"burst {i}"))
                                     for i in range(8)))
    results = [await final(app, t.split()[-1]) for c, t in replies if c == 250]
    assert len(results) == 8 and all(s is MessageState.DELIVERED for s, _, _ in results)

    await sink.wait_for_messages(3 + 8, timeout=30)
    received = sorted(sink.recipients_received())
    assert received == sorted(rcpts + ["to@example.com"] * 8)
    assert not any(b"caf\xc3\xa9" in m.data for m in sink.messages)
