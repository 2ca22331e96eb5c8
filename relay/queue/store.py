"""The queue interface: what the listener, scheduler, app, CLI and status use of a store.

Written for several relay processes on one queue (SQLite now, PostgreSQL later): a claim
carries its owner and a lease expiry (``Claim``), a message whose lease runs out goes back
to the queue (``requeue_expired``), and an attempt's result names the claim it settles.
Shared state between processes (a flush request, account health) is a method here, not a
key the callers know. relay.queue.sqlite.SQLiteStore and
relay.queue.postgres.PostgresStore implement it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from typing import ClassVar, Protocol

from relay.queue.filters import MessageFilter, SortKey
from relay.queue.types import (
    AttemptResult,
    ExportedDedup,
    ExportedEvent,
    ExportedMessage,
    MessageState,
    NewEvent,
    NewMessage,
    PendingEvent,
    QueuedMessage,
    Recipient,
)

# Messages per committed window of an operator operation: no window holds the write lock
# long enough to make the server's writer wait, and the caller can show progress.
OPERATOR_CHUNK = 5000


class Progress(Protocol):
    """Called after each committed window with the number of messages done so far."""

    def __call__(self, done: int) -> None: ...


class QueueStore(Protocol):
    """A durable message queue. Every write returns only once it is durable."""

    owner: str  # who this store's claims belong to ("host:pid")
    on_internal_error: Callable[[], None] | None  # counted by the app
    SCHEMA_VERSION: ClassVar[int]  # the latest schema this store knows (its last migration)
    # Called with an account when another process says it has mail due for it now (a
    # store shared across hosts: PostgreSQL's NOTIFY); the app wakes that account's worker.
    on_wake: Callable[[str], None] | None

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Connect; afterwards the queue is at SCHEMA_VERSION. A new, empty queue is
        created. SchemaError for an older schema unless the store was built with
        ``migrate=True`` (then the missing migrations are applied first), and always for a
        newer one (relay.queue.migrations words both)."""
    async def close(self) -> None: ...
    @property
    def writer_alive(self) -> bool: ...
    async def check_writable(self) -> None:
        """Raise StoreError unless a write would be accepted now (readiness)."""
    def check_file(self) -> None:
        """Raise StoreError if the queue's file is not the one opened (deleted, replaced)."""
    async def schema_version(self) -> int:
        """The schema version found in the queue (0: new or empty), open or not; reads only."""
    async def migrate(self) -> list[int]:
        """Apply the missing migrations, each in a transaction of its own; return the
        versions applied ([] when up to date: idempotent). For a store that is not open
        (`relay queue migrate`, `relay serve --migrate`); SchemaError for a newer schema."""

    # -- the listener's and scheduler's side -----------------------------------------
    async def enqueue(self, message: NewMessage) -> str:
        """Commit ``message``; return the id that holds it: its own, or with
        ``message.dedup`` set, the id of a message accepted with the same key whose
        window has not ended (then nothing is written). The key is recorded in the
        enqueue's transaction (unique), so concurrent submissions queue one message."""
    async def enqueue_all(self, messages: Sequence[NewMessage]) -> list[str]:
        """Commit every message in one transaction, all or none (a message split by
        routing rules: one 250 for all its queue entries); the id holding each, as
        enqueue() returns it."""
    async def claim_due(
        self, account: str, now: float, limit: int, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
    ) -> list[QueuedMessage]:
        """Claim up to ``limit`` due messages; each carries its ``Claim`` (owner, lease).

        ``windows`` ((seconds, most), the account's rate limits): in the same transaction,
        claim no more than each window still allows given every process's sends (those
        recorded, and those claimed and not yet finished), so limits hold across workers.
        ``reserve_for_high`` (a fraction): messages that are not HIGH priority may fill
        each window only up to relay.delivery.ratelimit.share_for_others(most, reserve);
        HIGH ones are claimed first and may use all of it.
        """
    async def claim_message(
        self, account: str, message_id: str, now: float, lease_s: float,
        windows: Sequence[tuple[float, int]] = (), reserve_for_high: float = 0.0,
        held_until: float = 0.0,
    ) -> QueuedMessage | None:
        """Claim one message of ``account`` by id on claim_due's terms (ready and due, the
        account not paused, room in ``windows``): the process that received it sends it
        at once (ack: after_upstream). ``held_until``: the message was queued due then,
        held for this claim (no other process's claim takes it meanwhile), and counts as
        due now. None when it is not claimable now (another process claimed it first, or
        a rate window is full); it then waits in the queue as usual."""
    async def release_hold(self, message_id: str, held_until: float, now: float) -> None:
        """The held message (claim_message's ``held_until``) was not claimed by its
        session after all: due at ``now`` instead, for every process's claims."""
    async def finish(self, result: AttemptResult, bounce: NewMessage | None = None,
                     events: Sequence[NewEvent] = ()) -> bool:
        """Settle ``result.claim``: record the attempt (with ``result.transcript``), queue
        its bounce and write its webhook ``events`` to the outbox, all together. With
        ``result.forget_dedup`` (ack: after_upstream passed the refusal on as the answer to
        DATA), delete that dedup key in the same transaction if it still names
        ``result.id``: a resubmission is then queued, not answered with the failed id.

        Only the claim's owner may: False when another process holds the message now
        (then neither bounce nor events are written).
        """
    async def renew(self, ids: Sequence[str], lease_until: float) -> int:
        """Extend this owner's leases on ``ids`` (sends still under way), and the places
        those held in a member's windows (hold_send) with them."""
    async def record_recipients(self, message_id: str, recipients: Sequence[Recipient],
                                sent: tuple[str, float] | None = None) -> bool:
        """Store a claimed message's recipients mid-send (some already delivered by one
        transaction of several), so that a crash resends only the others. ``sent``:
        (account, at) of the transaction that just ended, which counts in the account's
        rate windows from then on (the outcome counts only the last one). False when
        this owner no longer holds the message (deleted with `relay queue delete
        --force`, or its lease ran out and another process took it): the send stops."""
    async def requeue(self, ids: Sequence[str], now: float, *, due_at: float | None = None
                      ) -> None: ...
    async def requeue_expired(self, now: float, *, keep: Sequence[str] = ()) -> int:
        """Requeue claims whose lease ran out or whose owner is gone, except ``keep``."""
    async def recover(self, now: float) -> int:
        """At start: requeue_expired. Claims of live processes under lease stay theirs."""
    async def shift_times(self, delta: float) -> int: ...
    async def next_due_at(self, account: str) -> float | None: ...
    async def waiting_count(self, account: str) -> int: ...
    async def load_body(self, message_id: str) -> bytes: ...
    async def recent_sends(self, account: str, since: float) -> list[float]: ...
    async def changed_elsewhere(self) -> bool: ...
    def start_pruning(self, keep_delivered_s: float, clock: Callable[[], float]) -> None: ...

    # -- the webhook outbox ------------------------------------------------------------
    async def claim_events(self, now: float, limit: int, lease_s: float) -> list[PendingEvent]:
        """Claim up to ``limit`` outbox rows due at ``now`` that nobody holds (or whose
        holder's lease ran out) for this owner until ``now + lease_s``, oldest first."""
    async def settle_event(self, event: PendingEvent, *, retry_at: float | None,
                           error: str = "") -> bool:
        """``retry_at`` None: sent or given up, delete the row. Else: attempts + 1, due at
        ``retry_at``, ``error`` kept, claim released. False unless this owner held it."""
    async def next_event_at(self) -> float | None:
        """When the next outbox row is due (None: the outbox is empty)."""

    # -- shared state between processes ----------------------------------------------
    async def request_flush(self, at: float) -> None:
        """Ask the running server to try every deferred message now (`relay queue flush`)."""
    async def flush_requested(self) -> str | None:
        """The latest flush request, opaque: the server acts when it changes."""
    async def publish_health(self, report: str) -> None:
        """Store the server's account health report for `relay status`."""
    async def read_health(self) -> str | None: ...
    async def set_paused(self, account: str, paused: bool, at: float) -> None:
        """Pause or resume an account for every process on this queue (persisted)."""
    async def paused_accounts(self) -> dict[str, float]:
        """Paused accounts, each with when it was paused."""
    async def reports_queue(self) -> bool:
        """Whether this process exports the queue-wide gauges (relay_queue_messages, the
        oldest message's age): of several relays on one shared queue only one does, so a
        sum over relays counts each message once."""
    # Connection slots: pool.max_connections of an account across every process. A slot
    # is held from before a connection opens until it closes, under a lease renewed with
    # the claims' (renew_slots); a dead owner's slots are free at once (requeue_expired).
    async def take_slot(self, account: str, most: int, lease_until: float, now: float
                        ) -> int | None:
        """A free connection slot number in [0, ``most``), now held by this owner; None
        while all ``most`` are held by live owners under lease."""
    async def give_slot(self, account: str, slot: int) -> None:
        """This owner's connection on ``slot`` closed."""
    async def renew_slots(self, lease_until: float) -> int:
        """Extend every slot this owner holds; how many it holds."""
    # Account backoff shared by every process, and one probe at a time once it ends.
    async def set_backoff(self, account: str, until: float, reason: str) -> None:
        """Back ``account`` off for every process until ``until`` (epoch; the later of this
        and one already set) because of ``reason``; the probe, if any, is over."""
    async def clear_backoff(self, account: str) -> None:
        """The account works again (a probe got through); `queue flush` clears them all."""
    async def backoffs(self) -> dict[str, tuple[float, str]]:
        """account -> (until, reason) of every account backed off or waiting for a probe."""
    async def take_probe(self, account: str, lease_until: float, now: float) -> bool:
        """True for the one process that may send to ``account`` now: its backoff is over
        and no other live process holds the probe under lease (the probe is then this
        owner's until ``lease_until``), or the account is not backed off at all. A claim
        takes nothing of an account backed off, or probed by another process."""
    # A group's message through a member account (routing.groups) counts in that member's
    # rate windows over every process, as the member's own claims do.
    async def hold_send(self, message_id: str, account: str | None, now: float,
                        lease_until: float, windows: Sequence[tuple[float, int]] = (),
                        reserve_for_high: float = 0.0, high: bool = False) -> bool:
        """The group message ``message_id`` (claimed by this owner) is to go through
        member ``account`` now: if the account's ``windows`` have room for one more send
        (recorded sends, claims and other group messages held; ``high``: it may use the
        share reserve_for_high keeps), hold it in them until its outcome is recorded
        (finish), it moves on, or ``lease_until``; True. Else False, nothing changed.
        ``account`` None: let go of the hold."""
    async def window_open(self, account: str, now: float, windows: Sequence[tuple[float, int]],
                          reserve_for_high: float = 0.0, high: bool = False) -> bool:
        """One more transaction of a send under way (a 452 split; its claim or hold
        counts as the one in flight) fits ``account``'s windows as every process counts
        them (``high``: it may use the share reserve_for_high keeps)."""
    async def processes(self) -> list[tuple[int, str]]:
        """(pid, role) of the relay processes on this queue now: 'serve', 'supervisor',
        'worker N' (for `relay status`)."""

    # -- reports and operator operations ---------------------------------------------
    async def counts(self) -> dict[tuple[str, str], int]: ...
    async def move_messages(
        self,
        *,
        to_account: str,
        states: Sequence[str],
        now: float,
        by: str,
        ids: Sequence[str] = (),
        match: MessageFilter | None = None,
        progress: Progress | None = None,
    ) -> list[tuple[str, str]]:
        """Re-route the messages in ``states`` (or just ``ids``) that ``match`` selects to
        ``to_account``, each keeping its state and due time, with a 'moved' record in its
        attempts saying from where, to where and ``by`` whom; (id, from account) of each."""
    async def oldest_ready(self) -> dict[str, float]: ...
    async def attempt_counts(
        self, accounts: Sequence[str], since: float
    ) -> dict[tuple[str, str], int]: ...
    async def list_messages(
        self, *, state: str | None = None, account: str | None = None, limit: int | None = None
    ) -> list[QueuedMessage]: ...
    def iter_messages(
        self, match: MessageFilter, *, sort: SortKey = SortKey.CREATED, limit: int | None = None
    ) -> AsyncGenerator[QueuedMessage, None]:
        """The messages ``match`` selects, in ``sort`` order, read as they are consumed."""
    async def count_messages(self, match: MessageFilter, *, needs_body: bool = False) -> int:
        """How many messages ``match`` selects (``needs_body``: whose body is still kept)."""
    async def waiting_by_age(
        self, by: str, now: float, bounds: Sequence[float]
    ) -> dict[tuple[str, int], int]:
        """Undelivered messages by account (``by="account"``) or pending recipient domain
        (``"domain"``) and age bucket: (key, i) -> count; bucket i holds ages below
        ``bounds[i]``, bucket len(bounds) the rest."""
    async def get(self, message_id: str) -> QueuedMessage | None: ...
    async def state_of(self, message_id: str) -> MessageState | None: ...
    async def body_if_kept(self, message_id: str) -> bytes | None: ...
    async def update_messages(
        self,
        *,
        states: Sequence[str],
        to_state: str,
        now: float,
        ids: Sequence[str] = (),
        due_now: bool = False,
        reset_failed: bool = False,
        needs_body: bool = False,
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int: ...
    async def delete_messages(
        self,
        *,
        states: Sequence[str],
        ids: Sequence[str] = (),
        match: MessageFilter | None = None,
        progress: Progress | None = None,
        chunk: int = OPERATOR_CHUNK,
    ) -> int: ...

    # -- moving a whole queue between stores (`relay queue export` / `import`) ----------
    def export_messages(self) -> AsyncGenerator[ExportedMessage, None]:
        """Every message in every state, in arrival order, with attempts and body, read
        as consumed from one consistent snapshot (safe beside a running server). A claim
        comes out as due now (types.unclaimed)."""
    async def import_messages(self, items: AsyncIterable[ExportedMessage], *, merge: bool
                              ) -> tuple[int, int]:
        """Add ``items`` as they are (state, times, attempts, body), committed in windows;
        (imported, skipped): an id already in the queue is skipped. StoreError unless
        ``merge`` when the queue already holds a message."""
    def export_sends(self) -> AsyncGenerator[tuple[str, float], None]:
        """(account, at) of every send time kept for rate limits, oldest first."""
    async def import_sends(self, sends: AsyncIterable[tuple[str, float]]) -> int:
        """Record these send times for rate limits, each as it is (into a queue that has
        its own, they add up: limits stricter, never looser); how many were added."""
    # The rest of a whole queue for export/import (format 2).
    def export_dedup(self) -> AsyncGenerator[ExportedDedup, None]:
        """Every dedup key still in its window (expires_at after now), by key."""
    async def import_dedup(self, keys: AsyncIterable[ExportedDedup]) -> int:
        """Record these dedup keys as they are, committed in windows; a key the queue
        already holds keeps its own message and expiry. How many were added."""
    def export_events(self) -> AsyncGenerator[ExportedEvent, None]:
        """Every webhook event still in the outbox (not yet sent or given up), oldest
        first; a claimed one comes out due now (min(next_attempt_at, now)), unowned."""
    async def import_events(self, events: AsyncIterable[ExportedEvent]) -> int:
        """Add these events to the outbox unclaimed, as they are (attempts, due time,
        last error), committed in windows; an (id, webhook) already there is skipped.
        How many were added."""
