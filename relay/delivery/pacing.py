"""A send's further transactions (a 452 "too many recipients" split, a retry after a 421):
what the upstream accepted so far is stored first, so a crash resends only the rest, and
the next transaction waits for the account's rate limits as a claim would, in this
process and in every process on the queue.

A mixin of AccountWorker (relay.delivery.worker), over relay.delivery.account; a group's
send through the account paces itself here too (relay.delivery.groups.Member:
next_transaction, store_progress).
"""

from __future__ import annotations

import asyncio
import logging

from relay.delivery.account import AccountState
from relay.delivery.outcome import accepted_so_far
from relay.delivery.transport import SendResult
from relay.errors import StoreError, TemporaryFailure
from relay.observe.logs import event
from relay.queue.types import Priority, QueuedMessage

log = logging.getLogger("relay.delivery")
# How often a further transaction waiting for the rate limit looks again (a send under
# way that ends does not wake it).
_PACE_POLL_S = 0.05
# A split's next transaction waiting for the windows the other processes share too.
_SHARED_PACE_POLL_S = 0.25


class Pacing(AccountState):
    """The pace of an AccountWorker's sends between their transactions."""

    async def _between(self, message: QueuedMessage, so_far: SendResult) -> None:
        """Before a further transaction of the same send (452 split, retry after a 421).

        The recipients accepted so far are stored first, so a crash now resends only the
        others, with the transaction that ended: it counts in the account's windows for
        every process (``so_far.via``: a group's member's). Then it ends here in this
        process's rate limit too; the next waits its turn and is reserved like a claim,
        so the upstream never sees more than the configured rate."""
        if not await self._record_progress(message, so_far, so_far.via or self.name):
            # Deleted mid-send (`relay queue delete --force`), or another process took
            # it: no further transaction (the rest stay unsent; the outcome is dropped).
            raise TemporaryFailure("not sending the rest: this worker no longer holds the"
                                   " message (deleted while being sent?)")
        await self.next_transaction(message.priority is Priority.HIGH)

    async def _record_progress(self, message: QueuedMessage, so_far: SendResult | None,
                               sent_by: str | None) -> bool:
        """Store the recipients delivered ``so_far`` and, with ``sent_by``, one send of
        that account now. Kept in the claimed message too: an outcome written from it
        (shutdown cutting the send off: interrupted) must not make the delivered ones
        pending again. False when this worker no longer holds the message."""
        if so_far is not None:
            message.recipients = accepted_so_far(message, so_far)
        try:
            return await self.store.record_recipients(
                message.id, message.recipients,
                sent=None if sent_by is None else (sent_by, self.clock()))
        except StoreError as exc:  # the outcome still records them; a crash would not
            event(log, logging.ERROR, "queue_error", message.id, account=self.name,
                  reason=f"cannot record accepted recipients: {exc}")
            return True

    async def next_transaction(self, high: bool, *, most: float = float("inf")) -> bool:
        """The transaction before ends and counts; wait until the account's limits allow
        the next (``high``: from the share reserve_for_high keeps too), as this process
        and then as every process on the queue counts them, and reserve it (also for a
        group's send through this account). ``most``: how long it may wait (a group's
        member: another member may take the rest); False when the next transaction
        cannot go within that (limits, a pause, a backoff, a wait the server named):
        the one before is counted, and the send's end gives back what was reserved
        (GroupTransport: cancel_send)."""
        self.limiter.complete(self.mono())
        deadline = self.mono() + most
        while (held := self._held_for(high, member=most < float("inf"))) > 0:
            if self.mono() + held > deadline:
                return False  # (nothing reserved: the send's end is then a cancel)
            await asyncio.sleep(min(held, _PACE_POLL_S))
        self.limiter.reserve(1)
        if self.host is None or not self.limiter.limited:
            return True
        try:
            # Polled: the other processes' sends end there, not here (no event to await).
            while not await self.store.window_open(self.name, self.clock(),
                                                   self.limiter.windows,
                                                   self.limiter.reserve_for_high, high):
                if self.mono() + _SHARED_PACE_POLL_S > deadline:
                    return False
                await asyncio.sleep(_SHARED_PACE_POLL_S)
        except StoreError as exc:  # this process's own limits held it: go on
            event(log, logging.ERROR, "queue_error", account=self.name,
                  reason=f"cannot read the account's windows: {exc}")
        return True

    def _held_for(self, high: bool, *, member: bool) -> float:
        """How long this account's next transaction must wait for its rate limits (inf:
        until a send under way ends); as a group's member, also while it is paused,
        backs off or holds for a wait the server named (the group has other members;
        its own send under way finishes as it would have)."""
        mono = self.mono()
        held = self.limiter.wait_time(mono, others=not high)
        if not member:
            return held
        if self.paused:
            return float("inf")
        return max(held, self.backoff_until - mono, self.throttle.held(mono))
