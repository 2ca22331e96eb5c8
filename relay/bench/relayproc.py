"""relay as `relay bench` runs it: a `python -m relay serve` process on a fresh queue, and
what the bench reads from a queue file (states, a file of delivered records) and from
/metrics.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from relay.bench.sink import (
    HOST,
    BenchSetupError,
    ServerProcess,
    free_port,
    wait_for_banner,
)
from relay.config.loading import parse_config


class RelayProcess(ServerProcess):
    """``python -m relay serve`` with one account, on a queue file under ``root``."""

    def __init__(self, root: Path, *, upstream_port: int, commit: str = "group",
                 workers: int = 1) -> None:
        super().__init__("relay")
        self.root = root
        self.queue = root / "queue.sqlite3"
        self.upstream_port = upstream_port
        self.commit = commit
        self.workers = workers
        self.startup_s = 0.0
        self.metrics_port = 0

    def config(self) -> dict[str, Any]:
        return {
            "listen": {"host": HOST, "port": self.port},
            "queue": {"path": str(self.queue), "commit": self.commit},
            "metrics": {"enabled": True, "host": HOST, "port": self.metrics_port},
            "logging": {"level": "info", "format": "text"},
            "workers": self.workers,
            "accounts": {
                "sink": {
                    "host": HOST,
                    "port": self.upstream_port,
                    "tls": "none",
                    "pool": {"max_connections": 5},
                }
            },
            "routing": {"default_account": "sink"},
        }

    async def start(self, timeout_s: float = 60.0) -> None:
        """Spawn and wait for the 220 greeting; startup_s is the time that took."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        parse_config(self.config())  # fail here, not in the child, on a bad config
        path = self.root / "relay.yaml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        log = self.root / "relay.log"
        started = time.perf_counter()
        with log.open("ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay",
                "serve",
                "--config",
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            await wait_for_banner(self.port, started + timeout_s, self.proc)
        except BenchSetupError as exc:
            await self.stop()
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise BenchSetupError(f"relay: {exc}: {tail}") from None
        self.startup_s = time.perf_counter() - started

    async def __aenter__(self) -> RelayProcess:
        await self.start()
        return self


async def queue_states(path: Path, *, drained_within_s: float = 0.0) -> dict[str, int]:
    """Messages per state in a queue file (through relay's store, as `relay queue` does).

    With ``drained_within_s``, poll until nothing is queued, deferred or sending.
    """
    from relay.queue.sqlite.store import SQLiteStore

    store = SQLiteStore(path, lock=False)
    await store.open()
    deadline = time.perf_counter() + drained_within_s
    try:
        while True:
            states: dict[str, int] = {}
            for (_account, state), n in (await store.counts()).items():
                states[state] = states.get(state, 0) + n
            pending = sum(states.get(s, 0) for s in ("queued", "deferred", "sending"))
            if not pending or time.perf_counter() >= deadline:
                return states
            await asyncio.sleep(0.1)
    finally:
        await store.close()


async def fill_delivered(path: Path, n: int, *, account: str) -> None:
    """A new queue file holding ``n`` delivered messages, each with one attempt, a day
    old (through the store in one statement: a million over SMTP would take the run)."""
    from relay.queue.sqlite.store import SQLiteStore

    store = SQLiteStore(path, lock=False)
    await store.open()
    try:
        await store.add_delivered_records(n, account=account, at=time.time() - 86400)
    finally:
        await store.close()


async def scrape_times(port: int, times: int) -> list[float]:
    """Seconds per GET /metrics, a new connection each, response read in full."""
    out = []
    for _ in range(times):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            response = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        out.append(time.perf_counter() - started)
        if not response.startswith(b"HTTP/1.1 200") and not response.startswith(b"HTTP/1.0 200"):
            raise BenchSetupError(f"GET /metrics answered {response[:40]!r}")
    return out
