"""Why a message is not being delivered right now: `relay queue show`'s answer to
"why is this one delayed". Pure: the caller passes the message's times, the account's
backoff and rate-limit wait, and now.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.queue.types import MessageState

S = MessageState


@dataclass(frozen=True)
class Reason:
    """One thing holding a message back, and until when (None: until someone acts)."""

    # held | deferred-delivery | sync-hold | retry-delay | paused | account-backoff |
    # rate-limit | sending
    kind: str
    until: float | None
    text: str


def why_waiting(
    state: MessageState,
    attempts: int,
    created_at: float,
    next_attempt_at: float,
    now: float,
    *,
    backoff_until: float | None = None,
    rate_wait_s: float = 0.0,
    last_error: str = "",
    paused: bool = False,
    reserved: bool = False,
    sync_hold_s: float = 0.0,
) -> list[Reason]:
    """Everything that keeps the message from its next attempt now; empty when it is due
    (the next free worker takes it). An account backoff is named while it lasts (the
    scheduler defers the account's messages to its end, so the times often coincide);
    a rate limit only when it lasts beyond the message's own time (``reserved``: only
    because the rest of the window is kept for high priority). ``sync_hold_s``: with ack:
    after_upstream, how long a new message is held for its session's immediate attempt
    (listen.sync_timeout). Final messages wait for nothing."""
    if state.final:
        return []
    if state is S.HELD:
        return [Reason("held", None, "held by an operator; `relay queue release` queues it")]
    if state is S.SENDING:
        return [Reason("sending", None, "a worker is delivering it right now")]
    reasons: list[Reason] = []
    if next_attempt_at > now:
        # Never tried and never put off by a failure (a send that never reached the
        # upstream counts no attempt, but leaves its error and 'deferred'): the client's.
        if (attempts == 0 and state is S.QUEUED and not last_error
                and next_attempt_at > created_at):
            if next_attempt_at - created_at <= sync_hold_s:
                reasons.append(Reason("sync-hold", next_attempt_at,
                                      "held for its session's immediate attempt (ack:"
                                      " after_upstream); it goes from the queue by then"))
            else:
                reasons.append(Reason(
                    "deferred-delivery", next_attempt_at,
                    "the client asked for a later delivery (Deferred-Delivery)"))
        else:
            reasons.append(Reason("retry-delay", next_attempt_at,
                                  f"retry delay after attempt {attempts}"))
    own = max(next_attempt_at, now)
    if paused:
        reasons.append(Reason("paused", None, "its account is paused; `relay accounts resume`"
                                              " sends its mail again"))
    if backoff_until is not None and backoff_until > now:
        reasons.append(Reason("account-backoff", backoff_until,
                              "its account is backing off after account-wide failures"))
    if rate_wait_s > 0 and now + rate_wait_s > own:
        until = now + rate_wait_s if rate_wait_s != float("inf") else None
        what = ("its account has used normal and low priority's share of its rate limit"
                " (the rest is reserved for high priority: rate_limit.reserve_for_high)"
                if reserved else "its account is at its rate limit")
        reasons.append(Reason("rate-limit", until,
                              what + ("" if until else " until a send under way ends")))
    return reasons


def next_attempt(reasons: list[Reason], next_attempt_at: float, now: float) -> float | None:
    """The earliest time the message can be tried: after every reason has passed (None:
    only when an operator or a running send acts)."""
    if any(r.until is None for r in reasons):
        return None
    return max([next_attempt_at, now, *(r.until for r in reasons if r.until is not None)])
