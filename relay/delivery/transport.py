"""What a delivery transport promises the scheduler (SMTP upstream, Maildir)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from relay.errors import DeliveryError


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
