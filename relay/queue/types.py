"""The queue's vocabulary: message states, priorities and the values passed between layers."""

from __future__ import annotations

import enum
import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace

_ID_COUNTER = itertools.count()


def queue_id(millis: int, pid: int, count: int) -> str:
    """22 hex digits: milliseconds (sortable), the process id and a per-process counter.

    Two live processes never share a pid, so ids made in the same millisecond by several
    workers on one queue differ; the counter separates those of one process.
    """
    return f"{millis & 0xFFFFFFFFFFF:011X}{pid & 0xFFFFFF:06X}{count & 0xFFFFF:05X}"


QUEUE_ID = re.compile(r"[0-9A-F]{22}")  # what queue_id makes, and nothing else


def is_queue_id(text: str) -> bool:
    """Is ``text`` an id this relay makes (an import refuses any other: ids name files
    and log lines, so no '/', '..' or line break may come in through one)?"""
    return QUEUE_ID.fullmatch(text) is not None


# Drawn once per process start: relays on several hosts share one PostgreSQL queue, and in
# containers every relay is pid 1 with a counter that starts at 0, so pid and counter
# alone would repeat across hosts. Forked children share it and differ by their pids.
_START_SALT = secrets.randbits(24)


def new_queue_id() -> str:
    """A queue id unique across the processes of a host, without coordination, and across
    hosts but for a chance of 1 in 2**24 per pair of processes (then the later commit of
    the two is refused, 451, and its client sends it again under a new id).

    The pid is read at each call, not once at import: a forked child must not repeat
    its parent's ids (their counters are copies of each other).
    """
    return queue_id(int(time.time() * 1000), os.getpid() ^ _START_SALT, next(_ID_COUNTER))


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
class Dedup:
    """An idempotency key (Message-ID and envelope sender): while a message with the same
    key accepted within ``window_s`` is on record, a new one is not queued again."""

    key: str
    window_s: float


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
    dedup: Dedup | None = None  # dedup on: the key recorded with it


@dataclass(frozen=True)
class Claim:
    """Who holds a claimed message, and until when: once ``lease_until`` passes without an
    outcome, the message goes back to the queue for any process to claim."""

    owner: str
    lease_until: float
    # Which claim of the owner's (a store may set it: PostgreSQL does): an owner that
    # claims a message again after losing it cannot settle the new claim with the old
    # one's outcome. Not part of equality: the owner and lease say whose and until when.
    token: str = field(default="", compare=False)


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
    transcript: tuple[str, ...] = ()  # the SMTP conversation of the attempt (no secrets)
    # ack: after_upstream passed this refusal on to the client as the answer to DATA:
    # the message's dedup key, to forget with the outcome (the submission was refused,
    # not accepted, so a retry is tried again).
    forget_dedup: str | None = None
    # The message reached the upstream (False: no connection, or the login was held
    # back): only then does the attempt count in the account's rate windows.
    offered: bool = True


@dataclass(frozen=True)
class ExportedAttempt:
    """One record of a message's attempts (or 'moved' record), as stored."""

    at: float
    account: str
    outcome: str
    reply: str
    transcript: tuple[str, ...] = ()  # the SMTP conversation (schema 5), if recorded


@dataclass(frozen=True)
class ExportedMessage:
    """A whole stored message, as `relay queue export` writes it and `import` reads it:
    every field, its attempt records in order and its body (None once the store dropped
    it: a delivered message keeps no body). Never 'sending': a store exports a claim as
    due now (``unclaimed``), since the importing relay has no such owner."""

    id: str
    state: MessageState
    account: str
    priority: Priority
    sender: str
    recipients: tuple[Recipient, ...]
    size: int
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str
    updated_at: float
    mail_options: tuple[str, ...]
    attempts_log: tuple[ExportedAttempt, ...]
    body: bytes | None


def unclaimed(message: ExportedMessage, now: float) -> ExportedMessage:
    """A 'sending' message as a queue without its claimant holds it: due at once, queued
    if never tried, else deferred (its recipients already delivered stay delivered)."""
    if message.state is not MessageState.SENDING:
        return message
    state = MessageState.DEFERRED if message.attempts else MessageState.QUEUED
    return replace(message, state=state, next_attempt_at=min(message.next_attempt_at, now))


@dataclass(frozen=True)
class ExportedDedup:
    """A deduplication key as stored: a resubmission with ``key`` before ``expires_at``
    is answered with ``message_id`` instead of being queued again."""

    key: str
    message_id: str
    expires_at: float


@dataclass(frozen=True)
class ExportedEvent:
    """A webhook event still in the outbox, as `relay queue export` writes it (a claim
    comes out as due now: the importing relay has no such owner)."""

    id: str
    webhook: str
    type: str
    body: str
    created_at: float
    next_attempt_at: float
    attempts: int
    last_error: str


@dataclass(frozen=True)
class NewEvent:
    """A delivery event for one webhook, written to the queue's outbox with the outcome
    that causes it; ``id`` is the event's (the same for every webhook it goes to)."""

    id: str
    webhook: str
    type: str  # delivered | deferred | failed | bounced
    body: str  # the JSON document POSTed, as sent
    created_at: float


@dataclass(frozen=True)
class PendingEvent:
    """An outbox row claimed for sending by one process (``claim``) until its lease ends."""

    id: str
    webhook: str
    type: str
    body: str
    created_at: float
    attempts: int
    claim: Claim
