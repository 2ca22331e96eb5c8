"""The delivery loop: per account, claim due messages in priority order and send them.

Each account has its own worker, so an account that is down, slow or throttled never
holds up another. A worker sleeps on an asyncio.Event until a message arrives, a send
finishes, or the next deferred message or rate-limit window comes due.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import socket
import time
from collections.abc import Callable

from relay.bounce import build_dsn, needs_smtputf8, should_bounce
from relay.config import Config
from relay.errors import DeliveryError, StoreError, TemporaryFailure
from relay.health import AccountHealth, HealthHook, HealthPublisher
from relay.logs import event
from relay.message import (
    AttemptResult,
    MessageState,
    NewMessage,
    Priority,
    QueuedMessage,
    Recipient,
    RecipientState,
    new_queue_id,
)
from relay.metrics import Metrics
from relay.outcome import settle
from relay.ratelimit import RateLimiter
from relay.retry import RetryPolicy
from relay.store import SQLiteStore
from relay.transport import SendResult, Transport

log = logging.getLogger("relay.delivery")
FLUSH_KEY = "flush_requested_at"  # written by `relay queue flush`, read by the watcher
CHANGE_POLL_S = 0.5  # how soon `relay queue ...` changes made by another process are seen
_FINISH_RETRY_S = 1.0
# Builds the bounce for a message's newly failed recipients (None: no bounce).
Bounce = Callable[[QueuedMessage, list[Recipient], bytes], NewMessage | None]


def _addresses(recipients: list[Recipient]) -> str:
    return ",".join(f"<{r.address}>" for r in recipients)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class AccountWorker:
    """Delivers one account's messages with at most ``concurrency`` sends at once."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        store: SQLiteStore,
        policy: RetryPolicy,
        limiter: RateLimiter,
        metrics: Metrics,
        *,
        concurrency: int,
        lease_s: float,
        clock: Callable[[], float],
        rng: random.Random,
        bounce: Bounce | None = None,
        health: HealthHook | None = None,
    ) -> None:
        self.name = name
        self.bounce = bounce
        self.health = health  # told of each change of backoff, for `relay status`
        self.transport = transport
        self.store = store
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.clock = clock
        self.rng = rng
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.settling: set[asyncio.Task[None]] = set()  # outcome writes under way
        self.ready: collections.deque[QueuedMessage] = collections.deque()  # claimed, unsent
        # Claim-ahead depth: one pool's worth, but not for rate-limited accounts (it would
        # spend their budget early and gain nothing at their pace).
        self.prefetch = 0 if limiter.limited else concurrency
        self.backoff_until = 0.0
        self.backoff_failures = 0
        self.last_account_error = ""
        self._held = False
        self._notices = 0  # bumped by notify(): an idle verdict older than this is stale
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"account-{self.name}")

    def notify(self) -> None:
        self._notices += 1
        self.idle.clear()
        if self.clock() >= self.backoff_until:  # a backed-off account has nothing to do
            self.wake.set()

    def resume(self) -> None:
        """End an account-wide backoff now (an operator's `queue flush`)."""
        self.backoff_until = 0.0
        self.notify()
        self.wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self.wake.clear()
            try:
                timeout = await self._dispatch()
            except StoreError as exc:
                event(log, logging.ERROR, "queue_error", account=self.name, reason=str(exc))
                timeout = _FINISH_RETRY_S
            if self._stopping:
                break
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.wake.wait()

    def _slots(self) -> int:
        # While an account is backing off as a whole, one probe at a time. A slot is busy
        # until its outcome is recorded: a crash then re-sends at most one pool's worth.
        limit = 1 if self.backoff_failures else self.concurrency
        return limit - len(self.in_flight) - len(self.settling)

    async def _dispatch(self) -> float | None:
        """Start what may go now; return how long to sleep (None: until woken)."""
        now = self.clock()
        notices = self._notices
        if now < self.backoff_until:
            if not self.in_flight and not self.settling and not self.ready:
                due = await self.store.next_due_at(self.name)
                if due is None or due >= self.backoff_until:
                    self._mark_idle(notices)  # nothing could go before the backoff ends
            return self.backoff_until - now
        self._start_ready()
        slots = self._slots()
        # Claim ahead: a claim is a commit (a sync), so claimed messages wait in `ready`
        # and a finishing send starts the next at once instead of waiting for the disk.
        want = slots + self.prefetch - len(self.ready)
        if want <= 0:
            return None
        hold = self.limiter.wait_time(now)
        if hold == 0 and await self._claim(now, want):
            return 0.0
        if self.in_flight or self.ready:
            return None  # a finishing send wakes us
        due = await self.store.next_due_at(self.name)
        if due is None or due > now:
            if not self.settling:
                self._mark_idle(notices)
            return None if due is None else due - now
        if hold > 0:
            if not self._held:  # count each hold once, not each wake-up
                self.metrics.rate_limited.labels(self.name).inc()
                self._held = True
            return hold
        return 0.05  # due but not claimed (the clock moved): look again shortly

    def _mark_idle(self, notices: int) -> None:
        """Idle, unless a message arrived while we were looking (then look again)."""
        if notices == self._notices:
            self.idle.set()

    async def _claim(self, now: float, want: int) -> bool:
        """Claim up to `want` due messages within the rate limit; start what can start."""
        allowed = min(want, self.limiter.available(now))
        batch = await self.store.claim_due(self.name, now, allowed, self.lease_s)
        if not batch:
            return False
        self._held = False
        self.idle.clear()
        for _ in batch:
            self.limiter.record(now)
        self.ready.extend(batch)
        self._start_ready()
        return True

    def _start_ready(self) -> None:
        """Hand claimed messages to free slots (also called as each send finishes)."""
        if self._stopping or self.clock() < self.backoff_until:
            return
        while self.ready and self._slots() > 0:
            self._start(self.ready.popleft())

    def _start(self, message: QueuedMessage) -> None:
        task = asyncio.create_task(self._deliver(message), name=f"deliver-{message.id}")
        self.in_flight[message.id] = task
        task.add_done_callback(functools.partial(self._done, message.id))

    def _done(self, message_id: str, _task: asyncio.Task[None]) -> None:
        self.in_flight.pop(message_id, None)
        self._start_ready()
        self.wake.set()

    async def _deliver(self, message: QueuedMessage) -> None:
        started = self.clock()
        sent: SendResult | DeliveryError
        body = b""
        try:
            body = await self.store.load_body(message.id)
            sent = await self.transport.send(
                message.sender, message.pending_recipients, body, message.mail_options
            )
        except DeliveryError as exc:
            sent = exc
        except StoreError as exc:
            sent = TemporaryFailure(f"queue: {exc}")
        except Exception as exc:  # a bug must not strand the message in 'sending'
            log.exception("unexpected error delivering %s", message.id)
            sent = TemporaryFailure(f"internal error: {type(exc).__name__}")
        now = self.clock()
        resume_at = self._account_health(sent, now)
        result = settle(message, sent, now=now, policy=self.policy, rng=self.rng,
                        resume_at=resume_at)
        # The slot is free once the upstream has answered: recording the outcome (a
        # commit, and so a sync) happens beside the next send instead of before it. The
        # row stays 'sending' until then, so it cannot be claimed twice; shutdown waits
        # for these writes (see settling).
        task = asyncio.create_task(self._record(message, result, sent, started, body),
                                   name=f"record-{message.id}")
        self.settling.add(task)
        task.add_done_callback(self._recorded)

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self.settling.discard(task)
        self._start_ready()
        self.wake.set()

    async def _record(self, message: QueuedMessage, result: AttemptResult,
                      sent: SendResult | DeliveryError, started: float, body: bytes) -> None:
        was_pending = set(message.pending_recipients)
        failed = [r for r in result.recipients
                  if r.state is RecipientState.FAILED and r.address in was_pending]
        bounce = None
        # Never to <>: a bounce is sent from <>, so a bounce never causes another.
        if self.bounce is not None and should_bounce(message.sender, failed):
            bounce = self.bounce(message, failed, body)
        await self._write(result, bounce)  # the outcome and its bounce in one commit
        self._report(message, result, sent, started)
        if bounce is not None:
            event(log, logging.INFO, "bounced", message.id, bounce_id=bounce.id,
                  to=f"<{message.sender}>", failed=len(failed))
            self.notify()  # a bounce goes through the failed message's own account

    async def _write(self, result: AttemptResult, bounce: NewMessage | None = None) -> None:
        while True:
            try:
                await self.store.finish(result, bounce)
                return
            except StoreError as exc:
                event(log, logging.ERROR, "queue_error", result.id, account=self.name,
                      reason=f"cannot record outcome, will retry: {exc}")
                await asyncio.sleep(_FINISH_RETRY_S)

    def _account_health(self, sent: SendResult | DeliveryError, now: float) -> float | None:
        """Back the account off on account-wide failures; return when it resumes."""
        if not isinstance(sent, DeliveryError) or not sent.account_wide:
            recovered = self.backoff_failures > 0
            if recovered:
                event(log, logging.INFO, "account_recovered", account=self.name)
            self.backoff_failures = 0
            self.last_account_error = ""
            if recovered and self.health is not None:
                self.health(AccountHealth(self.name, self.backoff_until, 0))
            return None
        auth = sent.code == 535 or (sent.code is not None and sent.enhanced == "5.7.8")
        if auth:  # every refused login counts, also those already inside a backoff
            self.metrics.auth_failures.labels(self.name).inc()
        if now < self.backoff_until:  # another send already backed it off
            return self.backoff_until
        self.backoff_failures += 1
        self.backoff_until = now + self.policy.next_delay(self.backoff_failures, self.rng)
        self.last_account_error = sent.reply_text()
        event(log, logging.ERROR if auth else logging.WARNING,
              "account_auth_failed" if auth else "account_backoff", account=self.name,
              relay=self.transport.peer, reason=sent.reply_text(),
              until=_iso(self.backoff_until))
        if self.health is not None:
            self.health(AccountHealth(self.name, self.backoff_until, self.backoff_failures,
                                      self.last_account_error, auth))
        return self.backoff_until

    def _report(self, message: QueuedMessage, result: AttemptResult,
                sent: SendResult | DeliveryError, started: float) -> None:
        account = self.name
        peer = sent.peer if isinstance(sent, SendResult) else self.transport.peer
        if not (isinstance(sent, DeliveryError) and sent.account_wide):
            # Every attempt that reached a transaction, failed ones too (the slow cases).
            self.metrics.delivery_duration.labels(account).observe(result.at - started)
        if result.state is MessageState.DELIVERED:
            self.metrics.delivered.labels(account).inc()
            self.metrics.queue_delay.labels(account).observe(result.at - message.created_at)
            event(log, logging.INFO, "delivered", message.id, account=account, relay=peer,
                  delay=f"{result.at - message.created_at:.3f}", attempt=result.attempts,
                  reply=result.reply,
                  failed_recipients=sum(r.state == "failed" for r in result.recipients) or None)
        elif result.state is MessageState.DEFERRED:
            self.metrics.deferred.labels(account).inc()
            event(log, logging.WARNING, "deferred", message.id, account=account, relay=peer,
                  attempt=result.attempts, reason=result.last_error,
                  next_attempt=_iso(result.next_attempt_at))
        else:
            self.metrics.failed.labels(account).inc()
            event(log, logging.WARNING, "failed", message.id, account=account, relay=peer,
                  attempt=result.attempts, reason=result.last_error)
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

    def stop_claiming(self) -> None:
        self._stopping = True
        self.wake.set()

    async def join(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: SQLiteStore,
        transports: dict[str, Transport],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.bounces = config.bounces.enabled
        self._hostname = socket.gethostname()
        self.rng = rng or random.Random()
        self.health = HealthPublisher(store.set_meta, clock)
        self.workers: dict[str, AccountWorker] = {
            name: self._make_worker(name, config, transports[name]) for name in config.accounts
        }
        self._watcher: asyncio.Task[None] | None = None
        self._flush_seen: str | None = None

    def _make_worker(self, name: str, config: Config, transport: Transport) -> AccountWorker:
        acc = config.accounts[name]
        t = acc.timeouts
        return AccountWorker(
            name,
            transport,
            self.store,
            RetryPolicy.from_config(config.retry_for(name)),
            RateLimiter(acc.rate_limit.windows()),
            self.metrics,
            concurrency=acc.pool.max_connections,
            lease_s=t.connect + 4 * t.command + t.data + 60,
            clock=self.clock,
            rng=self.rng,
            bounce=self._make_bounce,
            health=self.health.update,
        )

    async def _start_worker(self, worker: AccountWorker, now: float) -> None:
        if worker.limiter.limited:
            since = now - worker.limiter.longest_window
            worker.limiter.restore(await self.store.recent_sends(worker.name, since), now)
        worker.start()

    async def prepare_workers(
        self, config: Config, transports: dict[str, Transport], names: set[str]
    ) -> dict[str, AccountWorker]:
        """Reload, step 1: new workers for the named accounts (added or changed), their
        rate windows restored. May fail (the queue file); changes nothing running."""
        now = self.clock()
        fresh = {name: self._make_worker(name, config, transports[name]) for name in names}
        for worker in fresh.values():
            if worker.limiter.limited:
                since = now - worker.limiter.longest_window
                worker.limiter.restore(await self.store.recent_sends(worker.name, since), now)
        return fresh

    def swap_workers(self, config: Config, fresh: dict[str, AccountWorker]) -> list[AccountWorker]:
        """Reload, step 2, without an await (no session sees half of it): the prepared
        workers start, accounts no longer configured stop. Returns the retired workers,
        for the caller to drain."""
        self.bounces = config.bounces.enabled  # read at each failure: applies to every worker
        retired = [w for n, w in self.workers.items() if n in fresh or n not in config.accounts]
        for worker in retired:
            worker.stop_claiming()
            del self.workers[worker.name]
            self.health.update(AccountHealth(worker.name, 0.0, 0))  # a fresh start
        for name, worker in fresh.items():
            self.workers[name] = worker
            worker.start()
        return retired

    async def drain(self, workers: list[AccountWorker], grace: float) -> None:
        """Let retired workers finish their sends; what they claimed ahead is requeued."""
        for worker in workers:
            await worker.join()
        claimed = [m.id for w in workers for m in w.ready]
        if claimed:
            with contextlib.suppress(StoreError):
                await self.store.requeue(claimed, self.clock())
        busy = [t for w in workers for t in (*w.in_flight.values(), *w.settling)]
        if busy:
            await asyncio.wait(busy, timeout=grace)

    async def start(self) -> None:
        now = self.clock()
        recovered = await self.store.recover(now)
        if recovered:
            event(log, logging.WARNING, "recovered", count=recovered,
                  reason="messages being delivered when relay stopped are queued again")
        for worker in self.workers.values():
            await self._start_worker(worker, now)
        self._flush_seen = await self.store.get_meta(FLUSH_KEY)
        await self.store.changed_elsewhere()  # the baseline: later CLI changes are seen
        self._watcher = asyncio.create_task(self._watch(), name="queue-watcher")

    def notify(self, account: str) -> None:
        """Wake the account's worker; an account removed by a reload has none (its
        messages wait until it returns)."""
        worker = self.workers.get(account)
        if worker is not None:
            worker.notify()

    def _make_bounce(
        self, message: QueuedMessage, failed: list[Recipient], original: bytes
    ) -> NewMessage | None:
        """An RFC 3464 notice to the sender, through the failed message's own account
        (its credentials and From domain, not the default account's)."""
        if not self.bounces:
            return None
        now = self.clock()
        try:
            dsn = build_dsn(queue_id=message.id, sender=message.sender, failed=failed,
                            original=original, reporting_mta=self._hostname,
                            arrival=message.created_at, now=now)
        except Exception as exc:  # a bug here must not keep the outcome from being recorded
            log.exception("cannot build the bounce for %s", message.id)
            event(log, logging.ERROR, "bounce_failed", message.id,
                  reason=f"internal error: {type(exc).__name__}")
            return None
        options = ["SMTPUTF8"] if needs_smtputf8(message.sender) else []
        if not dsn.isascii():
            options.append("BODY=8BITMIME")
        return NewMessage(id=new_queue_id(), sender="", recipients=(message.sender,),
                          account=message.account, priority=Priority.NORMAL, body=dsn,
                          created_at=now, not_before=now, mail_options=tuple(options))

    def wake_all(self) -> None:
        for worker in self.workers.values():
            worker.notify()

    async def _watch(self) -> None:
        """Notice changes made by `relay queue ...` in another process."""
        while True:
            await asyncio.sleep(CHANGE_POLL_S)
            try:
                if not await self.store.changed_elsewhere():
                    continue
                flush = await self.store.get_meta(FLUSH_KEY)
            except StoreError:
                continue
            if flush != self._flush_seen:
                self._flush_seen = flush
                for worker in self.workers.values():
                    worker.resume()
                event(log, logging.INFO, "flush", reason="requested by relay queue flush")
            self.wake_all()

    async def run_until_idle(self) -> None:
        """Return once nothing is in flight and nothing is due (tests, `burst` runs)."""
        while True:
            await asyncio.gather(*(w.idle.wait() for w in self.workers.values()))
            await asyncio.sleep(0)
            if all(w.idle.is_set() and not w.in_flight and not w.settling
                   for w in self.workers.values()):
                return

    async def stop(self, grace: float) -> None:
        """Stop claiming, give in-flight sends ``grace`` seconds, requeue the rest."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for worker in self.workers.values():
            worker.stop_claiming()
        for worker in self.workers.values():
            await worker.join()
        claimed = [m.id for w in self.workers.values() for m in w.ready]
        if claimed:  # claimed ahead but never sent: due again at once
            with contextlib.suppress(StoreError):
                await self.store.requeue(claimed, self.clock())
        tasks = {mid: t for w in self.workers.values() for mid, t in w.in_flight.items()}
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            unfinished = [mid for mid, t in tasks.items() if t in pending]
            if unfinished:
                with contextlib.suppress(StoreError):
                    await self.store.requeue(unfinished, self.clock())
        # Outcomes already decided are written before the store closes.
        recording = [t for w in self.workers.values() for t in w.settling]
        if recording:
            await asyncio.wait(recording, timeout=grace)
