"""`relay serve` as a real subprocess, for tests that kill it (tests/test_crash.py).

The same shapes as the helpers in tests/test_process.py, kept here so that other test
modules can use them without importing a test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import FAST_RETRY, upstream_account
from tests.upstream import FakeUpstream

STARTUP_DEADLINE_S = 20.0


HANGUP_EARLY = ("import os, signal, sys; import relay.cli as cli;"
                " os.kill(os.getpid(), signal.SIGHUP); sys.exit(cli.main())")


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, up: FakeUpstream, *, name: str = "relay.yaml",
                 listen_port: int | None = None, queue: dict[str, Any] | None = None,
                 **account: Any) -> Path:
    """A config file: one account `up` delivering to ``up``, the queue under tmp_path
    (or the ``queue`` block given: a PostgreSQL one)."""
    data = {
        "listen": {"host": "127.0.0.1", "port": listen_port or free_port()},
        "metrics": {"enabled": False},
        "queue": queue or {"path": str(tmp_path / "queue.sqlite3")},
        "retry": dict(FAST_RETRY),
        "logging": {"level": "info"},
        "accounts": {"up": upstream_account(up, tmp_path, **account)},
        "routing": {"default_account": "up"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


class RelayProcess:
    """A `relay serve` subprocess whose stderr is collected line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, config: Path) -> None:
        self.proc = proc
        self.port = int(yaml.safe_load(config.read_text())["listen"]["port"])
        self.lines: list[str] = []
        self.started = asyncio.Event()
        # Called from the reader the moment the `started` line arrives (before any waiter
        # wakes): how a supervisor that watches the log would react.
        self.on_started: Callable[[], None] | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, config: Path, cwd: Path, workers: int = 1, *,
                    hangup_early: bool = False, options: Sequence[str] = ()) -> RelayProcess:
        """``hangup_early``: the process sends itself SIGHUP right after the command line
        is imported, before `relay serve` has loaded its config or started."""
        start = ["-c", HANGUP_EARLY] if hangup_early else ["-m", "relay"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *start, "serve", "--config", str(config),
            "--workers", str(workers), *options,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, config)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if "relay: started " in line:
                if self.on_started is not None:
                    self.on_started()
                self.started.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    async def wait_started(self) -> None:
        """Wait for the `started` log line; fail early (with stderr) if the process exits."""
        exited = asyncio.ensure_future(self.proc.wait())
        started = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait({exited, started}, timeout=STARTUP_DEADLINE_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            started.cancel()
        if not self.started.is_set():
            await self.finish_reading()
            raise AssertionError(f"relay did not start (exit {self.proc.returncode}):\n"
                                 f"{self.stderr}")

    async def exit_code(self, within: float) -> int:
        """Wait for the process to exit; fail if it runs longer than ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                code = await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"relay still running after {within}s:\n{self.stderr}") from None
        await self.finish_reading()
        return code

    async def stop(self, within: float = 30) -> int:
        """SIGTERM, as an operator stops it; its exit code (see exit_code)."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.exit_code(within)

    async def finish_reading(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._reader

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self.finish_reading()
