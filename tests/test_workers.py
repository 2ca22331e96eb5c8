"""`relay serve --workers N` with real processes (issue 13): a supervising parent, N
workers on one port (SO_REUSEPORT) and one queue file, restarts, SIGTERM and SIGHUP."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, multiprocess

from relay.cli.commands import main
from relay.observe.metrics import forget_process
from relay.supervisors.multiprocess import restart_delay
from tests.conftest import message, send_many, wait_until
from tests.relayproc import RelayProcess, free_port, write_config
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
# Where a test needs both workers to have received, it sends over many connections: the
# kernel hashes each to a worker, all to one with odds of 2**-(connections - 1).
STARTED = re.compile(r"workers_started count=(\d+) .*pids=([\d,]+)")


async def _spawn(tmp_path: Path, config: Path, workers: int = 2) -> tuple[RelayProcess, list[int]]:
    relay = await RelayProcess.spawn(config, cwd=tmp_path, workers=workers)
    await wait_until(lambda: any(STARTED.search(x) for x in relay.lines)
                     or relay.proc.returncode is not None, timeout=30)
    found = [m for x in relay.lines if (m := STARTED.search(x))]
    assert found, relay.stderr
    return relay, [int(p) for p in found[0].group(2).split(",")]




async def wait_until_async(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


def _claims_of(queue: Path, pid: int) -> int:
    """Messages the worker process ``pid`` holds claimed (its owner names its pid)."""
    with sqlite3.connect(queue) as db:
        (count,) = db.execute("SELECT count(*) FROM messages WHERE state='sending'"
                              " AND owner LIKE ?", (f"%:{pid}:%",)).fetchone()
    return int(count)


def _subjects(up: FakeUpstream) -> list[bytes]:
    return [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in up.messages]


async def test_two_workers_share_the_port_and_deliver_each_message_once(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Each receives and each delivers (any message, from the one queue file)."""
    config = write_config(tmp_path, upstream)
    relay, pids = await _spawn(tmp_path, config)
    try:
        assert len(pids) == 2 and relay.proc.pid not in pids
        replies = await send_many(relay.port, [message(f"m{i}") for i in range(60)],
                                  sessions=20)
        assert all(code == 250 for code, _ in replies), replies
        await upstream.wait_for_messages(60, timeout=30)
        await asyncio.sleep(0.5)  # nothing more arrives
        subjects = _subjects(upstream)
        assert sorted(subjects) == sorted(f"m{i}".encode() for i in range(60))
        # Both processes answered clients (the kernel spread the connections).
        ids = {text.split()[-1] for _, text in replies}
        assert len({i[11:17] for i in ids}) == 2, "the pid part of the ids: both workers"
        await wait_until(lambda: sum(" delivered " in x for x in relay.lines) == 60, 10)
        assert _deliverers(relay) == {0, 1}, relay.stderr
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "status", "--json", "--config", str(config),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await status.communicate()
        processes = json.loads(out)["server"]["processes"]
        assert sorted((p["role"], p["pid"]) for p in processes) == [
            ("supervisor", relay.proc.pid), ("worker 0", pids[0]), ("worker 1", pids[1])]
        assert await relay.stop() == 0
        assert sum("relay: stopped" in x for x in relay.lines) == 2
    finally:
        await relay.kill()


async def test_a_killed_worker_is_restarted_and_nothing_it_held_is_lost(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.delay("DATA", 0.3)  # sends in flight when the deliverer dies
    relay, pids = await _spawn(tmp_path, write_config(tmp_path, upstream))
    try:
        replies = await send_many(relay.port, [message(f"k{i}") for i in range(20)],
                                  sessions=4)
        assert all(code == 250 for code, _ in replies), replies
        await upstream.wait_for_messages(2, timeout=20)
        # (Every worker delivers.) The one seen holding claims: under load either may
        # hold none for a moment, and then nothing would be recovered.
        victim = pids[0]
        for _ in range(250):
            holders = [p for p in pids if _claims_of(tmp_path / "queue.sqlite3", p)]
            if holders:
                victim = holders[0]
                break
            await asyncio.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: any("worker_restarted" in x for x in relay.lines), 20)
        upstream.delay("DATA", 0)
        await wait_until(lambda: set(_subjects(upstream))
                         >= {f"k{i}".encode() for i in range(20)}, timeout=30)
        assert any(f"worker_exited worker={pids.index(victim)}" in x
                   for x in relay.lines), relay.stderr
        # What it was sending went back to the queue when the parent saw it die.
        assert re.search(r"supervisor: recovered count=[1-9]", relay.stderr), relay.stderr
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_sighup_reaches_every_worker_and_a_bad_file_reaches_none(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """An unchanged file reloads quietly in every worker: worker 1, which runs with
    metrics off, compares like with like (a3 #8: a false "metrics changed" note); and
    `--workers 3` beside a file without `workers` (auto: 2 here) is no "workers changed"
    (a4 #3)."""
    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    data["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": free_port()}
    config.write_text(yaml.safe_dump(data))
    relay, _ = await _spawn(tmp_path, config, workers=3)
    try:
        relay.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: sum("relay: reloaded" in x for x in relay.lines) == 3, 20)
        await asyncio.sleep(0.3)  # a note is logged just after its worker's "reloaded"
        assert not any("reload_note" in x for x in relay.lines), relay.stderr
        good = config.read_text()
        config.write_text(good + "\nnot_a_key: 1\n")
        relay.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any("relay.supervisor: reload_rejected" in x
                                     for x in relay.lines), 20)
        await asyncio.sleep(0.5)
        assert sum("relay: reloaded" in x for x in relay.lines) == 3
        assert not any("relay: reload_rejected" in x for x in relay.lines), relay.stderr
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_workers_that_cannot_start_make_the_parent_exit_non_zero(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    taken = socket.socket()  # a listener without SO_REUSEPORT holds the port
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = write_config(tmp_path, upstream, listen_port=taken.getsockname()[1])
        relay = await RelayProcess.spawn(config, cwd=tmp_path, workers=2)
        try:
            assert await relay.exit_code(within=30) == 1
            assert "start_failed" in relay.stderr
        finally:
            await relay.kill()
    finally:
        taken.close()


def test_more_than_64_workers_is_refused_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"workers": 65, "accounts": {
        "up": {"transport": "maildir", "path": str(tmp_path / "md")}},
        "routing": {"default_account": "up"}}))
    assert main(["check-config", "--config", str(path)]) == 2
    assert "workers: 65 workers: use 1 to 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(path), "--workers", "0"])
    assert "--workers" in capsys.readouterr().err


async def test_one_metrics_endpoint_counts_every_worker_and_the_queue_once(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    metrics_port = free_port()
    data["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": metrics_port}
    config.write_text(yaml.safe_dump(data))
    relay, _ = await _spawn(tmp_path, config)
    try:
        replies = await send_many(relay.port, [message(f"c{i}") for i in range(30)],
                                  sessions=15)
        ids = {text.split()[-1] for code, text in replies if code == 250}
        assert len(ids) == 30 and len({i[11:17] for i in ids}) == 2, "both workers received"
        await upstream.wait_for_messages(30, timeout=30)

        async def scrape(path: str) -> tuple[int, str]:
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{metrics_port}{path}") as response:
                return response.status, await response.text()

        async def delivered() -> bool:
            _, text = await scrape("/metrics")
            return 'relay_queue_messages{account="up",state="delivered"} 30.0' in text

        await wait_until_async(delivered, timeout=20)
        status, text = await scrape("/metrics")
        assert status == 200
        assert "relay_messages_received_total 30.0" in text  # both workers' counters, summed
        assert 'relay_messages_delivered_total{account="up"} 30.0' in text
        assert (await scrape("/readyz"))[0] == 200
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_queue_commands_act_while_several_workers_run(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream)
    relay, _ = await _spawn(tmp_path, config)
    later = formatdate(time.time() + 3600)
    try:
        replies = await send_many(
            relay.port, [message(f"h{i}", headers={"Deferred-Delivery": later})
                         for i in range(6)], sessions=6)
        ids = [text.split()[-1] for code, text in replies if code == 250]
        assert len(ids) == 6

        async def queue(*args: str) -> int:
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "queue", *args, "--config", str(config),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            return await cli.wait()

        assert await queue("hold", *ids) == 0
        assert await queue("release", *ids) == 0  # due now: the deliverer sends them
        await upstream.wait_for_messages(6, timeout=20)
        assert sorted(_subjects(upstream)) == sorted(f"h{i}".encode() for i in range(6))
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_rate_limit_and_max_connections_hold_across_workers(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Measured at the upstream: never more than per_second sends in any second, nor more
    than max_connections connections, whichever workers received and send the messages.
    Sends are slow (0.3 s at DATA): a send counts from its claim to its end."""
    upstream.delay("DATA", 0.3)
    config = write_config(tmp_path, upstream, rate_limit={"per_second": 5},
                          pool={"max_connections": 2})
    relay, _ = await _spawn(tmp_path, config)
    try:
        replies = await send_many(relay.port, [message(f"r{i}") for i in range(16)],
                                  sessions=16)
        ids = [text.split()[-1] for code, text in replies if code == 250]
        assert len(ids) == 16 and len({i[11:17] for i in ids}) == 2, "both workers received"
        await upstream.wait_for_messages(16, timeout=30)
        times = sorted(m.received_at for m in upstream.messages)
        busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
        assert busiest <= 5, times
        assert upstream.connections_open_peak <= 2
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_workers_stop_when_their_supervisor_is_killed(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    relay, pids = await _spawn(tmp_path, write_config(tmp_path, upstream))
    try:
        relay.proc.kill()
        await relay.proc.wait()

        def running(pid: int) -> bool:
            try:  # a zombie (exited, not yet reaped by init) counts as stopped
                return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
            except OSError:
                return False

        def gone() -> bool:
            return not any(running(pid) for pid in pids)

        await wait_until(gone, timeout=15)
    finally:
        await relay.kill()


def test_a_worker_that_keeps_dying_waits_longer_each_time() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0, 0.5, 1, 2, 4, 8, 16, 30]


def test_a_dead_workers_account_gauges_leave_the_endpoint(tmp_path: Path) -> None:
    """A worker killed while its account was backed off: once the supervisor forgets it,
    relay_account_backoff must not keep its 1 (found by a tester: the gauges used the
    multiprocess mode that keeps every process's value for ever, and the alert fired)."""
    script = (
        "import os, sys\n"
        "from prometheus_client import CollectorRegistry\n"
        "from relay.observe.metrics import Metrics\n"
        "metrics = Metrics(CollectorRegistry(), ['up'])\n"
        "metrics.account_backoff.labels('up').set(1)\n"
        "metrics.account_paused.labels('up').set(1)\n"
        "print(os.getpid())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    pid = int(done.stdout.strip())

    def values(name: str) -> list[float]:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(tmp_path))  # type: ignore[no-untyped-call]
        return [s.value for m in registry.collect() for s in m.samples if s.name == name]

    assert values("relay_account_backoff") == [1.0]
    forget_process(pid, str(tmp_path))
    assert values("relay_account_backoff") == [] and values("relay_account_paused") == []


async def test_a_second_sigterm_skips_the_workers_drain_delay(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """As with one process (docs/configuration.md, shutdown.drain_delay): the supervisor
    passes a second SIGTERM on (found by a tester: it waited the whole delay)."""
    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    data["shutdown"] = {"drain_delay": "20s", "grace": "1s"}
    config.write_text(yaml.safe_dump(data))
    relay, _ = await _spawn(tmp_path, config)
    try:
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.exit_code(within=15) == 0
        assert time.monotonic() - started < 15  # not the 20 s drain delay
    finally:
        await relay.kill()


# -- every worker delivers: limits held across them (relay.delivery.host) -----------------
DELIVERED_BY = re.compile(r"delivered .* worker=(\d+)")


def _deliverers(relay: RelayProcess) -> set[int]:
    return {int(m.group(1)) for x in relay.lines if (m := DELIVERED_BY.search(x))}


def _slot_owners(config: Path) -> list[str]:
    queue = yaml.safe_load(config.read_text())["queue"]["path"]
    with sqlite3.connect(queue) as db:
        return [r[0] for r in db.execute("SELECT owner FROM slots WHERE account='up'")]


async def test_max_connections_holds_across_three_delivering_workers(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Measured at the upstream: the most sessions logged in at once for the account."""
    upstream.delay("DATA", 0.1)
    config = write_config(tmp_path, upstream, pool={"max_connections": 2})
    relay, _ = await _spawn(tmp_path, config, workers=3)
    try:
        replies = await send_many(relay.port, [message(f"p{i}") for i in range(20)],
                                  sessions=15)
        assert all(code == 250 for code, _ in replies), replies
        await upstream.wait_for_messages(20, timeout=40)
        assert sorted(_subjects(upstream)) == sorted(f"p{i}".encode() for i in range(20))
        assert upstream.sessions_by_login_peak["user"] == 2, upstream.sessions_by_login_peak
        assert upstream.connections_open_peak <= 2
        await wait_until(lambda: sum(" delivered " in x for x in relay.lines) == 20, 10)
        assert len(_deliverers(relay)) >= 2, relay.stderr
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_a_refused_login_costs_one_failed_login_per_backoff_step_for_the_host(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.fail_auth()
    config = write_config(tmp_path, upstream,
                          auth_backoff={"initial": "500ms", "max": "500ms"})
    relay, _ = await _spawn(tmp_path, config, workers=3)
    try:
        replies = await send_many(relay.port, [message(f"a{i}") for i in range(15)],
                                  sessions=15)
        assert all(code == 250 for code, _ in replies), replies
        assert len({text.split()[-1][11:17] for _, text in replies}) >= 2
        await asyncio.sleep(2.0)
        tries = upstream.times_of("AUTH")
        # One login, then one probe per 0.5 s step: never two within a step, whichever
        # of the three workers tries.
        assert 2 <= len(tries) <= 5, tries
        assert all(b - a >= 0.45 for a, b in itertools.pairwise(tries)), tries
        assert upstream.auth_successes == 0 and upstream.messages == []
        upstream.fail_auth(False)  # the password works again: the next probe gets through
        await upstream.wait_for_messages(15, timeout=20)
        await asyncio.sleep(0.5)
        assert sorted(_subjects(upstream)) == sorted(f"a{i}".encode() for i in range(15))
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_a_worker_killed_mid_send_leaves_its_slot_and_claims_to_the_others(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """One connection for the host: the worker that holds it is SIGKILLed while the
    upstream has its RCPT (the message not yet taken); another worker takes the slot at
    once (its lease is minutes long) and every message arrives exactly once."""
    upstream.delay("RCPT", 0.3)
    config = write_config(tmp_path, upstream, pool={"max_connections": 1})
    relay, pids = await _spawn(tmp_path, config, workers=3)
    try:
        replies = await send_many(relay.port, [message(f"x{i}") for i in range(8)],
                                  sessions=8)
        assert all(code == 250 for code, _ in replies), replies
        await upstream.wait_for_messages(2, timeout=20)
        await wait_until(lambda: len(upstream.times_of("RCPT")) > len(upstream.messages), 10)
        (holder,) = _slot_owners(config)
        victim = int(holder.split(":")[1])
        assert victim in pids
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        await upstream.wait_for_messages(8, timeout=30)
        assert time.monotonic() - started < 20, "the slot waited for its lease"
        await asyncio.sleep(0.5)
        assert sorted(_subjects(upstream)) == sorted(f"x{i}".encode() for i in range(8))
        assert upstream.sessions_by_login_peak["user"] == 1
        assert all(f":{victim}:" not in owner for owner in _slot_owners(config))
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def test_a_backoff_shows_once_in_status_and_the_gauge_and_flush_ends_it_for_all(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.fail_auth()
    config = write_config(tmp_path, upstream, auth_backoff={"initial": "1h", "max": "1h"})
    data = yaml.safe_load(config.read_text())
    metrics_port = free_port()
    data["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": metrics_port}
    config.write_text(yaml.safe_dump(data))
    relay, _ = await _spawn(tmp_path, config)

    async def gauge() -> str:
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = await response.text()
        return next(x for x in text.splitlines() if x.startswith("relay_account_backoff{"))

    async def relay_cli(*args: str) -> bytes:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", *args, "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        return out

    try:
        replies = await send_many(relay.port, [message(f"g{i}") for i in range(10)],
                                  sessions=10)
        assert len({text.split()[-1][11:17] for _, text in replies}) == 2, "both received"
        await wait_until(lambda: upstream.auth_failures >= 1, 20)
        await asyncio.sleep(1.0)  # both workers have tried to claim since
        assert upstream.auth_failures == 1, "one login for the host, not one per worker"
        assert await gauge() == 'relay_account_backoff{account="up"} 1.0'
        health = json.loads(await relay_cli("status", "--json"))["accounts"]["up"]["health"]
        assert health["state"] == "auth_failing" and health["backoff_left_s"] > 3000
        upstream.fail_auth(False)
        await relay_cli("queue", "flush")  # ends the backoff in every worker
        await upstream.wait_for_messages(10, timeout=20)
        await wait_until_async(
            lambda: gauge_is(gauge, 'relay_account_backoff{account="up"} 0.0'), 10)
        health = json.loads(await relay_cli("status", "--json"))["accounts"]["up"]["health"]
        assert health["state"] == "ok"
        assert await relay.stop() == 0
    finally:
        await relay.kill()


async def gauge_is(read: Callable[[], Awaitable[str]], line: str) -> bool:
    return await read() == line
