"""The Maildir transport: deliver into new/ of a local Maildir (the no-upstream default).

Each file is written to tmp/, synced, then renamed into new/ (the Maildir protocol), so a
reader never sees half a message and a delivered message survives a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from relay.errors import TemporaryFailure
from relay.transport import SendResult

_counter = itertools.count()


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
        # Maildir files use the local newline; a Return-Path records the envelope sender.
        data = b"Return-Path: <" + sender.encode() + b">\n" + body.replace(b"\r\n", b"\n")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / "new" / unique)
        dir_fd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return unique

    async def send(
        self, sender: str, recipients: list[str], body: bytes, mail_options: tuple[str, ...]
    ) -> SendResult:
        try:
            unique = await asyncio.to_thread(self._deliver, sender, body)
        except OSError as exc:
            raise TemporaryFailure(f"maildir {self.path}: {exc.strerror}") from None
        return SendResult(
            accepted=list(recipients), reply=f"250 2.0.0 saved as {unique}", peer=self.peer
        )

    async def close(self) -> None:
        return None

    def open_connections(self) -> int:
        return 0
