"""The delivery scheduler: one AccountWorker per account (relay.delivery.worker), and the
watcher that notices what the workers cannot: clock jumps, expired leases, and changes
made by `relay queue` in another process (including a flush request).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable

from relay.config.schema import Config, RetryConfig, TimeoutsConfig
from relay.delivery.bounce import build_dsn, needs_smtputf8
from relay.delivery.events import event_body, event_types
from relay.delivery.groups import Group, GroupTransport
from relay.delivery.health import AccountHealth, HealthPublisher, decode
from relay.delivery.host import HostAccounts
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.rewrite import Rewrite
from relay.delivery.transport import Transport
from relay.delivery.worker import AccountWorker
from relay.errors import StoreError
from relay.observe.logs import event
from relay.observe.metrics import Metrics
from relay.queue.store import QueueStore
from relay.queue.types import (
    AttemptResult,
    NewEvent,
    NewMessage,
    Priority,
    QueuedMessage,
    Recipient,
    new_queue_id,
)
from relay.smtp.headers import message_id_of, parse_headers
from relay.smtp.replies import Reply

log = logging.getLogger("relay.delivery")
CHANGE_POLL_S = 0.5  # how soon `relay queue ...` changes made by another process are seen
CLOCK_JUMP_S = 1.0  # a larger difference between wall and monotonic time is a jump
LEASE_SWEEP_S = 30.0  # how often expired leases are looked for (11.14)



def _retry_policy(cfg: RetryConfig) -> RetryPolicy:
    """The config's merged retry block as the runtime policy: translated here, once."""
    return RetryPolicy(cfg.initial_delay, cfg.max_delay, cfg.max_age, cfg.jitter)


def _lease_s(t: TimeoutsConfig) -> float:
    """A claim's lease: the longest one send may take (connect, EHLO, AUTH, MAIL and RCPT
    at command timeouts, the data timeout after the dot) and a minute's margin; renewed
    every third of it while the send goes on."""
    return t.connect + 4 * t.command + t.data + 60


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: QueueStore,
        transports: dict[str, Transport],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        hosts: HostAccounts | None = None,
        process: int | None = None,
    ) -> None:
        self.store = store
        self.hosts = hosts  # several workers deliver: accounts shared through the queue
        self.process = process  # this worker's index (--workers N), named in the log
        self.clock = clock
        self.mono = monotonic
        self.lease_sweep_s = LEASE_SWEEP_S
        self._next_sweep = 0.0
        self._next_renew = 0.0
        self.running = False  # start() was called: this process delivers
        self._skew = clock() - monotonic()  # wall minus monotonic: changes when it jumps
        self.metrics = metrics
        self.bounces = config.bounces.enabled
        self.webhooks = list(config.events.webhooks)  # read at each outcome, like bounces
        # Told (by the app: the webhook sender) once events are committed.
        self.events_written: Callable[[], None] = lambda: None
        self._hostname = socket.gethostname()
        self.rng = rng or random.Random()
        self.health = HealthPublisher(store.publish_health, clock)
        self.transports = transports  # live (the app's): groups send through them
        self.workers: dict[str, AccountWorker] = {
            name: self._make_worker(name, config, transports.get(name))
            for name in [*config.accounts, *config.routing.groups]
        }
        self._watcher: asyncio.Task[None] | None = None
        self._flush_seen: str | None = None

    def _make_worker(self, name: str, config: Config, transport: Transport | None
                     ) -> AccountWorker:
        if name in config.routing.groups:
            return self._make_group_worker(name, config)
        assert transport is not None
        acc = config.accounts[name]
        t = acc.timeouts
        auth = config.auth_backoff_for(name)
        lease_s = _lease_s(t)
        host = None
        if self.hosts is not None:  # slots are renewed with the longest claim lease
            self.hosts.lease_s = max(self.hosts.lease_s, lease_s)
            host = self.hosts.account(name, acc.pool.max_connections)
        return AccountWorker(
            name,
            transport,
            self.store,
            _retry_policy(config.retry_for(name)),
            RateLimiter(acc.rate_limit.windows(), acc.rate_limit.reserve_for_high),
            self.metrics,
            concurrency=acc.pool.max_connections if host is None else host.share,
            lease_s=lease_s,
            clock=self.clock,
            rng=self.rng,
            bounce=self._make_bounce,
            events=self._make_events,
            events_written=lambda: self.events_written(),
            health=self.health.update,
            auth_policy=RetryPolicy(auth.initial, auth.max, float("inf"), jitter=0.0),
            monotonic=self.mono,
            age_clock=self._age_now,
            rewrite=None if acc.rewrite is None else Rewrite(
                acc.rewrite.envelope_from, acc.rewrite.header_from == "replace",
                acc.rewrite.reply_to == "original"),
            host=host,
            process=self.process,
        )

    def _make_group_worker(self, name: str, config: Config) -> AccountWorker:
        """A group's worker: it claims the group's mail and sends each message through a
        member account (relay.delivery.groups), within that member's pool and limits."""
        spec = config.routing.groups[name]
        group = Group(name, tuple(spec.accounts), spec.mode, spec.weights)
        members = [config.accounts[a] for a in spec.accounts]
        t = max((m.timeouts for m in members), key=lambda t: t.connect + t.command + t.data)
        # Members are looked up at each send: a reload's new workers are used at once.
        transport = GroupTransport(group, self.transports, lambda a: self.workers.get(a),
                                   self.rng, paused=self.store.paused_accounts)
        return AccountWorker(
            name, transport, self.store, _retry_policy(config.retry), RateLimiter([]),
            self.metrics,
            concurrency=sum(m.pool.max_connections for m in members),
            lease_s=_lease_s(t),
            clock=self.clock, rng=self.rng, bounce=self._make_bounce,
            events=self._make_events, events_written=lambda: self.events_written(),
            health=self.health.update, monotonic=self.mono, age_clock=self._age_now,
            process=self.process,
        )

    def _clock_jump(self) -> float:
        """How far the wall clock jumped since its stored times were last reconciled."""
        return (self.clock() - self.mono()) - self._skew

    def _age_now(self, now: float) -> float:
        """``now`` less a forward jump not yet reconciled (_reconcile_clock): a clock set
        ahead must not expire and bounce deferred mail at its next attempt."""
        jump = self._clock_jump()
        return now - jump if jump > CLOCK_JUMP_S else now

    async def _reconcile_clock(self) -> None:
        """After a wall-clock jump, move stored times of unfinished messages with it.

        Backoffs and rate windows run on monotonic time and need nothing; due times,
        ages and leases are stored in wall time: without this a backward jump of an hour
        would hold every deferred message an hour longer, and a forward jump would make
        them all due, and old enough to expire, at once.
        """
        jump = self._clock_jump()
        if abs(jump) <= CLOCK_JUMP_S:
            return
        moved = await self.store.shift_times(jump)
        self._skew += jump
        event(log, logging.WARNING, "clock_jump", count=moved, seconds=f"{jump:+.0f}",
              reason="the wall clock jumped; due times and ages of queued messages moved"
                     " with it")
        self.wake_all()

    async def _restore_rate(self, worker: AccountWorker, now: float) -> None:
        """Load the account's recent sends into its limiter, so limits hold across a
        restart or a reload. Stored send times are wall-clock; the limiter counts in
        monotonic time."""
        if not worker.limiter.limited:
            return
        since = now - worker.limiter.longest_window
        offset = self.mono() - now
        sent = await self.store.recent_sends(worker.name, since)
        worker.limiter.restore([t + offset for t in sent], self.mono())

    async def _start_worker(self, worker: AccountWorker, now: float) -> None:
        await self._restore_rate(worker, now)
        worker.start()

    async def prepare_workers(
        self, config: Config, transports: dict[str, Transport], names: set[str]
    ) -> dict[str, AccountWorker]:
        """Reload, step 1: new workers for the named accounts (added or changed), their
        rate windows restored. May fail (the queue file); changes nothing running."""
        now = self.clock()
        fresh = {name: self._make_worker(name, config, transports.get(name)) for name in names}
        paused = await self.store.paused_accounts()  # a paused account stays paused
        for worker in fresh.values():
            worker.paused = worker.name in paused
            await self._restore_rate(worker, now)
        return fresh

    def swap_workers(self, config: Config, fresh: dict[str, AccountWorker]) -> list[AccountWorker]:
        """Reload, step 2, without an await (no session sees half of it): the prepared
        workers start, accounts no longer configured stop. Returns the retired workers,
        for the caller to drain."""
        self.bounces = config.bounces.enabled  # read at each failure: applies to every worker
        self.webhooks = list(config.events.webhooks)
        retired = [w for n, w in self.workers.items()
                   if n in fresh or (n not in config.accounts and n not in config.routing.groups)]
        for worker in retired:
            worker.stop_claiming()
            del self.workers[worker.name]
            self.health.update(AccountHealth(worker.name, 0.0, 0))  # a fresh start
        for name, worker in fresh.items():
            self.workers[name] = worker
            if self.running:  # (a worker process that only receives delivers nothing)
                worker.start()
        return retired

    async def _stop_claims(self, workers: list[AccountWorker]) -> None:
        """Wait for the workers' loops to end; what they claimed ahead but never sent is
        due again at once."""
        for worker in workers:
            await worker.join()
        claimed = [m.id for w in workers for m in w.ready]
        if claimed:
            with contextlib.suppress(StoreError):
                await self.store.requeue(claimed, self.clock())

    async def drain(self, workers: list[AccountWorker], grace: float) -> None:
        """Let retired workers finish their sends; what they claimed ahead is requeued."""
        await self._stop_claims(workers)
        busy = [t for w in workers for t in (*w.in_flight.values(), *w.settling)]
        if busy:
            await asyncio.wait(busy, timeout=grace)

    async def start(self) -> None:
        self.running = True
        now = self.clock()
        recovered = await self.store.recover(now)
        if recovered:
            event(log, logging.WARNING, "recovered", count=recovered,
                  reason="messages being delivered when relay stopped are queued again")
        # Workers share backoffs in the queue (kept across restarts): each follows those,
        # not the last report, which may be another worker's and older.
        previous = None if self.hosts else decode(await self.store.read_health())
        if self.hosts is None:
            # One process: its own backoffs are in its report; rows left by a run with
            # several workers would hold its claims (it never takes their probe).
            for name in await self.store.backoffs():
                await self.store.clear_backoff(name)
        for worker in self.workers.values():
            health = previous.accounts.get(worker.name) if previous else None
            if health is not None and health.failures > 0:
                worker.restore_backoff(health, now)
                # Published again under this process: `relay status` ignores a report
                # whose process is gone, and the next report must not drop it.
                # (A throttle is not restored: this process starts at full speed.)
                self.health.update(dataclasses.replace(health, throttle=1.0))
            await self._start_worker(worker, now)
        self._flush_seen = await self.store.flush_requested()
        await self.apply_pauses()
        await self.store.changed_elsewhere()  # the baseline: later CLI changes are seen
        self._watcher = asyncio.create_task(self._watch(), name="queue-watcher")

    def notify(self, account: str) -> None:
        """Wake the account's worker; an account removed by a reload has none (its
        messages wait until it returns)."""
        worker = self.workers.get(account)
        if worker is not None:
            worker.notify()

    def may_send_now(self, account: str, priority: Priority) -> bool:
        """Whether the account's worker here could send a message at once (ack:
        after_upstream); an account a reload just removed has none."""
        worker = self.workers.get(account)
        return worker is not None and worker.may_send_now(priority)

    async def deliver_now(self, message: NewMessage, within: float,
                          gone: asyncio.Future[None] | None = None) -> Reply | None:
        """ack: after_upstream: the account's worker sends the message (just committed) at
        once; the refusal to pass on to the client, or None for 250 (see
        AccountWorker.deliver_now). Never raises: the message is committed whatever
        happens here."""
        account = message.account
        worker = self.workers.get(account)
        if worker is None:  # (removed by a reload meanwhile: the hold ends by itself)
            return None
        try:
            return await worker.deliver_now(message, within, gone)
        except StoreError as exc:
            event(log, logging.WARNING, "sync_attempt_skipped", message.id, account=account,
                  reason=str(exc))
        except Exception:  # a bug: the message waits in the queue; the client gets 250
            log.exception("immediate attempt of %s failed", message.id)
            self.metrics.internal_errors.labels("delivery").inc()
        return None

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

    def _held_here(self) -> list[str]:
        """Messages this process is sending, has claimed ahead or is recording."""
        return [mid for w in self.workers.values() for mid in w.held()]

    async def _renew_leases(self) -> None:
        """Keep the claims of sends under way: each lease is renewed once a third of it
        has passed, so another process never requeues a message a live send holds."""
        mono = self.mono()
        if mono < self._next_renew:
            return
        self._next_renew = mono + min(
            (w.lease_s / 3 for w in self.workers.values()), default=LEASE_SWEEP_S)
        now = self.clock()
        for worker in self.workers.values():
            await self.store.renew(worker.held(), now + worker.lease_s)
        if self.hosts is not None:  # connection slots and login turns, with the claims
            await self.store.renew_slots(now + self.hosts.lease_s)

    async def _sweep_leases(self) -> None:
        """Requeue rows whose lease ran out without a restart (a delivery that died)."""
        if self.mono() < self._next_sweep:
            return
        self._next_sweep = self.mono() + self.lease_sweep_s
        swept = await self.store.requeue_expired(self.clock(), keep=self._held_here())
        if swept:
            event(log, logging.WARNING, "recovered", count=swept,
                  reason="lease expired: messages left 'sending' are queued again")
            self.wake_all()

    async def _watch(self) -> None:
        """Every CHANGE_POLL_S: clock jumps, expired leases, changes by `relay queue ...`.

        A bug in one round is logged and counted, and the next round runs: this task
        must outlive anything it meets.
        """
        while True:
            await asyncio.sleep(CHANGE_POLL_S)
            try:
                await self._watch_once()
            except StoreError:
                continue  # the queue file is unavailable; try again next round
            except Exception:
                log.exception("queue watcher failed; it goes on")
                self.metrics.internal_errors.labels("queue_watcher").inc()

    async def _watch_once(self) -> None:
        self.refresh_local_gauges()
        await self._reconcile_clock()
        if self.hosts is not None and self.hosts.unreturned:
            await self.hosts.give_back_unreturned()
        await self._renew_leases()
        await self._sweep_leases()
        if not await self.store.changed_elsewhere():
            return
        await self.apply_pauses()
        flush = await self.store.flush_requested()
        if flush != self._flush_seen:
            self._flush_seen = flush
            for worker in self.workers.values():
                worker.resume()
            event(log, logging.INFO, "flush", reason="requested by relay queue flush")
        self.wake_all()

    def refresh_local_gauges(self) -> None:
        """What only this process knows, in every process (not only the one serving
        /metrics: with workers, each one's gauges are summed): its open upstream
        connections, and its throttles easing back while idle."""
        for worker in self.workers.values():
            worker.ease_throttle(worker.mono())
        for name, transport in self.transports.items():
            self.metrics.connections_open.labels(name).set(transport.open_connections())

    async def apply_pauses(self) -> None:
        """Tell each worker whether its account is paused in the queue file (by `relay
        accounts pause`, from any process)."""
        paused = await self.store.paused_accounts()
        for name, worker in self.workers.items():
            if name in paused and not worker.paused:
                event(log, logging.WARNING, "account_paused", account=name)
            elif worker.paused and name not in paused:
                event(log, logging.INFO, "account_resumed", account=name)
            worker.set_paused(name in paused)

    def _make_events(self, message: QueuedMessage, result: AttemptResult,
                     bounce: NewMessage | None, body: bytes) -> list[NewEvent]:
        """The outcome's events, one outbox row per event and webhook that wants it (each
        event has one id, whichever webhooks it goes to: receivers deduplicate by it)."""
        if not self.webhooks:
            return []
        try:
            message_id = message_id_of(parse_headers(body)) if body else None
            rows = []
            for kind in event_types(result, bounce is not None):
                hooks = [h for h in self.webhooks if kind in h.events]
                if not hooks:
                    continue
                event_id = uuid.uuid4().hex
                text = event_body(event_id=event_id, kind=kind, message=message,
                                  result=result, message_id=message_id,
                                  bounce_id=bounce.id if kind == "bounced" and bounce else None)
                rows += [NewEvent(event_id, h.label, kind, text, result.at) for h in hooks]
            return rows
        except Exception as exc:  # a bug here must not keep the outcome from being recorded
            log.exception("cannot build the events of %s", message.id)
            event(log, logging.ERROR, "events_failed", message.id,
                  reason=f"internal error: {type(exc).__name__}")
            return []

    async def run_until_idle(self) -> None:
        """Return once nothing is in flight and nothing is due (tests, `burst` runs)."""
        while True:
            await asyncio.gather(*(w.idle.wait() for w in self.workers.values()))
            await asyncio.sleep(0)
            if all(w.idle.is_set() and not w.in_flight and not w.settling
                   for w in self.workers.values()):
                return

    async def _record_interrupted(self, sends: list[tuple[AccountWorker, QueuedMessage]]
                                  ) -> None:
        """Sends cut off by shutdown: recorded as attempts that may have delivered (logged
        `interrupted`), not silently queued again; if that write fails, queued again."""
        now = self.clock()
        for worker, message in sends:
            [result] = worker.interrupted([message], now)
            try:
                await self.store.finish(result, events=self._make_events(message, result,
                                                                         None, b""))
            except StoreError:
                with contextlib.suppress(StoreError):
                    await self.store.requeue([message.id], now)

    async def stop(self, grace: float) -> None:
        """Stop claiming, give in-flight sends ``grace`` seconds, requeue the rest."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for worker in self.workers.values():
            worker.stop_claiming()
        await self._stop_claims(list(self.workers.values()))
        tasks = {mid: t for w in self.workers.values() for mid, t in w.in_flight.items()}
        carrying = {mid: (w, m) for w in self.workers.values() for mid, m in w.carrying.items()}
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            unfinished = [mid for mid, t in tasks.items() if t in pending]
            if unfinished:
                await self._record_interrupted([carrying[mid] for mid in unfinished])
        # Outcomes already decided are written before the store closes.
        recording = [t for w in self.workers.values() for t in w.settling]
        if recording:
            _, stuck = await asyncio.wait(recording, timeout=grace)
            for task in stuck:  # (each logs the outcome it could not write)
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
