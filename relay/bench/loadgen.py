"""The benchmark's load: Postfix's smtp-source when installed, or a built-in asyncio client.

Both send the same shape of message (five header lines, then ``size`` bytes of 80-octet
lines, as ``smtp-source -l size`` does) from ``sessions`` concurrent senders, either one
connection per message (how Django, Rails and PHP talk to a local relay) or over
persistent sessions. Only the built-in client times each reply to the final dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import time
from dataclasses import dataclass, field

SENDER = "bench@example.com"
RECIPIENT = "sink@example.com"
HELO = "bench.localdomain"
LINE = 78  # + CRLF: smtp-source's payload lines are 80 octets too
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int  # payload octets, headers not included (smtp-source -l)
    persistent: bool


@dataclass
class LoadResult:
    tool: str
    accepted: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def note(self, error: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(error)


def build_message(size: int) -> bytes:
    """Headers and ``size`` bytes of payload, dot-terminated (no line starts with '.')."""
    headers = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-Id: <{time.time_ns()}@{HELO}>\r\nSubject: relay bench\r\n\r\n"
    ).encode()
    lines: list[bytes] = []
    left = size
    while left > 0:
        text = (str(len(lines) + 1) + "X" * LINE)[: max(min(LINE, left - 2), 1)]
        lines.append(text.encode() + b"\r\n")
        left -= len(text) + 2
    return headers + b"".join(lines) + b".\r\n"


class SMTPReplyError(Exception):
    """The server answered something other than what the step expects."""


class _Client:
    """A lock-step SMTP client on asyncio streams, lean so the load is cheap to make."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Client:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            await client.expect(220)
            await client.command(f"EHLO {HELO}\r\n".encode(), 250)
        except BaseException:
            client.abort()
            raise
        return client

    async def expect(self, code: int) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                break
        if not line.startswith(str(code).encode()):
            raise SMTPReplyError(line.decode(errors="replace").strip())

    async def command(self, line: bytes, code: int) -> None:
        self.writer.write(line)
        await self.expect(code)

    async def send(self, message: bytes) -> float:
        """One transaction; return seconds from the final dot to the 250."""
        await self.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        await self.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        self.writer.write(message)
        sent_at = time.perf_counter()
        await self.writer.drain()
        await self.expect(250)
        return time.perf_counter() - sent_at

    async def quit(self) -> None:
        with contextlib.suppress(OSError, ConnectionError, SMTPReplyError):
            await self.command(b"QUIT\r\n", 221)
        self.abort()

    def abort(self) -> None:
        self.writer.close()


async def run_builtin(host: str, port: int, load: Load, *, timeout_s: float) -> LoadResult:
    """Send load.messages from load.sessions concurrent senders; time every ack."""
    message = build_message(load.size)
    result = LoadResult(tool="builtin")
    tickets = load.messages

    async def sender() -> None:
        nonlocal tickets
        client: _Client | None = None
        try:
            while tickets > 0:
                tickets -= 1
                try:
                    if client is None:
                        client = await _Client.open(host, port)
                    result.latencies_s.append(await client.send(message))
                    result.accepted += 1
                except (
                    OSError,
                    ConnectionError,
                    SMTPReplyError,
                    asyncio.IncompleteReadError,
                ) as exc:
                    result.note(f"{type(exc).__name__}: {exc}")
                    if client is not None:
                        client.abort()
                    client = None
                    continue
                if not load.persistent:
                    await client.quit()
                    client = None
        finally:
            if client is not None:
                await client.quit()

    started = time.perf_counter()
    tasks = [asyncio.create_task(sender()) for _ in range(load.sessions)]
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks)
    except TimeoutError:
        result.errors.append(f"timed out after {timeout_s:.0f} s")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.elapsed_s = time.perf_counter() - started
    return result


async def run_smtp_source(
    program: str, host: str, port: int, load: Load, *, timeout_s: float
) -> LoadResult:
    """Postfix's smtp-source; it stops at the first unexpected reply, so all or nothing."""
    args = [
        program,
        "-s",
        str(load.sessions),
        "-m",
        str(load.messages),
        "-l",
        str(load.size),
        "-M",
        HELO,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-S",
        "relay bench",
    ]
    if load.persistent:
        args.append("-d")
    args.append(f"{host}:{port}")
    result = LoadResult(tool="smtp-source")
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        result.elapsed_s = time.perf_counter() - started
        result.note(f"smtp-source timed out after {timeout_s:.0f} s")
        return result
    result.elapsed_s = time.perf_counter() - started
    if proc.returncode == 0:
        result.accepted = load.messages
    else:
        text = stderr.decode(errors="replace").strip().splitlines()
        result.note(f"smtp-source exit {proc.returncode}: {text[-1] if text else ''}")
        result.failed = load.messages
    return result


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
