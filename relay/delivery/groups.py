"""Account groups (``routing.groups``): a group's mail goes through one of its accounts,
decided at each attempt.

A group is queued under its own name and has its own worker (relay.delivery.worker),
whose transport is a ``GroupTransport``: for each send it asks each member account, in
the group's order, whether it may send now (not backing off, not paused, under its rate
limits) and sends through the first that may. An account-level failure (down, AUTH,
quota: ``DeliveryError.account_wide``) backs that member off and moves the same send on
to the next member at once; a refusal of a recipient or of the message (4xx, 5xx) is the
answer, as for any account. ``order`` is pure; the transport only composes the members'
transports. The member's own ``rewrite`` applies to what it sends (its envelope sender
and From), as to its own mail.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from relay.delivery.rewrite import Rewrite, rewritten
from relay.delivery.transport import Pace, SendResult, Transport
from relay.errors import DeliveryError, TemporaryFailure


@dataclass(frozen=True)
class Group:
    name: str
    accounts: tuple[str, ...]
    mode: str = "failover"  # or "weighted"
    weights: Mapping[str, int] | None = None


def order(group: Group, rng: random.Random) -> list[str]:
    """The members in the order to try them: the list's order (failover), or a draw by
    weight without replacement (weighted: a member with weight 3 comes first three times
    as often as one with weight 1; the others follow as fallbacks)."""
    if group.mode != "weighted" or not group.weights:
        return list(group.accounts)
    left = list(group.accounts)
    drawn = []
    while left:
        pick = rng.choices(left, weights=[group.weights[a] for a in left])[0]
        drawn.append(pick)
        left.remove(pick)
    return drawn


class Member(Protocol):
    """What the group needs of a member account's worker."""

    # accounts.NAME.rewrite: a message the member sends goes out as its own mail would.
    rewrite: Rewrite | None

    def may_send(self) -> bool:
        """Not backing off, not paused, and its rate limits allow one more send now."""

    def reserve_send(self) -> None:
        """Count one send in the member's rate limits (until ``end_send``)."""

    def end_send(self) -> None: ...

    def account_failed(self, error: DeliveryError) -> None:
        """An account-level failure through the group: the member backs off."""

    def note_reply(self, sent: SendResult | DeliveryError) -> None:
        """What the member's upstream answered: a "slow down" throttles the member."""


class GroupTransport:
    """A Transport over the member accounts' own transports (their pools and limits)."""

    def __init__(self, group: Group, transports: Mapping[str, Transport],
                 members: Callable[[str], Member | None], rng: random.Random,
                 paused: Callable[[], Awaitable[Collection[str]]] | None = None) -> None:
        self.name = group.name
        # The accounts paused in the queue (`relay accounts pause`), read at each send:
        # a member's own flag is a polled copy, which lags a pause by up to a poll.
        self._paused = paused
        self.group = group
        self._transports = transports  # live: a reload's new pools are used at once
        self._members = members
        self._rng = rng
        self.last_peer = ""

    @property
    def peer(self) -> str:
        return self.last_peer or f"group {self.name}"

    async def send(self, sender: str, recipients: list[str], body: bytes,
                   mail_options: tuple[str, ...], *, pace: Pace | None = None
                   ) -> SendResult:
        last: DeliveryError | None = None
        paused = () if self._paused is None else await self._paused()
        for name in order(self.group, self._rng):
            member, transport = self._members(name), self._transports.get(name)
            if (member is None or transport is None or name in paused
                    or not member.may_send()):
                continue
            member.reserve_send()
            self.last_peer = transport.peer  # for the log line of a failure, too
            try:
                own_sender, own_body = rewritten(member.rewrite, sender, body)
                result = await transport.send(own_sender, recipients, own_body, mail_options,
                                              pace=pace)
            except DeliveryError as exc:
                exc.via = name
                member.note_reply(exc)
                if not exc.account_wide:
                    raise
                member.account_failed(exc)
                last = exc
                continue
            finally:
                member.end_send()
            member.note_reply(result)
            refused = next((e for e in result.refused.values() if e.account_wide), None)
            if refused is not None:  # Gmail's 5.4.5 quota at RCPT: the member's, not ours
                refused.via = name
                member.account_failed(refused)
                if not result.accepted:  # nothing sent: the next member, in this attempt
                    last = refused
                    continue
            result.via = name
            return result
        if last is not None:
            raise last  # every member that could send failed account-wide: the group backs off
        raise TemporaryFailure(
            f"no account of group {self.name} may send now (each is backing off, paused or"
            " at its rate limit)", offered=False)

    async def close(self) -> None:
        """The members' transports are closed with their accounts."""

    def open_connections(self) -> int:
        return 0  # counted by each member's own transport
