"""An account's worker as a member of a group (relay.delivery.groups.Member): whether it
may take a group's send now, holding that send in the account's limits and backoff as
every process on the queue counts them, and what the send's replies mean for the account.

A mixin of AccountWorker (relay.delivery.worker), over relay.delivery.account; the
backoff and throttle it applies are the account's own (relay.delivery.backoff,
relay.delivery.slowdown), so a group's send and the account's own mail see the same.
"""

from __future__ import annotations

import contextlib
import logging

from relay.delivery.account import AccountState
from relay.delivery.backoff import account_error
from relay.delivery.transport import SendResult
from relay.errors import DeliveryError, StoreError
from relay.observe.logs import event
from relay.queue.types import QueuedMessage

log = logging.getLogger("relay.delivery")


class GroupMember(AccountState):
    """The Member role of an AccountWorker, which the group's transport calls."""

    def may_send(self, high: bool = False) -> bool:
        """Not backing off, not paused, and its rate limits allow one more send now (of
        normal or low priority: not from the share reserve_for_high keeps)."""
        if self.backoff_failures and (self._group_sends or self.in_flight or self.settling):
            return False  # its backoff ended: one probe at a time, as its own worker sends
        return (not self.paused and not self.held_back
                and self.limiter.available(self.mono(), others=not high) >= 1)

    async def take_send(self, message_id: str, high: bool) -> bool:
        """(Group; after may_send and reserve_send) What the other processes on the queue
        know of this account: hold the message in the account's rate windows as they
        count them, then follow the backoff one of them decided and probe only with the
        host's probe (taken last: a probe taken for a send that then found no room would
        stop every process's probe for its lease). One process alone: may_send knew it
        all."""
        if self.host is None:
            return True
        now, mono = self.clock(), self.mono()
        try:
            if self.limiter.limited and not await self.store.hold_send(
                    message_id, self.name, now, now + self.lease_s, self.limiter.windows,
                    self.limiter.reserve_for_high, high):
                return False
            if await self._follow_host(await self.host.backoff(), now, mono,
                                       own=False) is None \
                    and self.mono() >= self.backoff_until:  # (not a backoff just adopted)
                return True
        except StoreError as exc:
            event(log, logging.ERROR, "queue_error", message_id, account=self.name,
                  reason=f"cannot hold a group send in the account's limits: {exc}")
        await self.let_go(message_id)  # another process probes it, or it backs off
        return False

    async def let_go(self, message_id: str) -> None:
        if self.host is not None and self.limiter.limited:
            with contextlib.suppress(StoreError):  # else its lease ends it
                await self.store.hold_send(message_id, None, self.clock(), 0.0)

    async def store_progress(self, message: QueuedMessage, so_far: SendResult | None,
                             *, count: bool) -> None:
        """(Group) Store the recipients delivered so far (a crash then resends only the
        others), and with ``count`` one send of this account at this moment (a send of
        the attempt that its outcome, which counts the last member's, does not)."""
        await self._record_progress(message, so_far, self.name if count else None)

    def reserve_send(self) -> None:
        self.limiter.reserve(1)
        self._group_sends += 1

    def end_send(self) -> None:
        self._group_sends -= 1
        self.limiter.complete(self.mono())

    def cancel_send(self) -> None:
        self._group_sends -= 1
        self.limiter.cancel(1)

    def handed_on(self, message: QueuedMessage | None, result: SendResult,
                  rest: list[str]) -> None:
        event(log, logging.INFO, "group_handed_on", None if message is None else message.id,
              account=self.name, relay=result.peer,
              delivered=",".join(f"<{a}>" for a in result.accepted) or None,
              failed=",".join(f"<{a}>" for a, e in result.refused.items()
                              if a not in rest and not e.temporary) or None,
              rest=",".join(f"<{a}>" for a in rest),
              reason=result.refused[rest[0]].reply_text())

    def account_failed(self, error: DeliveryError) -> None:
        """A group's send through this account failed for the account: back off."""
        self._account_health(error, self.clock())

    def note_reply(self, sent: SendResult | DeliveryError) -> None:
        """A group's send through this account: a "slow down" throttles this account, and
        a send that got through is its recovery (failures reset, as for its own sends)."""
        self._note_slow_down(sent)
        if isinstance(sent, SendResult) and self.backoff_failures and account_error(sent) is None:
            self._account_health(sent, self.clock())
