"""Delivery events for webhooks (docs/events.md): which events an outcome makes, the JSON
document each POST carries, its signature and the retry delays. Pure: ids, times and
secrets come in as arguments; the outbox and the HTTP client are elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from relay.queue.types import AttemptResult, MessageState, QueuedMessage

_TYPE_OF_STATE = {MessageState.DELIVERED: "delivered", MessageState.DEFERRED: "deferred",
                  MessageState.FAILED: "failed"}
SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"


def event_types(result: AttemptResult, bounced: bool) -> list[str]:
    """The events an attempt's outcome makes: its state's, and ``bounced`` when a bounce
    (an RFC 3464 notice to the sender) was queued with it."""
    types = [_TYPE_OF_STATE[result.state]] if result.state in _TYPE_OF_STATE else []
    return [*types, "bounced"] if bounced else types


def iso_ms(ts: float) -> str:
    """UTC, with milliseconds: events of one message often share a second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def event_body(*, event_id: str, kind: str, message: QueuedMessage, result: AttemptResult,
               message_id: str | None, bounce_id: str | None = None) -> str:
    """The JSON document of one event, as POSTed (and signed): compact, keys sorted."""
    document: dict[str, object] = {
        "id": event_id,
        "type": kind,
        "at": iso_ms(result.at),
        "queue_id": message.id,
        "message_id": message_id,
        "account": result.account,
        "sender": message.sender,
        "recipients": [{"address": r.address, "state": str(r.state), "reply": r.reply}
                       for r in result.recipients],
        "reply": result.reply,
        "attempt": result.attempts,
    }
    if kind == "deferred":
        document["next_attempt_at"] = iso_ms(result.next_attempt_at)
    if bounce_id is not None:
        document["bounce_id"] = bounce_id
    # ASCII only (json's \u escapes): whatever text a header or reply holds, the
    # document can be stored and sent as it is.
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def signature(secret: str, timestamp: str, body: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``<timestamp>.<body>`` (the timestamp is signed
    too, so a receiver can refuse a replayed old event)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def retry_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """After ``attempts`` failed POSTs: initial, doubling, at most max."""
    doublings = min(max(attempts - 1, 0), 30)
    return float(min(initial_s * 2.0**doublings, max_s))


def retry_at(attempts: int, created_at: float, now: float, *, initial_s: float,
             max_s: float, max_age_s: float) -> float | None:
    """When to POST an event again after its ``attempts``-th failed try (now), backing off
    from ``initial_s`` to at most ``max_s``; None once that would be more than
    ``max_age_s`` after ``created_at``: the event is then given up."""
    at = now + retry_delay(attempts, initial_s, max_s)
    return None if at - created_at > max_age_s else at
