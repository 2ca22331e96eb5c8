"""Sending delivery events from the queue's outbox to webhooks over HTTP (aiohttp).

Each process runs one sender. It claims due outbox rows (owner and lease, as messages
are claimed), so with several workers one of them POSTs each event; it deletes a row once
its webhook answered 2xx, retries it later with exponential backoff otherwise, and gives
it up past the webhook's max_age (logged, counted). Delivery never waits for any of this:
the outcome's transaction only adds the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp

from relay.config.schema import WebhookConfig
from relay.delivery.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, retry_at, signature
from relay.errors import StoreError
from relay.observe.logs import event
from relay.observe.metrics import Metrics
from relay.queue.store import QueueStore
from relay.queue.types import PendingEvent

log = logging.getLogger("relay.events")
BATCH = 16  # events claimed per round
# POSTs under way at once: the sender claims more as each ends, so a webhook that hangs
# holds only its own events' slots (until its timeout), not a batch of everyone's.
MAX_POSTING = 4 * BATCH
POLL_S = 2.0  # how often the outbox is read for events written by other processes
IDLE_POLL_S = 60.0  # ... when this process has no webhook configured
LEASE_MARGIN_S = 30.0  # a claim outlives the POST's timeout by this much
RESULTS = ("sent", "failed", "gave_up")


def _why(exc: BaseException) -> str:
    """A failed POST in words, without the URL (it may carry credentials)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__


def _retry_at(hook: WebhookConfig, pending: PendingEvent, now: float) -> float | None:
    """The next POST of ``pending`` after this attempt failed, on ``hook``'s backoff; None:
    past its max_age, give it up (relay.delivery.events.retry_at)."""
    return retry_at(pending.attempts + 1, pending.created_at, now,
                    initial_s=hook.retry_initial, max_s=hook.retry_max,
                    max_age_s=hook.max_age)


class WebhookSender:
    """The outbox's sender for this process (``start``, ``notify``, ``stop``)."""

    def __init__(self, store: QueueStore, webhooks: Sequence[WebhookConfig], metrics: Metrics,
                 *, clock: Callable[[], float] = time.time, poll_s: float = POLL_S) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.poll_s = poll_s
        self.hooks: dict[str, WebhookConfig] = {}
        # Every webhook this process was configured with, by label: the events of one a
        # reload removed wait for its return (or a webhook of the same name) until its
        # max_age, rather than being dropped by a URL fix that changed its label.
        self._known: dict[str, WebhookConfig] = {}
        self.wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._posting: set[asyncio.Task[None]] = set()
        self._held: dict[tuple[str, str], PendingEvent] = {}  # claimed, not yet settled
        self.configure(webhooks)

    def configure(self, webhooks: Sequence[WebhookConfig]) -> None:
        """Take the webhooks of a new config (start, reload); their series start at 0."""
        self.hooks = {h.label: h for h in webhooks}
        self._known.update(self.hooks)
        for name in self.hooks:
            for result in RESULTS:
                self.metrics.webhook_deliveries.labels(name, result)
        # Also without webhooks: rows left for one that a config change removed are
        # dropped (logged) rather than kept in the queue file for ever.
        if self._task is None and self._session is not None:
            self._task = asyncio.create_task(self._run(), name="webhook-sender")

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "relay", "Content-Type": "application/json"})
        self.configure(list(self.hooks.values()))

    def notify(self) -> None:
        """New events were written by this process: look now."""
        self.wake.set()

    async def stop(self, grace: float) -> None:
        """POSTs under way get ``grace`` to finish; a cut-off one keeps its outbox row,
        due again at once for whichever process runs next (it may have arrived: receivers
        deduplicate by event id)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._posting:
            _, pending = await asyncio.wait(self._posting, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for held in list(self._held.values()):
            await self._settle(held, self.clock(), "interrupted by shutdown")
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def lease_s(self) -> float:
        return max((h.timeout for h in self.hooks.values()), default=0.0) + LEASE_MARGIN_S

    async def _run(self) -> None:
        while True:
            self.wake.clear()
            try:
                # A read first: an idle outbox costs no write (and no commit) per look.
                due = await self.store.next_event_at()
                room = MAX_POSTING - len(self._posting)
                if room <= 0:
                    due = None  # every slot busy: a POST that ends wakes us
                elif due is not None and due <= self.clock():
                    claimed = await self.store.claim_events(self.clock(), min(BATCH, room),
                                                            self.lease_s)
                    if claimed:
                        self._post_all(claimed)
                        continue
            except StoreError as exc:
                event(log, logging.ERROR, "queue_error", reason=f"webhook outbox: {exc}")
                due = None
            except Exception:  # a bug: log, count, go on rather than stop sending events
                log.exception("webhook sender failed; restarting it")
                self.metrics.internal_errors.labels("webhook_sender").inc()
                due = None
            poll = self.poll_s if self.hooks else IDLE_POLL_S
            # (At least a moment: a due row another process claimed just now.)
            wait = poll if due is None else min(max(due - self.clock(), 0.01), poll)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()

    def _post_all(self, claimed: list[PendingEvent]) -> None:
        """POST each claimed event in a task of its own, not waited for: one slow
        receiver delays only its own events (stop() gives these their grace)."""
        self._held.update(((e.id, e.webhook), e) for e in claimed)
        for pending in claimed:
            task = asyncio.create_task(self._post(pending), name=f"webhook-{pending.id}")
            self._posting.add(task)
            task.add_done_callback(self._posted)

    def _posted(self, task: asyncio.Task[None]) -> None:
        self._posting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook post failed", exc_info=task.exception())
            self.metrics.internal_errors.labels("webhook_sender").inc()
        self.wake.set()  # a slot is free: claim more

    async def _post(self, pending: PendingEvent) -> None:
        hook = self.hooks.get(pending.webhook)
        if hook is None:  # removed from the config since it was written
            await self._orphan(pending)
            return
        error = await self._send(hook, pending)
        now = self.clock()
        if error is None:
            self.metrics.webhook_deliveries.labels(hook.label, "sent").inc()
            await self._settle(pending, None)
            return
        again = _retry_at(hook, pending, now)
        if again is None:
            self.metrics.webhook_deliveries.labels(hook.label, "gave_up").inc()
            event(log, logging.ERROR, "webhook_gave_up", webhook=hook.label,
                  event_id=pending.id, type=pending.type, attempts=pending.attempts + 1,
                  reason=f"{error}; not accepted within max_age")
            await self._settle(pending, None)
            return
        self.metrics.webhook_deliveries.labels(hook.label, "failed").inc()
        event(log, logging.WARNING, "webhook_failed", webhook=hook.label, event_id=pending.id,
              type=pending.type, attempts=pending.attempts + 1, reason=error,
              retry_in=f"{again - now:.1f}s")
        await self._settle(pending, again, error)

    async def _orphan(self, pending: PendingEvent) -> None:
        """An event for a webhook not in the config now. Removed by a reload: it waits, on
        that webhook's backoff, until its max_age, and goes to a webhook of the same name
        if one returns. Unknown to this process (a restart without it): given up at
        once. Either way a give-up is logged and counted, never silent."""
        why = "no webhook of this name in the config"
        old = self._known.get(pending.webhook)
        if old is not None:
            now = self.clock()
            again = _retry_at(old, pending, now)
            if again is not None:
                event(log, logging.WARNING, "webhook_failed", webhook=pending.webhook,
                      event_id=pending.id, type=pending.type, attempts=pending.attempts + 1,
                      reason=f"{why}; kept until its max_age in case it returns",
                      retry_in=f"{again - now:.1f}s")
                await self._settle(pending, again, why)
                return
            why += " since a reload; none returned within max_age"
        self.metrics.webhook_deliveries.labels(pending.webhook, "gave_up").inc()
        event(log, logging.ERROR, "webhook_gave_up", webhook=pending.webhook,
              event_id=pending.id, type=pending.type, attempts=pending.attempts, reason=why)
        await self._settle(pending, None)

    async def _send(self, hook: WebhookConfig, pending: PendingEvent) -> str | None:
        """POST one event; None when the webhook accepted it (2xx), else why not."""
        assert self._session is not None
        stamp = str(int(self.clock()))
        headers = {TIMESTAMP_HEADER: stamp,
                   SIGNATURE_HEADER: signature(hook.secret, stamp, pending.body)}
        try:
            async with self._session.post(
                hook.url, data=pending.body.encode(), headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=hook.timeout),
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _why(exc)

    async def _settle(self, pending: PendingEvent, retry_at: float | None,
                      error: str = "") -> None:
        self._held.pop((pending.id, pending.webhook), None)
        try:
            await self.store.settle_event(pending, retry_at=retry_at, error=error)
        except StoreError as exc:  # the lease returns it: sent again, receivers dedup by id
            event(log, logging.ERROR, "queue_error", reason=f"webhook outbox: {exc}")
