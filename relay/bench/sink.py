"""The servers the benchmark starts besides relay, each in its own process.

- ``python -m relay.bench.sink``: a bare aiosmtpd server that answers 250 and keeps
  nothing. It is the baseline relay's ingest is compared with, and the counting sink when
  Postfix's smtp-sink is not installed. It prints ``listening PORT`` once bound and, with
  ``--count``, ``mesg=N`` after each message, the counter ``smtp-sink -c`` prints too.
- ``Sink``: a counting sink (smtp-sink, else the bare server) and the time it got N.
- ``PostfixInstance``: a private Postfix with its own config, queue and data directories,
  listening on one loopback port and relaying to the sink; it never touches /etc/postfix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay.runner import run

HOST = "127.0.0.1"
_COUNTER = re.compile(rb"mesg=(\d+)")
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class BenchSetupError(Exception):
    """A server the benchmark needs could not be started."""


def find_tool(name: str) -> str | None:
    """A Postfix program on PATH or in /usr/sbin (often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def free_port() -> int:
    """A loopback port free right now, for programs that cannot bind port 0 and report it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_for_banner(
    port: int, deadline: float, proc: asyncio.subprocess.Process | None = None
) -> None:
    """Poll until the server on ``port`` greets with 220, or its process exits."""
    while True:
        if proc is not None and proc.returncode is not None:
            raise BenchSetupError(f"exited with status {proc.returncode} before listening")
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.perf_counter() > deadline:
                raise BenchSetupError(f"nothing listening on port {port}") from None
            await asyncio.sleep(0.01)
            continue
        try:
            line = await asyncio.wait_for(reader.readline(), max(deadline - time.perf_counter(), 1))
            if line.startswith(b"220"):
                writer.write(b"QUIT\r\n")
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(reader.readline(), 1)
                return
        finally:
            writer.close()
        raise BenchSetupError(f"port {port} greeted with {line[:60]!r}")


async def until(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout_s`` has passed (False)."""
    deadline = time.perf_counter() + timeout_s
    while not check():
        if time.perf_counter() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a `relay serve --workers N` and its workers)."""
    pids = [pid]
    for parent in pids:  # grows as children are found
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids.extend(int(c) for c in children)
    return pids


def rss_mb(pid: int) -> float | None:
    """Resident set size of a live process and its children, in MiB (Linux /proc)."""
    total = None
    for one in _tree(pid):
        try:
            status = Path(f"/proc/{one}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            total = (total or 0.0) + int(match.group(1)) / 1024
    return total


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used so far by a live process and its children (Linux
    /proc; children that ended are not counted)."""
    total = None
    for one in _tree(pid):
        try:
            stat = Path(f"/proc/{one}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class ServerProcess:
    """A server in a subprocess that the benchmark starts, reads and stops."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)

    async def __aenter__(self) -> ServerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class BareServer(ServerProcess):
    """``python -m relay.bench.sink``: answers 250 to everything, stores nothing."""

    def __init__(self, *, count: bool = False) -> None:
        super().__init__("aiosmtpd sink" if count else "bare aiosmtpd")
        self.count = count

    async def start(self, timeout_s: float = 30.0) -> None:
        args = [sys.executable, "-m", "relay.bench.sink"] + (["--count"] if self.count else [])
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError:
            line = b""
        match = re.match(rb"listening (\d+)", line)
        if not match:
            await self.stop()
            raise BenchSetupError(f"{self.name} did not start (said {line[:80]!r})")
        self.port = int(match.group(1))

    async def __aenter__(self) -> BareServer:
        await self.start()
        return self


class Sink:
    """A counting sink in a subprocess; reads its counter to learn when N have arrived."""

    def __init__(self, smtp_sink: str | None) -> None:
        self.smtp_sink = smtp_sink
        self.kind = "smtp-sink" if smtp_sink else "aiosmtpd"
        self.server: ServerProcess | None = None
        self.count = 0
        self._target = 0
        self._reached_at: float | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self, timeout_s: float = 30.0) -> None:
        if self.smtp_sink is None:
            bare = BareServer(count=True)
            self.server = bare
            await bare.start(timeout_s)
        else:
            self.server = ServerProcess("smtp-sink")
            self.server.port = free_port()
            # -c: print counters; -u: the user to run as (required when started as root).
            user = ["-u", "postfix"] if os.geteuid() == 0 else []
            self.server.proc = await asyncio.create_subprocess_exec(
                self.smtp_sink,
                "-c",
                *user,
                f"{HOST}:{self.server.port}",
                "256",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await wait_for_banner(
                    self.server.port, time.perf_counter() + timeout_s, self.server.proc
                )
            except BenchSetupError as exc:
                await self.stop()
                raise BenchSetupError(f"smtp-sink: {exc}") from None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.server is not None and self.server.proc is not None
        stream = self.server.proc.stdout
        assert stream is not None
        while chunk := await stream.read(65536):
            counts = _COUNTER.findall(chunk)
            if counts:
                self.count = max(self.count, int(counts[-1]))
                if self._reached_at is None and self._target and self.count >= self._target:
                    self._reached_at = time.perf_counter()
                self._changed.set()

    def expect(self, n: int) -> None:
        """Note the time the count reaches ``n`` (call before sending)."""
        self._target = self.count + n
        self._reached_at = None

    async def wait(self, timeout_s: float) -> float | None:
        """perf_counter() time at which the expected count arrived; None on timeout."""
        deadline = time.perf_counter() + timeout_s
        while self._reached_at is None:
            self._changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self._reached_at

    async def settle(self, quiet_s: float = 0.5, timeout_s: float = 10.0) -> int:
        """The count once it has not changed for ``quiet_s`` (to catch duplicates)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), quiet_s)
            except TimeoutError:
                break
        return self.count

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# -- a private Postfix ------------------------------------------------------------------

# The daemons a relaying Postfix needs, none chrooted (the queue lives in a temp dir).
# No "smtp inet" line: the only listener is the loopback port given at start.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{host}]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
# Five deliveries at once, like relay's pool.max_connections: 5.
default_destination_concurrency_limit = 5
initial_destination_concurrency = 5
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
"""

# Delivery paused: every accepted message goes to the hold queue (still written and synced).
_HOLD = "smtpd_recipient_restrictions = check_client_access static:HOLD, permit\n"


def postfix_problem() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if find_tool("postfix") is None:
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master process runs as root)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or postdrop group is missing"
    return None


class PostfixInstance:
    """Postfix with its own config_directory, queue_directory and data_directory."""

    def __init__(self, root: Path, *, sink_port: int, hold: bool) -> None:
        self.root = root
        self.sink_port = sink_port
        self.hold = hold
        self.port = 0
        self.started = False
        self.postfix = find_tool("postfix") or "postfix"

    def _write_config(self) -> None:
        etc = self.root / "etc"
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Postfix's daemons run as the postfix user: they must reach and own these.
        self.root.chmod(0o755)
        for parent in self.root.resolve().parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise BenchSetupError(
                    f"the postfix user cannot enter {parent} (chmod o+x it, or use --workdir)"
                )
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"{HOST}:{self.port}"))
        main = _MAIN_CF.format(root=self.root, host=HOST, sink_port=self.sink_port)
        (etc / "main.cf").write_text(main + (_HOLD if self.hold else ""))

    async def _postfix(self, *command: str, timeout_s: float = 60.0) -> int:
        proc = await asyncio.create_subprocess_exec(
            self.postfix,
            "-c",
            str(self.root / "etc"),
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return " | ".join(text.strip().splitlines()[-lines:])

    async def start(self, timeout_s: float = 60.0) -> None:
        self.port = free_port()
        self._write_config()
        code = await self._postfix("start", timeout_s=timeout_s)
        self.started = True
        if code != 0:
            await self.stop()
            raise BenchSetupError(f"postfix start failed ({code}): {self.log_tail()}")
        try:
            await wait_for_banner(self.port, time.perf_counter() + timeout_s)
        except BenchSetupError as exc:
            await self.stop()
            raise BenchSetupError(f"postfix: {exc}: {self.log_tail()}") from None

    def queued(self, queues: Sequence[str] = POSTFIX_QUEUES) -> int:
        """Queue files in the given queues (not yet delivered)."""
        total = 0
        for name in queues:
            for _dirpath, _dirs, files in os.walk(self.root / "queue" / name):
                total += len(files)
        return total

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        await self._postfix("stop")
        if pid is not None and not await until(lambda: not _alive(pid), 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def __aenter__(self) -> PostfixInstance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (reaped by nobody) is not running
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# -- the bare aiosmtpd server ------------------------------------------------------------


class _Handler:
    def __init__(self, count: bool) -> None:
        self.count = count
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        if self.count:
            sys.stdout.write(f"mesg={self.received}\n")
            sys.stdout.flush()
        return "250 2.0.0 OK"


async def _serve(port: int, count: bool) -> None:
    from aiosmtpd.smtp import SMTP

    handler = _Handler(count)
    hostname = socket.gethostname()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        # The same session settings as relay's listener (relay/ingest/listener.py).
        return SMTP(
            handler,
            data_size_limit=26_214_400,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="relay-bench",
            timeout=300.0,
            loop=loop,
        )

    server = await loop.create_server(factory, host=HOST, port=port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"listening {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay.bench.sink", description="A bare aiosmtpd server: 250 to everything."
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--count", action="store_true", help="print mesg=N after each message")
    args = parser.parse_args(argv)
    run(_serve(args.port, args.count))  # the same event loop as `relay serve`
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
