"""What a delivery transport promises the scheduler (SMTP upstream, Maildir)."""

from __future__ import annotations

import collections
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from relay.errors import DeliveryError, TemporaryFailure
from relay.printable import escape
from relay.queue.types import QueuedMessage


@dataclass
class SendResult:
    """Outcome of one transaction that reached DATA (or refused every recipient).

    A failure of the whole transaction is raised as a DeliveryError instead.
    """

    accepted: list[str]
    refused: dict[str, DeliveryError] = field(default_factory=dict)
    reply: str = ""  # the reply to the final dot
    peer: str = ""  # host:port, for the log line
    via: str = ""  # the member account a group sent it through (relay.delivery.groups)


# Called before each further transaction of one send (the rest after '452 too many
# recipients', a retry on a fresh connection after a 421) with what the send achieved so
# far: records the recipients already accepted (a crash then resends only the rest), and
# returns once the account's rate limit allows one more transaction, which it counts.
Pace = Callable[["SendResult"], Awaitable[None]]


class Transport(Protocol):
    name: str

    @property
    def peer(self) -> str: ...

    async def send(
        self, sender: str, recipients: list[str], body: bytes, mail_options: tuple[str, ...],
        *, pace: Pace | None = None,
    ) -> SendResult: ...

    async def close(self) -> None: ...

    def open_connections(self) -> int: ...


@runtime_checkable
class PoolControl(Protocol):
    """A transport whose usable connections vary (UpstreamPool): the scheduler sends no
    more at once, and claims no more ahead, than it has connections."""

    @property
    def capacity(self) -> int:
        """Connections the server lets us have now (421 "too many connections" lowers it)."""

    def end_login_hold(self) -> None:
        """An operator asked to try now (`relay queue flush`): allow the next login."""


class Transcript:
    """The SMTP conversation of one delivery attempt (`relay queue show --transcript`):
    commands and replies, never a message body or an AUTH payload (the SMTP edge masks
    those before they get here). Bounded: the first HEAD and the last TAIL lines (the
    final reply is at the end), each at most MAX_LINE characters, control characters
    escaped."""

    HEAD, TAIL, MAX_LINE = 80, 40, 300

    def __init__(self) -> None:
        self._head: list[str] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=self.TAIL)
        self._seen = 0

    def client(self, line: str) -> None:
        self._add(f"C: {line}")

    def server(self, code: int, text: str) -> None:
        """A reply; each line of a multi-line one as the server wrote it (250-...)."""
        lines = text.split("\n")
        for i, line in enumerate(lines):
            self._add(f"S: {code}{' ' if i == len(lines) - 1 else '-'}{line}".rstrip())

    def note(self, text: str) -> None:
        self._add(f"-- {text}")

    def _add(self, line: str) -> None:
        self._seen += 1
        line = escape(line)[: self.MAX_LINE]
        if len(self._head) < self.HEAD:
            self._head.append(line)
        else:
            self._tail.append(line)

    def lines(self) -> tuple[str, ...]:
        left_out = self._seen - len(self._head) - len(self._tail)
        gap = (f"-- {left_out} lines not kept",) if left_out else ()
        return (*self._head, *gap, *self._tail)


# The transcript of the attempt the current task makes (set by the delivery worker
# around Transport.send; each send runs in a task of its own). None: not recorded.
TRANSCRIPT: contextvars.ContextVar[Transcript | None] = contextvars.ContextVar(
    "relay_transcript", default=None)
# The queued message the current task sends (set beside TRANSCRIPT): a group's transport
# holds it in its member's rate windows by id, at its priority (relay.delivery.groups).
SENDING: contextvars.ContextVar[QueuedMessage | None] = contextvars.ContextVar(
    "relay_sending", default=None)


class SlotsHeldElsewhere(TemporaryFailure):
    """No connection for this message in this process: the other workers hold every
    connection slot of the account, and this one has none that could come back. The
    message goes back to the queue unsent, for a worker with a connection."""

    def __init__(self) -> None:
        super().__init__("every connection slot is held by other workers", offered=False)


class HostShare(Protocol):
    """An account's connections and logins as every worker process shares them
    (relay.delivery.host.HostAccount): the pool holds a slot for each connection it has
    open, and logs in only in the host's login turn."""

    @property
    def share(self) -> int:
        """The most connections this process opens (its part of max_connections)."""

    @property
    def starved(self) -> bool:
        """The last connection wanted found every slot held by other processes."""

    async def try_slot(self) -> int | None:
        """A connection slot of the host's pool.max_connections, or None: all are held
        by other processes."""

    async def take_slot(self) -> int:
        """A connection slot of the host's pool.max_connections; waits for one."""

    async def give_slot(self, slot: int) -> None:
        """The connection on ``slot`` closed. Never raises."""

    async def begin_login(self) -> None:
        """Wait for the host's login turn; TemporaryFailure while the account backs off."""

    async def end_login(self, refused_hold_s: float | None) -> None:
        """End the turn; ``refused_hold_s``: the login was refused, no process logs in for
        that long."""
