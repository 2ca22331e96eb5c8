"""The queue's vocabulary: message states, priorities and the values passed between layers."""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from dataclasses import dataclass, field

_ID_PREFIX = secrets.token_hex(2).upper()  # per process
_ID_COUNTER = itertools.count()


def new_queue_id() -> str:
    """20 hex digits: milliseconds (sortable), a per-process random part and a counter.

    Unique without coordination or a system call per message.
    """
    millis = int(time.time() * 1000) & 0xFFFFFFFFFFF
    return f"{millis:011X}{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFF:05X}"


class MessageState(enum.StrEnum):
    QUEUED = "queued"  # waiting for its first attempt
    DEFERRED = "deferred"  # a temporary failure; waits for next_attempt_at
    SENDING = "sending"  # claimed by a delivery worker (leased)
    HELD = "held"  # put aside by an operator
    DELIVERED = "delivered"  # final: every recipient accepted (or failed permanently)
    FAILED = "failed"  # final: no recipient accepted

    @property
    def final(self) -> bool:
        return self in (MessageState.DELIVERED, MessageState.FAILED)


S = MessageState
# Allowed transitions; anything else is a bug in the caller.
TRANSITIONS: dict[MessageState, frozenset[MessageState]] = {
    S.QUEUED: frozenset({S.SENDING, S.HELD, S.FAILED}),
    S.DEFERRED: frozenset({S.SENDING, S.HELD, S.QUEUED, S.FAILED}),
    S.SENDING: frozenset({S.DELIVERED, S.DEFERRED, S.FAILED, S.QUEUED}),
    S.HELD: frozenset({S.QUEUED}),
    S.DELIVERED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),  # an operator's `queue retry` of a failed message
}

class Priority(enum.IntEnum):
    """Lower sorts first."""

    HIGH = 1
    NORMAL = 3
    LOW = 5


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass
class Recipient:
    address: str
    state: RecipientState = RecipientState.PENDING
    reply: str = ""


@dataclass(frozen=True)
class NewMessage:
    """A message accepted by the listener, ready to be committed."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    account: str
    priority: Priority
    body: bytes
    created_at: float
    not_before: float  # Deferred-Delivery, or created_at
    mail_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    """Who holds a claimed message, and until when: once ``lease_until`` passes without an
    outcome, the message goes back to the queue for any process to claim."""

    owner: str
    lease_until: float


@dataclass
class QueuedMessage:
    """A row of the queue without its body (bodies are loaded only when sending)."""

    id: str
    state: MessageState
    account: str
    priority: Priority
    sender: str
    recipients: list[Recipient]
    size: int
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str = ""
    updated_at: float = 0.0
    mail_options: tuple[str, ...] = ()
    attempts_log: list[dict[str, object]] = field(default_factory=list)
    claim: Claim | None = None  # set when claimed for delivery

    @property
    def pending_recipients(self) -> list[str]:
        return [r.address for r in self.recipients if r.state is RecipientState.PENDING]


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt did to a message; written by ``QueueStore.finish``."""

    id: str
    account: str
    state: MessageState
    recipients: list[Recipient]
    attempts: int
    next_attempt_at: float
    last_error: str
    at: float
    outcome: str  # delivered | deferred | failed | partial
    reply: str
    claim: Claim | None = None  # the claim this result settles
