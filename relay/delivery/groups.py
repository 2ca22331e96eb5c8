"""Account groups (``routing.groups``): a group's mail goes through one of its accounts,
decided at each attempt.

A group is queued under its own name and has its own worker (relay.delivery.worker),
whose transport is a ``GroupTransport``: for each send it asks each member account, in
the group's order, whether it may send now (not backing off, not paused, under its rate
limits) and sends through the first that may. An account-level failure (down, AUTH,
quota: ``DeliveryError.account_wide``) backs that member off and moves the same send on
to the next member at once, and so do the recipients a member refused for account
reasons while it took the others (its quota running out mid-message); a refusal of a
recipient or of the message (4xx, 5xx) is the answer, as for any account. ``order``,
``combined`` and ``moved_on`` are pure; the transport only composes the members'
transports. The member's own ``rewrite`` applies to what it sends (its envelope sender
and From), as to its own mail.

With several processes on one queue, a member's limits are the host's: before a send,
the member follows the backoff any process decided, takes the host's one probe, and
holds the message in its rate windows as the queue counts them (Member.take_send,
QueueStore.hold_send) until the outcome is recorded.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from relay.delivery.rewrite import Rewrite, rewritten
from relay.delivery.transport import (
    SENDING,
    TRANSCRIPT,
    Pace,
    SendResult,
    SlotsHeldElsewhere,
    Transport,
)
from relay.errors import DeliveryError, TemporaryFailure
from relay.queue.types import Priority, QueuedMessage


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

    def may_send(self, high: bool = False) -> bool:
        """Not backing off, not paused, and its rate limits allow one more send now, as
        this process knows them (``high``: of high priority, which may use the share
        reserve_for_high keeps)."""

    async def take_send(self, message_id: str, high: bool) -> bool:
        """What the processes on the queue share, before the message goes through this
        account: its backoff (one probe at a time across them) and its rate windows over
        all their sends (the message then holds a place in them until its outcome is
        recorded)."""

    async def let_go(self, message_id: str) -> None:
        """The message goes back unsent: its place in the member's windows is free."""

    async def store_progress(self, message: QueuedMessage, so_far: SendResult | None,
                             *, count: bool) -> None:
        """Store the recipients delivered so far; ``count``: and one send of the member
        now (one its outcome will not count: the attempt ended with another member)."""

    def reserve_send(self) -> None:
        """Count one send in the member's rate limits (until ``end_send``)."""

    async def next_transaction(self, high: bool, *, most: float = float("inf")) -> bool:
        """A further transaction of the send (after 452 "too many recipients"): the one
        before counts, the next is reserved; False if it cannot go within ``most``
        seconds."""

    def end_send(self) -> None: ...

    def cancel_send(self) -> None:
        """The send reserved did not happen: it does not count."""

    def account_failed(self, error: DeliveryError) -> None:
        """An account-level failure through the group: the member backs off."""

    def handed_on(self, message: QueuedMessage | None, result: SendResult,
                  rest: list[str]) -> None:
        """It delivered some recipients and refused ``rest`` for the account, which go
        to the next member: logged (the attempt's outcome names the last member)."""

    def note_reply(self, sent: SendResult | DeliveryError) -> None:
        """What the member's upstream answered: a "slow down" throttles the member."""


# How long a member's split send waits for its limits to allow the next transaction
# before the recipients left go to the next member (a per-second limit: the wait; a
# per-minute one: the next member).
SPLIT_WAIT_S = 2.0


class MemberBusy(TemporaryFailure):
    """A member cannot take a split send's next transaction now: the recipients left go
    to the next member (relay.delivery.groups._Attempt.moves_on), and the member is not
    backed off for it."""

    def __init__(self, member: str) -> None:
        super().__init__(f"{member} may not send the next transaction now (paused, backing"
                         " off or at its rate limit)", account_reason="busy")


def combined(done: SendResult | None, result: SendResult) -> SendResult:
    """What the members of one attempt achieved together: the recipients ``done``
    (an earlier member's accepted, and its final refusals) and ``result`` (the next
    member's answer for the rest). Pure."""
    if done is None:
        return result
    refused = {r: e for r, e in done.refused.items() if r not in result.accepted}
    refused.update(result.refused)
    return SendResult([*done.accepted, *result.accepted], refused,
                      result.reply or done.reply, result.peer or done.peer, result.via)


def moved_on(result: SendResult) -> list[str]:
    """The recipients a member refused for account reasons (its quota, a throttle): they
    go to the next member in the same attempt. Pure."""
    return [r for r, e in result.refused.items() if e.account_wide]


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
        self._through: dict[str, str] = {}  # message id -> the member sending it now

    @property
    def peer(self) -> str:
        return self.last_peer or f"group {self.name}"

    async def send(self, sender: str, recipients: list[str], body: bytes,
                   mail_options: tuple[str, ...], *, pace: Pace | None = None
                   ) -> SendResult:
        attempt = _Attempt(SENDING.get(), list(recipients), pace)
        attempt.through = self._through
        try:
            result = await self._send(attempt, sender, body, mail_options)
        except DeliveryError as exc:
            attempt.ended()
            await attempt.count_others(exc.via, attempt.done)
            raise
        # (Cancelled, by a shutdown: still named, for the interrupted attempt's record.)
        attempt.ended()
        await attempt.count_others(result.via, result)
        return result

    def sending_through(self, message_id: str) -> str | None:
        """The member a message is being sent through now (shutdown cutting it off
        records the attempt as that member's: it counts in its windows)."""
        return self._through.get(message_id)

    async def _send(self, attempt: _Attempt, sender: str, body: bytes,
                    mail_options: tuple[str, ...]) -> SendResult:
        for name in order(self.group, self._rng):
            member, transport = self._members(name), self._transports.get(name)
            if member is None or transport is None or not member.may_send(attempt.high):
                continue
            if not await self._takes(attempt, name, member):
                continue
            self.last_peer = transport.peer  # for the log line of a failure, too
            try:
                own_sender, own_body = rewritten(member.rewrite, sender, body)
                result = await transport.send(own_sender, attempt.pending, own_body,
                                              mail_options,
                                              pace=attempt.paced(name, member))
            except SlotsHeldElsewhere:
                attempt.tried = False  # nothing went out through it: the next may send
                continue
            except DeliveryError as exc:
                exc.via = name
                attempt.sent[name] = member
                member.note_reply(exc)
                if not exc.account_wide:
                    return attempt.refused_by(name, exc)  # raises unless some went
                member.account_failed(exc)
                attempt.last = exc
                continue
            finally:
                # A send counts in the member's limits from its end; one that never
                # went out (no connection slot) does not count, nor one whose last
                # transaction was counted as it handed the rest on (MemberBusy).
                if attempt.tried and name not in attempt.counted:
                    member.end_send()
                else:
                    member.cancel_send()
            attempt.sent[name] = member
            member.note_reply(result)
            result.via = name
            if not await attempt.moves_on(member, result):
                return combined(attempt.done, result)
        return await attempt.end(self.name)

    async def _takes(self, attempt: _Attempt, name: str, member: Member) -> bool:
        """The member is not paused in the queue and takes the message (attempt.hold):
        then one send is reserved in its limits, until member.end_send."""
        # At once, before any await: no other send of this process takes the same place
        # in the member's limits (or its one probe) meanwhile.
        member.reserve_send()
        try:
            if attempt.paused is None:  # read once a member may send, once per attempt
                attempt.paused = () if self._paused is None else await self._paused()
            if name not in attempt.paused and await attempt.hold(name, member):
                return True
        except BaseException:
            member.cancel_send()
            raise
        member.cancel_send()
        return False

    async def close(self) -> None:
        """The members' transports are closed with their accounts."""

    def open_connections(self) -> int:
        return 0  # counted by each member's own transport


class _Attempt:
    """One attempt of a group's message over its members: the recipients still to send,
    what earlier members delivered, and which member's rate windows hold the message."""

    def __init__(self, message: QueuedMessage | None, pending: list[str],
                 pace: Pace | None) -> None:
        self.message = message  # None: not from the queue (nothing to hold)
        self.high = message is not None and message.priority is Priority.HIGH
        self.pending = pending
        self.pace = pace
        self.done: SendResult | None = None  # what earlier members delivered
        self.last: DeliveryError | None = None  # the last account-wide failure
        self.held: Member | None = None  # the member whose windows hold the message
        self.held_name = ""
        self.tried = False  # the held member's send happened
        # Members whose send happened: the outcome counts the last one's in its windows,
        # count_others the rest (once each, when the attempt ends).
        self.sent: dict[str, Member] = {}
        self.counted: set[str] = set()  # ...unless counted already (a split's pace)
        self.through: dict[str, str] = {}  # the transport's: message id -> member
        self.paused: Collection[str] | None = None  # accounts paused in the queue

    async def hold(self, name: str, member: Member) -> bool:
        """The member takes the message (its backoff and windows across processes)."""
        if self.message is not None and not await member.take_send(self.message.id,
                                                                    self.high):
            return False
        self.held, self.held_name, self.tried = member, name, True
        self.counted.discard(name)
        if self.message is not None:
            self.through[self.message.id] = name
        return True

    def paced(self, name: str, member: Member) -> Pace:
        """The pace of a member's further transactions (a 452 split): the worker records
        what the whole attempt delivered so far (earlier members' recipients too, not
        only this member's), and the member's own rate limits space the transactions."""
        pace, done, high = self.pace, self.done, self.high

        async def paced(so_far: SendResult) -> None:
            if pace is not None:  # the transaction that ended counts as the member's
                await pace(combined(done, dataclasses.replace(so_far, via=name)))
            if not await member.next_transaction(high, most=SPLIT_WAIT_S):
                # Paused, backing off or at its limits for longer: the rest go to the
                # next member now rather than wait here (for up to a window). Its last
                # transaction was counted just now (the pace): not again.
                self.counted.add(name)
                raise MemberBusy(name)

        return paced

    def refused_by(self, name: str, exc: DeliveryError) -> SendResult:
        """The member refused the whole transaction (not for account reasons): the
        answer, for the recipients still pending only if earlier members sent others."""
        if self.done is None:
            raise exc
        return combined(self.done, SendResult([], dict.fromkeys(self.pending, exc), via=name))

    async def moves_on(self, member: Member, result: SendResult) -> bool:
        """The member refused some recipients for account reasons (Gmail's 5.4.5 quota
        at RCPT: the member's, not ours): it backs off, and they go to the next member.
        Its answer for the others stands (delivered, or refused by their own server)."""
        rest = moved_on(result)
        if not rest:
            return False
        self.last = result.refused[rest[0]]
        self.last.via = result.via
        if not isinstance(self.last, MemberBusy):
            member.account_failed(self.last)
        if len(rest) < len(result.refused) + len(result.accepted):
            transcript = TRANSCRIPT.get()
            if transcript is not None:  # the outcome names the member that sent last
                transcript.note(f"{result.via} delivered to {len(result.accepted)} and"
                                f" refused {len(rest)} for the account: those go on")
            member.handed_on(self.message, result, rest)
            self.done = combined(self.done, result)
            self.pending = rest
            if self.message is not None:  # stored: a crash now resends only the rest
                await member.store_progress(self.message, self.done, count=False)
        return True

    def ended(self) -> None:
        if self.message is not None:
            self.through.pop(self.message.id, None)

    async def count_others(self, via: str, so_far: SendResult | None) -> None:
        """The attempt ended with ``via``'s answer, which its outcome counts: each other
        member it went through counts its send now, once (stored with what the attempt
        delivered ``so_far``, as each progress is)."""
        if self.message is None:
            return
        for name, member in self.sent.items():
            if name != via and name not in self.counted:
                await member.store_progress(self.message, so_far, count=True)

    async def end(self, group: str) -> SendResult:
        """No member (left) may send."""
        if self.done is not None:  # the rest wait for the next attempt
            # The outcome names (and counts) the member the message is held by.
            return dataclasses.replace(self.done, via=self.held_name) if self.tried \
                else self.done
        if self.last is not None:
            raise self.last  # each member that could send failed account-wide: back off
        if self.message is not None and self.held is not None:
            await self.held.let_go(self.message.id)  # it goes back unsent
            raise SlotsHeldElsewhere()
        raise TemporaryFailure(
            f"no account of group {group} may send now (each is backing off, paused or"
            " at its rate limit)", offered=False)

