"""`relay serve` as a real process: crash safety under load, signals, startup refusals.

The relay runs in a subprocess (``python -m relay serve --config FILE``); the
FakeUpstream it delivers to runs in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections import Counter
from pathlib import Path

import aiosmtplib
import pytest
import yaml

from tests.conftest import Launch, message, send
from tests.relayproc import STARTUP_DEADLINE_S, write_config
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.slow





def load_body(marker: str) -> bytes:
    return message(f"load {marker}", headers={"Message-ID": f"<{marker}@example.com>"},
                   body=f"marker={marker}\r\n.dot line\r\ncaf\u00e9\r\n")


async def test_kill_9_under_load_loses_no_acknowledged_message(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """Every message that got a 250 before SIGKILL is delivered after a restart."""
    # A slow upstream (the reply to DATA comes 20 ms after the message is recorded) keeps
    # a backlog in the queue and deliveries in flight at the moment of the kill.
    in_flight_bound = 2
    upstream.delay("DATA", 0.02)
    config = write_config(tmp_path, upstream, pool={"max_connections": in_flight_bound})
    relay = await launch(config)
    await relay.wait_started()

    acked: dict[str, bytes] = {}
    enough = asyncio.Event()

    async def client(c: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False,
                               timeout=10)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            async with smtp:
                for i in range(100_000):
                    marker = f"k9-{c}-{i}"
                    data = load_body(marker)
                    await smtp.sendmail("app@example.com", [f"r{c}@example.com"], data)
                    acked[marker] = data  # only after the 250
                    if len(acked) >= 200:
                        enough.set()

    clients = [asyncio.create_task(client(c)) for c in range(10)]
    async with asyncio.timeout(30):
        await enough.wait()
    relay.proc.send_signal(signal.SIGKILL)
    assert await relay.exit_code(within=5) == -signal.SIGKILL
    async with asyncio.timeout(15):
        await asyncio.gather(*clients)
    delivered_before = len(upstream.messages)
    assert delivered_before < len(acked), "no backlog at the kill: the test proves nothing"
    upstream.delay("DATA", 0)  # the restarted relay may go at full speed

    restarted = await launch(config)
    await restarted.wait_started()
    async with asyncio.timeout(30):
        while not set(acked) <= (seen := {marker_of(m.data) for m in upstream.messages}):
            await upstream.wait_for_messages(len(upstream.messages) + 1, timeout=30)
    assert seen >= set(acked)

    counts = Counter(marker_of(m.data) for m in upstream.messages)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\nkill -9 under load: {len(acked)} acknowledged, {delivered_before} delivered"
          f" before the kill, {len(counts)} distinct delivered, {duplicates} duplicate(s)")
    for m in upstream.messages:
        marker = marker_of(m.data)
        if marker in acked:
            assert m.data == acked[marker]
    assert duplicates <= in_flight_bound

    restarted.proc.send_signal(signal.SIGTERM)
    assert await restarted.exit_code(within=10) == 0


def marker_of(data: bytes) -> str:
    start = data.index(b"marker=") + len(b"marker=")
    return data[start : data.index(b"\r\n", start)].decode()


async def test_sigterm_while_idle_exits_cleanly(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """SIGTERM on an idle relay: exit code 0 within 5 s, with a `stopped` line."""
    relay = await launch(write_config(tmp_path, upstream))
    await relay.wait_started()
    relay.proc.send_signal(signal.SIGTERM)
    assert await relay.exit_code(within=5) == 0
    assert any(line.endswith("relay: stopped") for line in relay.lines), relay.stderr
    assert "Traceback" not in relay.stderr


async def test_sigterm_as_soon_as_started_is_logged_is_graceful(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """`started` means signals are handled: a SIGTERM sent on that line still exits 0."""
    config = write_config(tmp_path, upstream)
    for attempt in range(5):  # the window is short; a few tries make a miss unlikely
        relay = await launch(config)
        relay.on_started = lambda r=relay: r.proc.send_signal(signal.SIGTERM)
        await relay.wait_started()
        code = await relay.exit_code(within=5)
        assert code == 0, f"attempt {attempt}: exit {code}, stderr:\n{relay.stderr}"
        assert relay.lines[-1].endswith("relay: stopped"), relay.stderr


async def test_serve_with_bad_config_exits_with_key_lines(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """A bad config stops `relay serve` before it starts: `config error: key: why`, no traceback."""
    config = write_config(tmp_path, upstream, tls="ssl")
    data = yaml.safe_load(config.read_text())
    data["retry"]["initial_delay"] = "30 parsecs"
    config.write_text(yaml.safe_dump(data))

    relay = await launch(config)
    code = await relay.exit_code(within=STARTUP_DEADLINE_S)
    assert code != 0
    assert "Traceback" not in relay.stderr
    assert relay.lines, "no output"
    assert all(line.startswith("config error: ") for line in relay.lines), relay.stderr
    assert "config error: accounts.up.tls: must be one of starttls, implicit, none" in relay.lines
    assert any(line.startswith("config error: retry.initial_delay: ") for line in relay.lines)
    assert not relay.started.is_set()


async def test_second_relay_on_same_queue_refuses_to_start(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """A second `relay serve` on a queue file in use exits non-zero naming the lock."""
    first = await launch(write_config(tmp_path, upstream))
    await first.wait_started()
    second = await launch(write_config(tmp_path, upstream, name="second.yaml"))
    code = await second.exit_code(within=STARTUP_DEADLINE_S)
    assert code != 0
    assert "Traceback" not in second.stderr
    assert "another relay is already using" in second.stderr
    assert str(tmp_path / "queue.sqlite3") in second.stderr
    assert not second.started.is_set()
    # It never started, so it did not stop either (issue 19 point 4).
    (failed,) = [line for line in second.lines if "relay: start_failed reason=" in line]
    assert "another relay is already using" in failed
    assert not any(line.endswith("relay: stopped") for line in second.lines), second.stderr

    # The first one is unharmed.
    code, _ = await send(first.port, message("still here"))
    assert code == 250
    await upstream.wait_for_messages(1)
    first.proc.send_signal(signal.SIGTERM)
    assert await first.exit_code(within=5) == 0


async def test_serve_on_a_port_in_use_exits_with_a_clear_message(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """If the listen port is taken, `relay serve` says so and exits 1, without a traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        relay = await launch(
            write_config(tmp_path, upstream, listen_port=busy.getsockname()[1])
        )
        code = await relay.exit_code(within=STARTUP_DEADLINE_S)
    assert code == 1
    assert "relay: cannot listen" in relay.stderr
    assert "Traceback" not in relay.stderr
    assert not relay.started.is_set()
    # `start_failed` once, and no `stopped` (it used to log `stopped` twice).
    (failed,) = [line for line in relay.lines if "relay: start_failed reason=" in line]
    assert "address already in use" in failed
    assert not any(line.endswith("relay: stopped") for line in relay.lines), relay.stderr


async def test_serve_on_a_corrupt_queue_file_exits_promptly(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch
) -> None:
    """A queue file that is not a database stops `relay serve` with the reason, and it exits.

    It used to print the reason and then hang for ever: the failed SQLite connection was
    never closed, and aiosqlite's worker thread is not a daemon.
    """
    (tmp_path / "queue.sqlite3").write_bytes(b"this is not a database" * 100)
    relay = await launch(write_config(tmp_path, upstream))
    code = await relay.exit_code(within=STARTUP_DEADLINE_S)
    assert code != 0
    assert "Traceback" not in relay.stderr
    assert "not a database" in relay.stderr
    assert not relay.started.is_set()
