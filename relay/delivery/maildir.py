"""The Maildir transport: deliver into new/ of a local Maildir (the no-upstream default).

Each file is written to tmp/, synced, then renamed into new/ (the Maildir protocol), so a
reader never sees half a message and a delivered message survives a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import time
from pathlib import Path

from relay.delivery.transport import Pace, SendResult
from relay.errors import TemporaryFailure

# A full disk or an exceeded disk quota refuses every message alike: the account backs
# off with one probe at a time instead of retrying each message on its own.
_ACCOUNT_WIDE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL = "disk_full"

_counter = itertools.count()


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a full or size-limited filesystem): loop."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # no progress and no error: treat as a full disk, never as done
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    """Sync a directory, so a rename into it survives a crash."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class MaildirTransport:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    @property
    def peer(self) -> str:
        return f"maildir:{self.path}"

    def _deliver(self, sender: str, body: bytes) -> str:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        now = time.time()
        unique = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{self._host}"
        tmp = self.path / "tmp" / unique
        new = self.path / "new" / unique
        # Maildir files use the local newline; a Return-Path records the envelope sender.
        data = b"Return-Path: <" + sender.encode() + b">\n" + body.replace(b"\r\n", b"\n")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
                written = os.fstat(fd).st_size
                if written != len(data):
                    raise OSError(errno.EIO, f"wrote {written} of {len(data)} bytes")
            finally:
                os.close(fd)
            os.rename(tmp, new)
        except BaseException:
            # A cut-off file must never reach new/: the message stays queued instead.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            _fsync_dir(self.path / "new")
        except OSError:
            # Not durable yet: take it back and retry, unless a reader already took it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new)
                raise
        return unique

    async def send(
        self, sender: str, recipients: list[str], body: bytes, mail_options: tuple[str, ...],
        *, pace: Pace | None = None,
    ) -> SendResult:
        try:
            unique = await asyncio.to_thread(self._deliver, sender, body)
        except OSError as exc:
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
            wide = DISK_FULL if exc.errno in _ACCOUNT_WIDE_ERRNOS else None
            raise TemporaryFailure(f"maildir {self.path}: {reason}",
                                   account_reason=wide) from None
        return SendResult(
            accepted=list(recipients), reply=f"250 2.0.0 saved as {unique}", peer=self.peer
        )

    async def close(self) -> None:
        return None

    def open_connections(self) -> int:
        return 0
