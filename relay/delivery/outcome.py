"""Turn one delivery attempt into the message's next state. Pure: no I/O, time passed in.

Per recipient: accepted -> delivered, refused 5xx -> failed, refused 4xx -> stays pending
and is retried. The message is final once no recipient is pending.
"""

from __future__ import annotations

import random
from dataclasses import replace

from relay.delivery.retry import Defer, RetryPolicy
from relay.delivery.transport import SendResult
from relay.errors import DeliveryError
from relay.queue.types import (
    AttemptResult,
    MessageState,
    QueuedMessage,
    Recipient,
    RecipientState,
)


def settle(
    message: QueuedMessage,
    sent: SendResult | DeliveryError,
    *,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
    resume_at: float | None = None,
    age_now: float | None = None,
) -> AttemptResult:
    """The AttemptResult to store. ``resume_at``: the account is backing off until then;
    ``age_now``: the clock for the message's age (RetryPolicy.decide)."""
    # A send that never reached the upstream (no connection, login held) is no attempt.
    offered = not isinstance(sent, DeliveryError) or sent.offered
    attempts = message.attempts + (1 if offered else 0)
    recipients = [replace(r) for r in message.recipients]
    pending = [r for r in recipients if r.state is RecipientState.PENDING]

    if isinstance(sent, DeliveryError):
        reply, temp_error = _apply_error(pending, sent)
    else:
        reply, temp_error = _apply_result(pending, sent)

    next_at = message.next_attempt_at
    last_error = ""
    if temp_error is not None:
        decision = policy.decide(
            temp_error, attempts=attempts, created_at=message.created_at, now=now, rng=rng,
            age_now=age_now,
        )
        if isinstance(decision, Defer):
            next_at = decision.until if resume_at is None else max(resume_at, now)
            last_error = decision.reason
        else:
            last_error = decision.reason
            for r in recipients:
                if r.state is RecipientState.PENDING:
                    _finish(r, RecipientState.FAILED, decision.reason)
    failed = [r for r in recipients if r.state is RecipientState.FAILED]
    if failed and not last_error:
        last_error = "; ".join(f"<{r.address}>: {r.reply}" for r in failed)[:1000]

    state, outcome = _state_of(recipients)
    return AttemptResult(
        id=message.id,
        account=message.account,
        state=state,
        recipients=recipients,
        attempts=attempts,
        next_attempt_at=next_at,
        last_error=last_error,
        at=now,
        outcome=outcome,
        reply=reply,
        claim=message.claim,
        offered=offered,
    )


def _apply_error(
    pending: list[Recipient], error: DeliveryError
) -> tuple[str, DeliveryError | None]:
    """The whole transaction failed: permanent fails every pending recipient."""
    if error.temporary:
        return error.reply_text(), error
    for r in pending:
        _finish(r, RecipientState.FAILED, error.reply_text())
    return error.reply_text(), None


def _apply_result(
    pending: list[Recipient], sent: SendResult
) -> tuple[str, DeliveryError | None]:
    """Per recipient: accepted, refused for good, or refused for now (the first such error)."""
    temp_error: DeliveryError | None = None
    for r in pending:
        refused = sent.refused.get(r.address)
        if refused is None and r.address in sent.accepted:
            _finish(r, RecipientState.DELIVERED, sent.reply)
        elif refused is not None and not refused.temporary:
            _finish(r, RecipientState.FAILED, refused.reply_text())
        elif refused is not None:
            temp_error = temp_error or refused
            r.reply = refused.reply_text()
    reply = sent.reply or (temp_error.reply_text() if temp_error else "")
    return reply, temp_error


def _finish(recipient: Recipient, state: RecipientState, reply: str) -> None:
    recipient.state = state
    recipient.reply = reply


def _state_of(recipients: list[Recipient]) -> tuple[MessageState, str]:
    states = {r.state for r in recipients}
    if RecipientState.PENDING in states:
        partly = RecipientState.DELIVERED in states or RecipientState.FAILED in states
        return MessageState.DEFERRED, "partial" if partly else "deferred"
    if RecipientState.DELIVERED in states:
        return MessageState.DELIVERED, "partial" if RecipientState.FAILED in states else "delivered"
    return MessageState.FAILED, "failed"


def accepted_so_far(message: QueuedMessage, sent: SendResult) -> list[Recipient]:
    """The message's recipients with those one transaction already delivered marked so
    (stored between the transactions of a split send: a crash resends only the rest)."""
    recipients = [replace(r) for r in message.recipients]
    for r in recipients:
        if r.state is RecipientState.PENDING and r.address in sent.accepted:
            _finish(r, RecipientState.DELIVERED, sent.reply)
    return recipients
