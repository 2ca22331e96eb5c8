"""relay's own SMTP channel over a connection aiosmtplib opened: writes commands (the whole
envelope in one write where the server offers PIPELINING, RFC 2920) and reads replies in
order; aiosmtplib reads one reply per command, so it cannot pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from relay.delivery.smtp.errors import ChannelClosed, ServiceClosing
from relay.delivery.transport import TRANSCRIPT
from relay.smtp import wire as smtpwire
from relay.smtp.wire import Reply

log = logging.getLogger("relay.upstream")
class Channel(asyncio.Protocol):
    """An authenticated upstream session: writes commands, reads replies in order."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reader = smtpwire.ReplyReader()
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed_because: str | None = None
        self.replies_read = 0
        transport.set_protocol(self)

    @property
    def is_connected(self) -> bool:
        return self._closed_because is None and not self._transport.is_closing()

    # -- asyncio.Protocol ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            self._replies.extend(self._reader.feed(data))
        except smtpwire.WireError as exc:
            self._end(f"upstream broke the protocol: {exc}")
            self._transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._end("upstream closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "upstream closed the connection")

    def _end(self, why: str) -> None:
        if self._closed_because is None:
            self._closed_because = why
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the pool ----------------------------------------------------------------
    def write(self, *chunks: bytes) -> None:
        if self._replies:
            # A reply nobody asked for (a 421 before an idle close): out of step.
            raise ChannelClosed(f"upstream said unasked: {self._replies[0]}")
        if not self.is_connected:
            raise ChannelClosed(self._closed_because or "connection closed")
        self._transport.writelines(chunks)
        transcript = TRANSCRIPT.get()
        if transcript is not None:
            for chunk in chunks:
                for line in chunk.decode("utf-8", "replace").splitlines():
                    transcript.client(line)

    def write_body(self, chunks: list[bytes], size: int) -> None:
        """The message's lines and the final dot: in the transcript as their size only."""
        transcript = TRANSCRIPT.get()
        TRANSCRIPT.set(None)
        try:
            self.write(*chunks)
        finally:
            TRANSCRIPT.set(transcript)
        if transcript is not None:
            transcript.note(f"message body, {size} bytes")
            transcript.client(".")

    async def reply(self, within: float) -> Reply:
        if not self._replies and self._closed_because is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(within):
                    await self._waiter
            finally:
                self._waiter = None
        if not self._replies:
            raise ChannelClosed(self._closed_because or "connection closed")
        self.replies_read += 1
        reply = self._replies.popleft()
        transcript = TRANSCRIPT.get()
        if transcript is not None:
            transcript.server(reply.code, reply.text)
        if reply.code == 421:
            # The session is over even if the server leaves the socket open (Exim's "too
            # many messages in this connection" at MAIL): never RSET and reuse it.
            self._end(str(reply))
            self._transport.close()
            raise ServiceClosing(reply)
        return reply

    async def command(self, line: bytes, within: float) -> Reply:
        self.write(line)
        return await self.reply(within)

    def close(self) -> None:
        self._end("closed by relay")
        self._transport.close()


@dataclass(eq=False)
class Connection:
    channel: Channel
    extensions: frozenset[str]  # lower-case EHLO keywords
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    slot: int | None = None  # its connection slot when workers share the pool (HostShare)
