"""Wiring and lifecycle: startup() -> serve() -> shutdown().

App receives a validated Config and builds the edges (store, transports, listener, HTTP)
and the scheduler; it owns the order in which they start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from relay import __version__
from relay.config.loading import problem_line
from relay.config.report import config_warnings, queue_name
from relay.config.schema import Config, ListenConfig, effective_hostname
from relay.delivery.host import HostAccounts
from relay.delivery.maildir import MaildirTransport
from relay.delivery.scheduler import Scheduler
from relay.delivery.smtp.upstream import UpstreamPool
from relay.delivery.transport import Transport
from relay.delivery.worker import AccountWorker
from relay.errors import ConfigError, StoreError
from relay.ingest.auth import ListenerAuth
from relay.ingest.handler import IngestHandler
from relay.ingest.listener import SessionLimits, listener_tls_context, start_listener
from relay.observe.http import build_app, start_http
from relay.observe.logs import event, log_file_problem
from relay.observe.metrics import Metrics, exposition_registry, watch_loop_lag
from relay.observe.webhooks import WebhookSender
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.store import QueueStore
from relay.queue.types import NewMessage
from relay.smtp.replies import Reply

log = logging.getLogger("relay")
QUEUE_FILE_CHECK_S = 5.0  # how often the queue file's identity is checked (a stat)
ADMIT_CACHE_S = 0.2  # how stale the backlog count used by on_limit: reject may be


def build_transports(
    config: Config, metrics: Metrics | None = None, names: Iterable[str] | None = None,
    hosts: HostAccounts | None = None,
) -> dict[str, Transport]:
    """``hosts``: workers share each account's connections and logins (--workers N)."""
    transports: dict[str, Transport] = {}
    hostname = effective_hostname(config, socket.getfqdn())
    for name, acc in config.accounts.items():
        if names is not None and name not in names:
            continue
        if acc.transport == "maildir":
            assert acc.path is not None
            transports[name] = MaildirTransport(name, acc.path)
        else:
            counter = metrics.connections_opened.labels(name).inc if metrics else None
            transports[name] = UpstreamPool(
                name, acc, local_hostname=hostname, on_connect=counter,
                login_hold_s=config.auth_backoff_for(name).initial,
                host=hosts.account(name, acc.pool.max_connections) if hosts else None)
    return transports


@dataclass(frozen=True)
class WorkerRole:
    """What one process does when several share the queue (relay.supervisors).

    ``shared``: other workers use the same queue file and port (no exclusive queue lock;
    SO_REUSEPORT), and each account's rate limits, connections (pool.max_connections),
    logins and backoff are held across them through the queue (relay.delivery.host).
    ``delivers``: this one runs the scheduler (every worker does). The default is relay
    as a single process.
    """

    shared: bool = False
    delivers: bool = True
    index: int | None = None  # of `relay serve --workers`: 0 serves metrics and prunes
    count: int = 1  # workers the supervisor runs (/readyz: all of them)

    @property
    def name(self) -> str:
        return "serve" if self.index is None else f"worker {self.index}"


def check_startable(config: Config) -> None:
    """What `relay serve` checks only as it starts, checked without starting (for
    `relay check-config`): TLS files load, the log file can be opened. ConfigError lists
    every problem."""
    problems: list[str] = []
    for name in config.accounts:
        try:
            build_transports(config, names=[name])
        except ConfigError as exc:
            problems += exc.problems
    try:
        listener_tls_context(config)
    except ConfigError as exc:
        problems += exc.problems
    problem = log_file_problem(config.logging.file)
    if problem:
        problems.append(problem)
    if problems:
        raise ConfigError(problems)


def build_store(config: Config, *, role: str = "", lock: bool = True) -> QueueStore:
    """The queue the config names: PostgreSQL (queue.url), else the SQLite file."""
    q = config.queue
    if q.url is not None:
        # Imported only here: psycopg and libpq cost a relay on SQLite ~15 MB of RSS.
        from relay.queue.postgres.store import PostgresStore

        return PostgresStore(q.url, password=q.secret, role=role,
                             connect_timeout=q.connect_timeout,
                             statement_timeout=q.statement_timeout,
                             heartbeat_ttl_s=q.heartbeat_ttl,
                             allow_unsafe_commit=q.allow_unsafe_commit)
    return SQLiteStore(q.path, commit=q.commit, lock=lock, role=role,
                       min_free=config.queue_min_free)


class App:
    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 worker: WorkerRole | None = None, from_environment: Collection[str] = ()
                 ) -> None:
        self.config = config
        # Keys a variable set (${VAR}, RELAY_...): not literals in the file (the warnings).
        self.from_environment = frozenset(from_environment)
        self.role = worker or WorkerRole()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, [*config.accounts, *config.routing.groups])
        self.store: QueueStore = build_store(config, role=self.role.name,
                                             lock=not self.role.shared)
        self.store.on_internal_error = self.metrics.internal_errors.labels("queue_writer").inc
        # Workers share each account through the queue, and so do relays on one PostgreSQL
        # queue (several hosts); one process on its own SQLite file keeps it to itself.
        shared = self.role.shared or config.queue.url is not None
        self.hosts = HostAccounts(self.store, self.role.count) if shared else None
        self.transports = build_transports(config, self.metrics, hosts=self.hosts)
        self.scheduler = Scheduler(config, self.store, self.transports, self.metrics,
                                   hosts=self.hosts, process=self.role.index)
        self.store.on_wake = self.scheduler.notify  # another relay queued mail for it
        # Every process sends events (claimed from the outbox: one sends each).
        self.webhooks = WebhookSender(self.store, config.events.webhooks, self.metrics)
        self.scheduler.events_written = self.webhooks.notify
        self.handler = IngestHandler(config, self._submit, self.metrics, self._admit)
        self.limits = SessionLimits(config, self.metrics)
        self._retiring: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, tuple[float, int]] = {}
        self.smtp_server: asyncio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.smtp_port = 0
        self.http_port = 0
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop request: skip the drain delay
        self.draining = False  # SIGTERM received: /readyz fails, the listener still accepts
        self._loop_lag: asyncio.Task[None] | None = None
        self._file_watch: asyncio.Task[None] | None = None
        self.queue_file_check_s = QUEUE_FILE_CHECK_S
        self._reloading = asyncio.Lock()  # two SIGHUPs in a row: one reload after the other
        self._started = False
        self._closed = False
        self._committing = 0  # sessions waiting for their message's commit
        self._answered = asyncio.Event()  # set whenever _committing is 0
        self._answered.set()

    async def _submit(self, messages: Sequence[NewMessage],
                      gone: asyncio.Future[None] | None = None
                      ) -> tuple[list[str], Reply | None]:
        """Commit a routed message's queue entries (one per account), all in one
        transaction. Once the commit returns nothing may raise: the session answers 250
        even if a reload removed an account meanwhile (its entry then waits until the
        account returns). Returns the id holding each entry (with dedup, maybe an earlier
        one's) and, with ack: after_upstream, the upstream's permanent refusal to answer
        instead (committed first: nothing is lost; a split message is not tried first).
        ``gone`` resolves when the client closed its side or the connection ended: the
        wait for the upstream ends with it."""
        # ack: after_upstream, and the account may send now: the message is queued held
        # (due only after sync_timeout) for this session's claim, so that no other
        # process's delivery loop takes it in between (the client would get 250 and a
        # bounce instead of the refusal). A hold not claimed after all is released.
        sync = len(messages) == 1 and self._sync(messages[0])
        if sync:
            held_until = messages[0].created_at + self.config.sync_hold(messages[0].account)
            messages = [dataclasses.replace(messages[0], not_before=held_until)]
        self._committing += 1
        self._answered.clear()
        try:
            if len(messages) == 1:
                queued = [await self.store.enqueue(messages[0])]
            else:
                queued = await self.store.enqueue_all(messages)
        finally:
            self._committing -= 1
            if not self._committing:
                self._answered.set()
        refusal = None
        for message, holder in zip(messages, queued, strict=True):
            if holder != message.id:  # (dedup) the first one is queued already
                continue
            if message.account in self._waiting:
                at, count = self._waiting[message.account]
                self._waiting[message.account] = (at, count + 1)
            if sync:
                refusal = await self.scheduler.deliver_now(message,
                                                           self.config.listen.sync_timeout,
                                                           gone)
            self.scheduler.notify(message.account)
        return queued, refusal

    def _sync(self, message: NewMessage) -> bool:
        """Whether the message gets an immediate attempt before DATA is answered: ack
        after_upstream, not Deferred-Delivery, and its account's worker here may send now
        (a slot, room in its rate limit, no backoff or pause)."""
        return (self.role.delivers and self.config.sync_hold(message.account) > 0
                and message.not_before <= message.created_at
                and self.scheduler.may_send_now(message.account, message.priority))

    async def _admit(self, account: str) -> bool:
        """rate_limit.on_limit: reject — refuse while the backlog exceeds a window's worth."""
        acc = self.config.accounts.get(account)
        worker = self.scheduler.workers.get(account)
        if acc is None or worker is None or acc.rate_limit.on_limit != "reject":
            return True  # (an account a reload just removed: its messages wait)
        capacity = worker.limiter.window_capacity()
        if capacity is None:
            return True
        now = time.monotonic()
        at, count = self._waiting.get(account, (0.0, 0))
        if now - at > ADMIT_CACHE_S:
            count = await self.store.waiting_count(account)
            self._waiting[account] = (now, count)
        return count < capacity

    async def startup(self) -> None:
        """Open the queue, start delivery, then the listener and HTTP. A failure is logged
        as ``start_failed`` and what was opened is closed again (no ``stopped``: nothing
        had started)."""
        log_config_warnings(self.config, self.from_environment)
        try:
            await self.store.open()  # StoreError: corrupt, foreign or locked queue file
            self._loop_lag = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag))
            self._file_watch = asyncio.create_task(self._watch_queue_file())
            self.webhooks.start()
            if self.role.delivers:
                await self.scheduler.start()
            if self.role.delivers and not self.role.index:  # one pruner per queue file
                self.store.start_pruning(self.config.queue.keep_delivered, time.time)
            self.smtp_server = await start_listener(self.config, self.handler, self.limits,
                                                    reuse_port=self.role.shared)
            self.smtp_port = self.smtp_server.sockets[0].getsockname()[1]
            if self.config.metrics.enabled:
                app = build_app(exposition_registry(self.registry), self.refresh_gauges,
                                self.ready_problem)
                self.http_runner, self.http_port = await start_http(
                    app, self.config.metrics.host, self.config.metrics.port
                )
        except BaseException as exc:
            if isinstance(exc, Exception):
                event(log, logging.ERROR, "start_failed", reason=_reason(exc))
            await self.shutdown()
            raise
        self._started = True
        event(log, logging.INFO, "started", version=__version__,
              listen=f"{self.config.listen.host}:{self.smtp_port}",
              metrics=f"{self.config.metrics.host}:{self.http_port}" if self.http_runner else None,
              queue=queue_name(self.config), accounts=",".join(self.config.accounts))

    async def _watch_queue_file(self) -> None:
        """Say it at once, not at the next restart, when the queue file is deleted or
        replaced under relay (/readyz fails and DATA is refused from then on as well)."""
        reported = False
        while True:
            await asyncio.sleep(self.queue_file_check_s)
            try:
                self.store.check_file()
            except StoreError as exc:
                if not reported:
                    event(log, logging.ERROR, "queue_file_lost", reason=str(exc))
                reported = True
            else:
                reported = False

    async def refresh_gauges(self) -> None:
        """Queue gauges from the queue file (so they include changes made by the CLI)."""
        try:
            if await self.store.reports_queue():
                counts = await self.store.counts()
                oldest = await self.store.oldest_ready()
                self.metrics.set_queue(counts, oldest, time.time())
            else:  # another relay on the shared queue exports them (docs/monitoring.md)
                self.metrics.queue.clear()
                self.metrics.oldest.clear()
        except StoreError:
            return
        with contextlib.suppress(StoreError):
            paused = await self.store.paused_accounts()
            for name in self.metrics.accounts:
                self.metrics.account_paused.labels(name).set(1 if name in paused else 0)
        if self.hosts is not None:  # backed off by any worker: the shared record
            with contextlib.suppress(StoreError):
                shared = await self.store.backoffs()
                now = time.time()
                for name in self.metrics.accounts:
                    until = shared.get(name, (0.0, ""))[0]
                    self.metrics.account_backoff.labels(name).set(1 if until > now else 0)
        else:
            for name, worker in self.scheduler.workers.items():
                self.metrics.account_backoff.labels(name).set(1 if worker.held_back else 0)
        self.scheduler.refresh_local_gauges()
        with contextlib.suppress(StoreError):
            await self._refresh_quotas(time.time())

    async def _refresh_quotas(self, now: float) -> None:
        """relay_account_quota_remaining from the sends every process recorded."""
        for name, acc in self.config.accounts.items():
            windows = acc.rate_limit.named_windows()
            if not windows:
                continue
            sends = await self.store.recent_sends(name, now - max(w for _, w, _ in windows))
            for key, span, limit in windows:
                used = sum(1 for t in sends if t > now - span)
                self.metrics.quota_remaining.labels(name, key).set(max(limit - used, 0))

    async def ready_problem(self) -> str | None:
        if self.draining:
            return "shutting down"
        if self.smtp_server is None or not self.smtp_server.is_serving():
            return "SMTP listener is not accepting"
        try:
            await self.store.check_writable()
        except StoreError as exc:
            return f"queue not writable: {exc}"
        if self.role.count > 1:  # this worker answers for all of them
            others = [r for _, r in await self.store.processes() if r.startswith("worker ")]
            if len(others) + 1 < self.role.count:
                return f"{len(others) + 1} of {self.role.count} workers running"
        return None

    async def reload(self, new: Config, from_environment: Collection[str] = ()) -> list[str]:
        """Apply a new, already validated config without dropping connections or messages.

        Accounts, limits, routing, retry, bounces and listener users take effect; what
        needs new sockets or another queue file keeps its old value until a restart (the
        returned notes say which). All that can fail comes first; the switch itself has no
        await, so a session sees the old config or the new one, never half of each. A
        failed reload leaves the old config running. Reloads run one at a time.
        """
        async with self._reloading:
            return await self._reload(new, frozenset(from_environment))

    async def _reload(self, new: Config, from_environment: frozenset[str]) -> list[str]:
        old = self.config
        notes = []
        for key, before, after in (
            ("listen.host/port", (old.listen.host, old.listen.port),
             (new.listen.host, new.listen.port)),
            ("listen.tls", old.listen.tls, new.listen.tls),
            ("queue", old.queue, new.queue),
            ("metrics", old.metrics, new.metrics),
        ):
            if before != after:
                notes.append(f"{key} changed: takes effect at the next restart")
        if new.hostname != old.hostname:
            notes.append("hostname changed: used in EHLO from now on; the listener banner"
                         " changes at the next restart")
        # The address stays until a restart, so the new access rules are checked against
        # it: a reload must never turn a listener on a public address into an open relay.
        try:
            listen = ListenConfig.model_validate({
                **new.listen.model_dump(), "host": old.listen.host, "port": old.listen.port,
                "tls": old.listen.tls.model_dump() if old.listen.tls else None,
            })
        except ValidationError as exc:
            raise ConfigError([problem_line({**e, "loc": ("listen", *e["loc"])})
                               for e in exc.errors()]) from None
        new = new.model_copy(update={"listen": listen, "queue": old.queue,
                                     "metrics": old.metrics})
        changed = {
            name for name, acc in new.accounts.items()
            if name not in old.accounts or acc != old.accounts[name]
            or acc.secret != old.accounts[name].secret
            or new.retry_for(name) != old.retry_for(name)
            or (new.hostname != old.hostname and acc.transport == "smtp")
        }
        removed = set(old.accounts) - set(new.accounts)
        # A group's worker is rebuilt when the group changed (its members' transports and
        # workers are looked up at each send, so theirs need not).
        groups = {name for name, group in new.routing.groups.items()
                  if old.routing.groups.get(name) != group or new.retry != old.retry}
        # 1. What may fail: listener users (password files), new connection pools (TLS
        # files) and workers (the queue file).
        try:
            auth = ListenerAuth(new.listen.auth)
        except (OSError, KeyError) as exc:
            raise ConfigError([f"listen.auth.users: cannot read a password: {exc}"]) from None
        fresh = build_transports(new, self.metrics, names=changed, hosts=self.hosts)
        try:
            workers = await self.scheduler.prepare_workers(new, fresh, changed | groups)
        except BaseException:
            for transport in fresh.values():
                await transport.close()
            raise
        # 2. The switch: no await from here to the end.
        self.metrics.add_accounts([*new.accounts, *new.routing.groups])
        retired_transports = [self.transports.pop(n) for n in changed | removed
                              if n in self.transports]
        self.transports.update(fresh)
        retired = self.scheduler.swap_workers(new, workers)
        self.config = new
        self.from_environment = from_environment
        self.handler.configure(new, auth)
        self.webhooks.configure(new.events.webhooks)
        self.limits.configure(new)
        self._waiting.clear()
        task = asyncio.create_task(self._retire(retired, retired_transports))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        for name in sorted(removed):
            notes.append(f"account {name} removed: its queued messages wait until it returns")
        event(log, logging.INFO, "reloaded", changed=",".join(sorted(changed)) or None,
              removed=",".join(sorted(removed)) or None)
        log_config_warnings(new, from_environment)  # a weaker TLS says so, as at a start
        return notes

    async def _retire(self, workers: list[AccountWorker], transports: list[Transport]) -> None:
        """Old workers finish their sends on their old connections, then those close."""
        await self.scheduler.drain(workers, grace=30.0)
        for transport in transports:
            await transport.close()

    @property
    def started(self) -> bool:
        """True once startup() has finished (the `started` line is logged)."""
        return self._started

    @property
    def stopping(self) -> bool:
        """True from request_stop() or shutdown() on: SIGHUP is ignored from then."""
        return self._stopped.is_set() or self._closed

    async def serve(self) -> None:
        """Until a stop request; then fail /readyz while still accepting for
        shutdown.drain_delay, so the load balancer stops sending here first."""
        await self._stopped.wait()
        self.draining = True
        delay = self.config.shutdown.drain_delay
        if delay > 0 and not self._hurry.is_set():
            event(log, logging.INFO, "draining", delay=delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), delay)

    def request_stop(self) -> None:
        """First call: stop (after the drain delay). Second call: stop now."""
        if self._stopped.is_set():
            self._hurry.set()
        self._stopped.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight sends finish (up to grace; None: the config's
        shutdown.grace), let the queue writer commit what sessions submitted and answer
        them, close everything. Idempotent."""
        grace = self.config.shutdown.grace if grace is None else grace
        if self._closed:
            return
        self._closed = True
        self.handler.accepting = False
        if self.smtp_server is not None:
            self.smtp_server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.smtp_server.wait_closed(), 1.0)
        await self.scheduler.stop(grace)
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=grace)
        for transport in self.transports.values():
            await transport.close()
        await self.webhooks.stop(grace)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
        await self.store.close()  # every write already submitted is committed first
        # Each session whose message was committed resumes and sends its 250 before the
        # loop ends (a later submit is refused: the client gets 451 and keeps its copy).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._answered.wait(), grace)
        if self._file_watch is not None:
            self._file_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._file_watch
            self._file_watch = None
        if self._loop_lag is not None:
            self._loop_lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_lag
            self._loop_lag = None
        if self._started:
            event(log, logging.INFO, "stopped")


def log_config_warnings(config: Config, from_environment: Collection[str] = ()) -> None:
    """What works but weakens security (tls_verify: false...): at start and at reload.
    ``from_environment``: keys a variable set, which are no literal passwords."""
    for warning in config_warnings(config, from_environment):
        log.warning("config: %s", warning)


def _reason(exc: BaseException) -> str:
    """A start failure in words, without errno numbers or a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__
