"""One account's delivery loop: claim due messages in priority order and send them.

Each account has its own worker, so an account that is down, slow or throttled never
holds up another. A worker sleeps on an asyncio.Event until a message arrives, a send
finishes, or the next deferred message or rate-limit window comes due; it keeps the
account's state (backoff, rate limiter, health) and applies the pure policy modules.

The worker's other roles are mixins of their own modules: the account's backoff and the
one the workers share (relay.delivery.backoff), its answer to "slow down" replies
(relay.delivery.slowdown), its part as a group's member (relay.delivery.member), and the
pace of a send's further transactions (relay.delivery.pacing), and the writing of each
send's outcome (relay.delivery.recording); the attributes they read are declared once,
in relay.delivery.account.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable

from relay.delivery.account import Bounce, Events
from relay.delivery.backoff import AccountBackoff
from relay.delivery.groups import GroupTransport
from relay.delivery.health import AccountHealth, HealthHook
from relay.delivery.host import HostAccount
from relay.delivery.member import GroupMember
from relay.delivery.outcome import settle
from relay.delivery.pacing import Pacing
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.recording import FINISH_RETRY_S, Recording
from relay.delivery.retry import RetryPolicy
from relay.delivery.rewrite import Rewrite, rewritten
from relay.delivery.slowdown import SlowDown
from relay.delivery.sync import SyncWaiter
from relay.delivery.throttle import Throttle
from relay.delivery.transport import (
    SENDING,
    TRANSCRIPT,
    PoolControl,
    SendResult,
    SlotsHeldElsewhere,
    Transcript,
    Transport,
)
from relay.errors import DeliveryError, StoreError, TemporaryFailure
from relay.observe.logs import event, iso_time
from relay.observe.metrics import Metrics
from relay.queue.store import QueueStore
from relay.queue.types import (
    AttemptResult,
    NewMessage,
    Priority,
    QueuedMessage,
)
from relay.smtp.replies import Reply

log = logging.getLogger("relay.delivery")
INTERRUPTED = "interrupted by shutdown; may have been delivered"
# After giving a message back because the other workers held every connection slot, how
# long this worker claims nothing more of the account (they deliver meanwhile).
SLOTS_WAIT_S = 1.0






class AccountWorker(Recording, Pacing, GroupMember, SlowDown, AccountBackoff):
    """Delivers one account's messages with at most ``concurrency`` sends at once."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        store: QueueStore,
        policy: RetryPolicy,
        limiter: RateLimiter,
        metrics: Metrics,
        *,
        concurrency: int,
        lease_s: float,
        clock: Callable[[], float],
        rng: random.Random,
        bounce: Bounce | None = None,
        events: Events | None = None,
        events_written: Callable[[], None] | None = None,
        health: HealthHook | None = None,
        auth_policy: RetryPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        age_clock: Callable[[float], float] | None = None,
        rewrite: Rewrite | None = None,
        host: HostAccount | None = None,
        process: int | None = None,
    ) -> None:
        self.name = name
        self.rewrite = rewrite  # accounts.NAME.rewrite: applied to what is sent only
        self.process = process  # which worker process this is (--workers N), for the log
        self.host = host  # the account's backoff and probe, shared with the other workers
        self.bounce = bounce
        self.events = events  # the outcome's webhook events, written with it
        self.events_written = events_written  # told once they are committed
        self.health = health  # told of each change of backoff, for `relay status`
        self.transport = transport
        # Looked up once: isinstance against a runtime Protocol costs ~10 us, and
        # _capacity runs several times per message (profiled with two workers).
        self._pool = transport if isinstance(transport, PoolControl) else None
        self.store = store
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.clock = clock  # wall time: only for what is stored (due times, ages)
        self.mono = monotonic  # backoffs and rate windows: immune to clock jumps
        self.rng = rng
        # After a refused login: its own, longer floor (config auth_backoff).
        self.auth_policy = auth_policy or RetryPolicy(60.0, 1800.0, float("inf"), 0.0)
        self.auth_failures = 0
        # The clock messages age by: the wall clock less a jump not yet reconciled.
        self.age_clock: Callable[[float], float] = age_clock or (lambda now: now)
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.carrying: dict[str, QueuedMessage] = {}  # the message each in_flight task sends
        self.settling: set[asyncio.Task[None]] = set()  # outcome writes under way
        self.recording: set[str] = set()  # ids whose outcome is being written
        self.ready: collections.deque[QueuedMessage] = collections.deque()  # claimed, unsent
        self.waiters: dict[str, SyncWaiter] = {}  # ack: after_upstream sessions, by id
        self._claiming: set[asyncio.Future[None]] = set()  # claim_due commits under way
        # Claim-ahead depth: one pool's worth, but not for rate-limited accounts (it would
        # spend their budget early and gain nothing at their pace).
        self.prefetch = 0 if limiter.limited else concurrency
        self.backoff_until = 0.0  # monotonic
        self.slots_wait_until = 0.0  # monotonic: see SlotsHeldElsewhere
        # `relay accounts pause`: the claim statement refuses this account's messages
        # anyway; the flag lets the worker sleep instead of polling due messages.
        self.paused = False
        self.resume_at = 0.0  # the same instant in wall time, as stored in due times
        self.backoff_failures = 0
        self.last_account_error = ""
        # "Slow down" replies: a share of the pool and rate limits, and a named wait.
        self.throttle = Throttle()
        self._health: AccountHealth | None = None  # the last published, for the throttle
        self._held = False
        self._group_sends = 0  # sends of a group through this account under way
        self._notices = 0  # bumped by notify(): an idle verdict older than this is stale
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"account-{self.name}")

    def notify(self) -> None:
        self._notices += 1
        self.idle.clear()
        if self.mono() >= self.backoff_until:  # a backed-off account has nothing to do
            self.wake.set()

    def set_paused(self, paused: bool) -> None:
        if paused != self.paused:
            self.paused = paused
            self.notify()
            self.wake.set()

    def resume(self) -> None:
        """End an account-wide backoff now (an operator's `queue flush`), and a wait the
        server named."""
        self.backoff_until = 0.0
        self.throttle.hold_until = 0.0
        if self._pool is not None:
            self._pool.end_login_hold()
        now = self.clock()
        if self._health is not None and self._health.backoff_until > now:
            # Ended in the report too: a restart must not restore what the flush ended.
            self._publish(dataclasses.replace(self._health, backoff_until=now))
        self.notify()
        self.wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self.wake.clear()
            try:
                timeout = await self._dispatch()
            except StoreError as exc:
                event(log, logging.ERROR, "queue_error", account=self.name, reason=str(exc))
                timeout = FINISH_RETRY_S
            except Exception:  # a bug: log, count, and go on rather than stop delivering
                log.exception("account worker %s failed; restarting it", self.name)
                self.metrics.internal_errors.labels("account_worker").inc()
                timeout = FINISH_RETRY_S
            if self._stopping:
                break
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.wake.wait()

    def _slots(self) -> int:
        # While an account is backing off as a whole, one probe at a time. A slot is busy
        # until its outcome is recorded: a crash then re-sends at most one pool's worth.
        limit = 1 if self.backoff_failures else self._capacity()
        return limit - len(self.in_flight) - len(self.settling)

    def _capacity(self) -> int:
        """Sends at once: the pool size, less while the server refuses more connections,
        and less while it asked us to slow down (the throttle's factor)."""
        if self._pool is not None:
            return self.throttle.scale(max(1, min(self.concurrency, self._pool.capacity)))
        return self.throttle.scale(self.concurrency)

    async def _dispatch(self) -> float | None:
        """Start what may go now; return how long to sleep (None: until woken)."""
        now = self.clock()
        mono = self.mono()
        notices = self._notices
        if self.host is not None and not self.paused:
            if mono < self.slots_wait_until and not self.in_flight:
                return self.slots_wait_until - mono  # the other workers hold the connections
            wait = await self._follow_host(await self.host.backoff(), now, mono)
            if wait is not None:
                return wait
        return await self._dispatch_now(now, mono, notices)

    async def _dispatch_now(self, now: float, mono: float, notices: int) -> float | None:
        if mono < self.backoff_until:
            if not self.in_flight and not self.settling and not self.ready:
                due = await self.store.next_due_at(self.name)
                if due is None or due >= self.resume_at:
                    self._mark_idle(notices)  # nothing could go before the backoff ends
            return self.backoff_until - mono
        if self.paused:
            self._rest_paused(now, notices)
            return None
        self.ease_throttle(mono)
        self._start_ready()
        self._trim_ready(now)
        slots = self._slots()
        # Claim ahead: a claim is a commit (a sync), so claimed messages wait in `ready`
        # and a finishing send starts the next at once instead of waiting for the disk.
        # No claiming ahead while probing a backed-off account: what it claimed would show
        # as 'sending' without a connection, and go back if the probe fails.
        prefetch = 0 if self.backoff_failures else min(self.prefetch, self._capacity())
        want = slots + prefetch - len(self.ready)
        if want <= 0:
            return None
        hold = max(self.limiter.wait_time(mono), self.throttle.held(mono))
        if hold == 0 and await self._claim(now, mono, want):
            return 0.0
        if self.in_flight or self.ready:
            return None  # a finishing send wakes us
        due = await self.store.next_due_at(self.name)
        if due is None or due > now:
            if not self.settling:
                self._mark_idle(notices)
            return None if due is None else due - now
        return self._hold(hold, mono)

    def _hold(self, hold: float, mono: float) -> float:
        """Due mail not claimed: wait for the rate limit. With nothing held by the limit
        as such, normal and low mail may be held by reserve_for_high (a high message
        arriving wakes us at once), or the clock moved (look again shortly)."""
        if hold == 0:
            hold = self.limiter.wait_time(mono, others=True)
        if hold > 0:
            if not self._held:  # count each hold once, not each wake-up
                self.metrics.rate_limited.labels(self.name).inc()
                self._held = True
            return hold
        return 0.05

    def _rest_paused(self, now: float, notices: int) -> None:
        """Paused: give back what was claimed before the pause was seen, unsent, and
        sleep until set_paused(False) wakes us (sends under way finish)."""
        self._unclaim_ready(now)
        if not self.in_flight and not self.settling:
            self._mark_idle(notices)

    def _mark_idle(self, notices: int) -> None:
        """Idle, unless a message arrived while we were looking (then look again)."""
        if notices == self._notices:
            self.idle.set()

    async def _claim(self, now: float, mono: float, want: int) -> bool:
        """Claim up to `want` due messages within the rate limit; start what can start."""
        allowed = min(want, self.limiter.available(mono))
        # Reserved before the claim's commit, not after: meanwhile a send under way may
        # reserve a further transaction (_between), and both would fit the same room.
        self.limiter.reserve(allowed)  # each counts until its send ends (_deliver)
        batch: list[QueuedMessage] = []
        claiming = asyncio.get_running_loop().create_future()
        self._claiming.add(claiming)  # deliver_now waits for it (_sending_here)
        try:
            batch = await self.store.claim_due(self.name, now, allowed, self.lease_s,
                                               self.limiter.windows,
                                               self.limiter.reserve_for_high)
        finally:
            self.limiter.cancel(allowed - len(batch))
            self._claiming.discard(claiming)
            claiming.set_result(None)
        if not batch:
            return False
        if self.mono() < self.backoff_until:
            # The account backed off while the claim was being committed: give these
            # back at once, as _account_health did with the others.
            self._unclaim([m.id for m in batch], self.clock(), due_at=self.resume_at)
            return False
        self._held = False
        self.idle.clear()
        self.ready.extend(batch)
        self._start_ready()
        return True

    def _trim_ready(self, now: float) -> None:
        """Keep at most one claimed-ahead message per usable connection: after the server
        lowered the pool (421 "too many connections"), give the rest back to the queue,
        so that a new high-priority message does not wait behind them (11.13)."""
        ids = []
        while len(self.ready) > self._capacity():
            ids.append(self.ready.pop().id)  # the last claimed: the lowest priority
        self._unclaim(ids, now)

    def _start_ready(self) -> None:
        """Hand claimed messages to free slots (also called as each send finishes)."""
        if self._stopping or self.mono() < self.backoff_until:
            return
        while self.ready and self._slots() > 0:
            self._start(self.ready.popleft())

    def _start(self, message: QueuedMessage) -> None:
        task = asyncio.create_task(self._deliver(message), name=f"deliver-{message.id}")
        self.in_flight[message.id] = task
        self.carrying[message.id] = message
        task.add_done_callback(functools.partial(self._done, message.id))

    def may_send_now(self, priority: Priority) -> bool:
        """Whether a message just received could be sent at once (ack: after_upstream):
        a free slot, room in the rate limit (with reserve_for_high for all but HIGH), no
        backoff, wait the server named, pause or shutdown. This process's view: the claim
        checks the queue's."""
        others = priority is not Priority.HIGH  # may not use the share kept for high
        return not (self._stopping or self.paused or self.held_back or self._slots() <= 0
                    or self.limiter.available(self.mono(), others=others) < 1)

    async def deliver_now(self, new: NewMessage, within: float,
                          gone: asyncio.Future[None] | None = None) -> Reply | None:
        """ack: after_upstream: claim the message just committed and send it at once, if
        the account may send now (may_send_now). The refusal to pass on if its outcome
        comes within ``within`` seconds; None: answer 250 (it was delivered, deferred, is
        still being sent, or waits in the queue as usual). The message was queued held
        (due at ``new.not_before``: App._submit), so that no other process's loop takes
        it first; if this session does not claim it, it is made due now (release_hold).
        ``gone`` resolving (the client closed its side or the connection ended) or stop()
        ends the wait: 250 at once, and a refusal then bounces."""
        if not self.may_send_now(new.priority) or (gone is not None and gone.done()):
            await self._release(new)
            return None
        # From here the outcome's write may take the waiter (and then send no bounce),
        # so every way out goes through it: waiter.answer_now(), never a bare None.
        deadline = asyncio.get_running_loop().time() + within
        waiter = self.waiters[new.id] = SyncWaiter(new.dedup.key if new.dedup else None)

        def left(_: asyncio.Future[None]) -> None:
            waiter.abandon()

        if gone is not None:
            gone.add_done_callback(left)
        try:
            self.limiter.reserve(1)
            message = None
            try:
                message = await self.store.claim_message(
                    self.name, new.id, self.clock(), self.lease_s, self.limiter.windows,
                    self.limiter.reserve_for_high, new.not_before)
            except StoreError as exc:  # it goes from the queue as usual: due now
                event(log, logging.WARNING, "sync_attempt_skipped", new.id, account=self.name,
                      reason=str(exc))
                await self._release(new)
                return await waiter.answer_now()
            finally:
                if message is None:
                    self.limiter.cancel(1)
            if message is not None:
                if self.held_back or self._stopping:  # changed while the claim committed
                    self._unclaim([message.id], self.clock(),
                                  due_at=self.resume_at if self.backed_off else None)
                    return await waiter.answer_now()
                self.idle.clear()
                self._start(message)
            elif not await self._sending_here(new.id, deadline):
                # Another process has it, or a window is full (then it goes from the queue:
                # due now), or this worker's send of it is already writing its outcome,
                # which may have taken the waiter with a refusal.
                await self._release(new)
                return await waiter.answer_now()
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(waiter.future)
            except TimeoutError:
                pass
            return await waiter.answer_now()
        finally:
            if gone is not None:
                gone.remove_done_callback(left)
            del self.waiters[new.id]

    async def _release(self, new: NewMessage) -> None:
        """Not claimed by its session after all: the held message is due now. Never
        raises: the session's answer must not be lost to it, and the hold ends by itself."""
        with contextlib.suppress(StoreError):
            await self.store.release_hold(new.id, new.not_before, self.clock())

    async def _sending_here(self, message_id: str, deadline: float) -> bool:
        """Whether this worker's own loop claimed the message (woken by its commit, in
        the moment before deliver_now's claim) and has not begun writing its outcome: the
        session's waiter then gets that send's outcome like its own. Claims of this
        worker still being committed are waited for first, until ``deadline`` (loop
        time: the session's sync_timeout)."""
        if self._claiming:
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait(list(self._claiming), timeout=max(0.0, left))
        if message_id in self.recording:
            return False  # its outcome may have been looked up before the waiter existed
        return message_id in self.in_flight or any(m.id == message_id for m in self.ready)

    def held(self) -> list[str]:
        """Messages this worker is sending, has claimed ahead or is recording."""
        return [*self.in_flight, *self.recording, *(m.id for m in self.ready)]

    def _done(self, message_id: str, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(message_id, None)
        self.carrying.pop(message_id, None)
        if not task.cancelled() and task.exception() is not None:
            # A bug outside the send itself: the row would stay 'sending' until its lease
            # ran out. Give it back now.
            log.error("delivery of %s failed", message_id, exc_info=task.exception())
            self.metrics.internal_errors.labels("delivery").inc()
            self._give_back([message_id], self.clock())
        self._start_ready()
        self.wake.set()

    def _unclaim(self, ids: list[str], now: float, due_at: float | None = None) -> None:
        """Give back claimed messages that were never sent: their rate-limit reservations
        go too (a sent one, given back after a bug, keeps its count: _give_back alone)."""
        self.limiter.cancel(len(ids))
        self._give_back(ids, now, due_at)

    def _unclaim_ready(self, now: float, due_at: float | None = None) -> None:
        """Every claimed-ahead message back to the queue, unsent."""
        ready, self.ready = [m.id for m in self.ready], collections.deque()
        self._unclaim(ready, now, due_at)

    def _give_back(self, ids: list[str], now: float, due_at: float | None = None) -> None:
        """Return claimed rows to the queue in the background (due at ``due_at``)."""
        if not ids:
            return
        task = asyncio.create_task(self._requeue(ids, now, due_at), name=f"requeue-{self.name}")
        self.settling.add(task)
        task.add_done_callback(self._recorded)

    async def _requeue(self, ids: list[str], now: float, due_at: float | None) -> None:
        try:
            await self.store.requeue(ids, now, due_at=due_at)
        except StoreError as exc:  # their leases return them (Scheduler._sweep_leases)
            event(log, logging.ERROR, "queue_error", account=self.name,
                  reason=f"cannot give claimed messages back: {exc}")

    async def _deliver(self, message: QueuedMessage) -> None:
        started = self.mono()
        sent: SendResult | DeliveryError
        body = b""
        transcript = Transcript()
        TRANSCRIPT.set(transcript)  # this task's own: the SMTP edge records into it
        SENDING.set(message)
        unsent = False
        try:
            body = await self.store.load_body(message.id)
            # What goes out; the bounce quotes what was queued.
            sender, outgoing = rewritten(self.rewrite, message.sender, body)
            sent = await self.transport.send(
                sender, message.pending_recipients, outgoing, message.mail_options,
                pace=functools.partial(self._between, message),
            )
        except SlotsHeldElsewhere:
            unsent = True
        except DeliveryError as exc:
            sent = exc
        except StoreError as exc:
            sent = TemporaryFailure(f"queue: {exc}")
        except Exception as exc:  # a bug must not strand the message in 'sending'
            log.exception("unexpected error delivering %s", message.id)
            sent = TemporaryFailure(f"internal error: {type(exc).__name__}")
        finally:
            if not unsent:
                self.limiter.complete(self.mono())  # counts from its end: see ratelimit
        if unsent:
            # Never sent, not an attempt: back to the queue for a worker that has a
            # connection, and this one claims nothing of the account for a moment.
            self.slots_wait_until = self.mono() + SLOTS_WAIT_S
            self._unclaim([message.id], self.clock())
            self._unclaim_ready(self.clock())
            return
        now = self.clock()
        self._note_slow_down(sent)
        await self._after_failure(sent, now)
        resume_at = self._account_health(sent, now)
        result = settle(message, sent, now=now, policy=self.policy, rng=self.rng,
                        resume_at=resume_at, age_now=self.age_clock(now))
        if isinstance(sent, DeliveryError):
            transcript.note(f"attempt ended: {sent.reply_text()}")
        result = dataclasses.replace(result, transcript=transcript.lines())
        if sent.via:  # a group's send: the attempt (and its rate-limit send) is the member's
            result = dataclasses.replace(result, account=sent.via)
        duration = self.mono() - started
        # Recording the outcome (a commit, and so a sync) is a task of its own: the send
        # task ends once the upstream has answered, but its slot stays busy until the
        # outcome is written (_slots counts settling), so a crash re-sends at most one
        # pool's worth. The row stays 'sending' until then, so it cannot be claimed
        # twice; shutdown waits for these writes (see settling).
        task = asyncio.create_task(self._record(message, result, sent, duration, body),
                                   name=f"record-{message.id}")
        self.settling.add(task)
        self.recording.add(message.id)
        task.add_done_callback(self._recorded)
        task.add_done_callback(lambda _: self.recording.discard(message.id))

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self.settling.discard(task)
        self._start_ready()
        self.wake.set()

    def interrupted(self, messages: list[QueuedMessage], now: float) -> list[AttemptResult]:
        """Sends shutdown cut off (their grace ran out): each is an attempt with its reason,
        since the upstream may already have the message. Logged, so that a duplicate
        after the restart can be explained."""
        error = TemporaryFailure(INTERRUPTED)
        results = []
        for message in messages:
            result = settle(message, error, now=now, policy=self.policy, rng=self.rng,
                            age_now=self.age_clock(now))
            if isinstance(self.transport, GroupTransport):  # its member's send, and window
                member = self.transport.sending_through(message.id)
                result = dataclasses.replace(result, account=member or self.name)
            results.append(result)
            event(log, logging.WARNING, "interrupted", message.id, account=self.name,
                  relay=self.transport.peer, attempt=result.attempts, reason=INTERRUPTED,
                  next_attempt=iso_time(result.next_attempt_at))
        return results

    def stop_claiming(self) -> None:
        """Claim nothing more; sessions waiting for an immediate attempt (ack:
        after_upstream) are answered 250 now, so shutdown is not held for sync_timeout."""
        self._stopping = True
        for waiter in self.waiters.values():
            waiter.abandon()
        self.wake.set()

    async def join(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
