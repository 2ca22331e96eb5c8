"""What an account's worker holds that its roles read (relay.delivery.backoff, slowdown,
member, pacing, recording): declared once here, so that each role, a mixin of AccountWorker
(relay.delivery.worker), is type-checked against the worker it becomes part of.

AccountWorker.__init__ sets every attribute; the methods are the worker's and its roles'
own, named here only for the type checker.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.delivery.health import AccountHealth, HealthHook
from relay.delivery.host import HostAccount, SharedBackoff
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.sync import SyncWaiter
from relay.delivery.throttle import Throttle
from relay.delivery.transport import PoolControl, SendResult, Transport
from relay.errors import DeliveryError
from relay.observe.metrics import Metrics
from relay.queue.store import QueueStore
from relay.queue.types import AttemptResult, NewEvent, NewMessage, QueuedMessage, Recipient

# Builds the bounce for a message's newly failed recipients (None: no bounce).
Bounce = Callable[[QueuedMessage, list[Recipient], bytes], NewMessage | None]
# Builds the webhook events of an outcome (message, result, its bounce, the body).
Events = Callable[[QueuedMessage, AttemptResult, NewMessage | None, bytes], list[NewEvent]]


class AccountState:
    """The attributes (and methods) of an AccountWorker that its roles use."""

    name: str
    transport: Transport
    store: QueueStore
    policy: RetryPolicy
    auth_policy: RetryPolicy  # after a refused login: its own, longer floor
    limiter: RateLimiter
    metrics: Metrics
    rng: random.Random
    lease_s: float
    clock: Callable[[], float]  # wall time: what is stored and published
    mono: Callable[[], float]  # backoffs and rate windows: immune to clock jumps
    host: HostAccount | None  # the backoff and probe shared with the other workers
    health: HealthHook | None
    throttle: Throttle
    paused: bool
    in_flight: dict[str, asyncio.Task[None]]
    settling: set[asyncio.Task[None]]
    backoff_until: float  # monotonic
    resume_at: float  # the same instant in wall time, as stored in due times
    backoff_failures: int
    auth_failures: int
    last_account_error: str
    _pool: PoolControl | None
    _health: AccountHealth | None  # the last published
    _group_sends: int  # sends of a group through this account under way
    bounce: Bounce | None
    events: Events | None  # the outcome's webhook events, written with it
    events_written: Callable[[], None] | None  # told once they are committed
    process: int | None  # which worker process this is (--workers N), for the log
    waiters: dict[str, SyncWaiter]  # ack: after_upstream sessions, by message id

    if TYPE_CHECKING:
        # The worker's (relay.delivery.worker)
        def notify(self) -> None: ...
        def _capacity(self) -> int: ...
        def _trim_ready(self, now: float) -> None: ...
        def _unclaim_ready(self, now: float, due_at: float | None = None) -> None: ...
        # The pacing's (relay.delivery.pacing)
        async def _record_progress(self, message: QueuedMessage, so_far: SendResult | None,
                                   sent_by: str | None) -> bool: ...
        # The backoff's (relay.delivery.backoff)
        @property
        def held_back(self) -> bool: ...
        async def _follow_host(self, shared: SharedBackoff | None, now: float, mono: float,
                               *, own: bool = True) -> float | None: ...
        def _account_health(self, sent: SendResult | DeliveryError,
                            now: float) -> float | None: ...
        def _wall_at(self, mono_at: float) -> float: ...
        def _publish(self, health: AccountHealth) -> None: ...
        # The slow-down's (relay.delivery.slowdown)
        def _note_slow_down(self, sent: SendResult | DeliveryError) -> None: ...
