"""How an account's worker writes a send's outcome: the attempt, its bounce and its webhook
events in one commit, only while this worker still holds the claim; a session waiting
for it (ack: after_upstream, relay.delivery.sync.SyncWaiter) is told the refusal to pass
on, and then no bounce is queued; and the result's log lines and metrics.

A mixin of AccountWorker (relay.delivery.worker), over relay.delivery.account.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from relay.delivery.account import AccountState
from relay.delivery.bounce import should_bounce
from relay.delivery.sync import SyncWaiter, sync_refusal
from relay.delivery.transport import SendResult
from relay.errors import DeliveryError, StoreError
from relay.observe.logs import event, iso_time
from relay.queue.types import (
    AttemptResult,
    MessageState,
    NewEvent,
    NewMessage,
    QueuedMessage,
    Recipient,
    RecipientState,
)
from relay.smtp.replies import Reply

log = logging.getLogger("relay.delivery")
FINISH_RETRY_S = 1.0  # after the queue could not be written: the next try


class Recording(AccountState):
    """The outcome of each send of an AccountWorker, written and reported."""

    async def _record(self, message: QueuedMessage, result: AttemptResult,
                      sent: SendResult | DeliveryError, duration: float, body: bytes) -> None:
        waiter = self.waiters.get(message.id)
        refusal = None
        try:
            refusal = await self._record_outcome(message, result, sent, duration, body, waiter)
        finally:
            if waiter is not None:  # None if the write was given up: 250, the row stays
                waiter.settle(refusal)

    async def _record_outcome(self, message: QueuedMessage, result: AttemptResult,
                              sent: SendResult | DeliveryError, duration: float, body: bytes,
                              waiter: SyncWaiter | None) -> Reply | None:
        """Write the outcome (and its bounce); the refusal a waiting session passes on."""
        was_pending = set(message.pending_recipients)
        failed = [r for r in result.recipients
                  if r.state is RecipientState.FAILED and r.address in was_pending]
        refusal = None
        if waiter is not None and not waiter.abandoned:
            refusal = sync_refusal(sent, result)
            waiter.refusing = refusal is not None  # the client gets it: no bounce
            if refusal is not None and waiter.dedup_key is not None:
                result = dataclasses.replace(result, forget_dedup=waiter.dedup_key)
        bounce = None
        # Never to <>: a bounce is sent from <>, so a bounce never causes another.
        if self.bounce is not None and refusal is None and should_bounce(message.sender, failed):
            bounce = self.bounce(message, failed, body)
        events = self.events(message, result, bounce, body) if self.events else []
        # The outcome, its bounce and its events in one commit, if this process still
        # holds the claim.
        if not await self._write(result, bounce, events):
            event(log, logging.WARNING, "outcome_dropped", message.id, account=self.name,
                  outcome=result.outcome, reason=await self._why_dropped(message.id))
            return None
        if events and self.events_written is not None:
            self.events_written()
        self._report(message, result, sent, duration)
        if bounce is not None:
            event(log, logging.INFO, "bounced", message.id, bounce_id=bounce.id,
                  to=f"<{message.sender}>", failed=len(failed))
            self.notify()  # a bounce goes through the failed message's own account
        return refusal

    async def _why_dropped(self, message_id: str) -> str:
        """Why the claim no longer held: an operator's forced delete, or a lost lease."""
        with contextlib.suppress(StoreError):  # the reason is for the log only
            if await self.store.state_of(message_id) is None:
                return "it was deleted while being sent (relay queue delete --force)"
        return "its lease ran out and another worker claimed it; that worker's outcome stands"

    async def _write(self, result: AttemptResult, bounce: NewMessage | None = None,
                     events: list[NewEvent] | None = None) -> bool:
        try:
            while True:
                try:
                    return await self.store.finish(result, bounce, events or ())
                except StoreError as exc:
                    event(log, logging.ERROR, "queue_error", result.id, account=self.name,
                          reason=f"cannot record outcome, will retry: {exc}")
                    await asyncio.sleep(FINISH_RETRY_S)
        except asyncio.CancelledError:
            # Shutdown gave up on this write: the row stays 'sending' and is tried again
            # after a restart. Say what happened, so an operator knows it may be a repeat.
            sent = ",".join(r.address for r in result.recipients
                            if r.state is RecipientState.DELIVERED)
            event(log, logging.ERROR, "outcome_lost", result.id, account=self.name,
                  outcome=result.outcome, reply=result.reply, delivered_to=sent or None,
                  reason="outcome not written at shutdown; the message will be tried again"
                         " after a restart")
            raise

    def _report(self, message: QueuedMessage, result: AttemptResult,
                sent: SendResult | DeliveryError, duration: float) -> None:
        account = result.account  # a group's member, or this account
        peer = sent.peer if isinstance(sent, SendResult) else self.transport.peer
        if not (isinstance(sent, DeliveryError) and sent.account_wide):
            # Every attempt that reached a transaction, failed ones too (the slow cases).
            self.metrics.delivery_duration.labels(account).observe(duration)
        if result.state is MessageState.DELIVERED:
            self.metrics.delivered.labels(account).inc()
            self.metrics.queue_delay.labels(account).observe(result.at - message.created_at)
            event(log, logging.INFO, "delivered", message.id, account=account, relay=peer,
                  delay=f"{result.at - message.created_at:.3f}", attempt=result.attempts,
                  reply=result.reply,
                  failed_recipients=sum(r.state == "failed" for r in result.recipients) or None,
                  worker=self.process)
        elif result.state is MessageState.DEFERRED:
            self.metrics.deferred.labels(account).inc()
            event(log, logging.WARNING, "deferred", message.id, account=account, relay=peer,
                  attempt=result.attempts, reason=result.last_error,
                  next_attempt=iso_time(result.next_attempt_at), worker=self.process)
        else:
            self.metrics.failed.labels(account).inc()
            event(log, logging.WARNING, "failed", message.id, account=account, relay=peer,
                  attempt=result.attempts, reason=result.last_error, worker=self.process)
        if result.outcome == "partial":
            self._report_recipients(message, result, peer)

    def _report_recipients(self, message: QueuedMessage, result: AttemptResult,
                           peer: str) -> None:
        """A mixed attempt: a line for each kind the message's own line does not show,
        so a recipient refused for good is in the log when it happens, not at the end."""
        tried = set(message.pending_recipients)
        now = [r for r in result.recipients if r.address in tried]
        delivered = [r for r in now if r.state is RecipientState.DELIVERED]
        failed = [r for r in now if r.state is RecipientState.FAILED]
        if delivered and result.state is not MessageState.DELIVERED:
            event(log, logging.INFO, "recipients_delivered", message.id, account=self.name,
                  relay=peer, attempt=result.attempts, to=_addresses(delivered),
                  reply=delivered[0].reply)
        if failed:
            event(log, logging.WARNING, "recipients_failed", message.id, account=self.name,
                  relay=peer, attempt=result.attempts, to=_addresses(failed),
                  reason="; ".join(f"<{r.address}>: {r.reply}" for r in failed)[:1000])


def _addresses(recipients: list[Recipient]) -> str:
    return ",".join(f"<{r.address}>" for r in recipients)
