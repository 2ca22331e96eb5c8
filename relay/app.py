"""Wiring and lifecycle: startup() -> serve() -> shutdown().

App receives a validated Config and builds the edges (store, transports, listener, HTTP)
and the scheduler; it owns the order in which they start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from relay import __version__
from relay.config import Config, ListenConfig, config_warnings, problem_line
from relay.errors import ConfigError, StoreError
from relay.http import build_app, start_http
from relay.ingest import IngestHandler, SessionLimits, start_listener
from relay.logs import event
from relay.maildir import MaildirTransport
from relay.message import NewMessage
from relay.metrics import Metrics
from relay.scheduler import AccountWorker, Scheduler
from relay.store import SQLiteStore
from relay.transport import Transport
from relay.upstream import UpstreamPool

log = logging.getLogger("relay")
ADMIT_CACHE_S = 0.2  # how stale the backlog count used by on_limit: reject may be


def build_transports(
    config: Config, metrics: Metrics | None = None, names: Iterable[str] | None = None
) -> dict[str, Transport]:
    transports: dict[str, Transport] = {}
    for name, acc in config.accounts.items():
        if names is not None and name not in names:
            continue
        if acc.transport == "maildir":
            assert acc.path is not None
            transports[name] = MaildirTransport(name, acc.path)
        else:
            counter = metrics.connections_opened.labels(name).inc if metrics else None
            transports[name] = UpstreamPool(
                name, acc, on_connect=counter,
                login_hold_s=config.auth_backoff_for(name).initial)
    return transports


class App:
    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, config.accounts)
        self.store = SQLiteStore(config.queue.path, commit=config.queue.commit)
        self.store.on_internal_error = self.metrics.internal_errors.labels("queue_writer").inc
        self.transports = build_transports(config, self.metrics)
        self.scheduler = Scheduler(config, self.store, self.transports, self.metrics)
        self.handler = IngestHandler(config, self._submit, self.metrics, self._admit)
        self.limits = SessionLimits(config, self.metrics)
        self._retiring: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, tuple[float, int]] = {}
        self.smtp_server: asyncio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.smtp_port = 0
        self.http_port = 0
        self._stopped = asyncio.Event()

    async def _submit(self, message: NewMessage) -> None:
        await self.store.enqueue(message)
        if message.account in self._waiting:
            at, count = self._waiting[message.account]
            self._waiting[message.account] = (at, count + 1)
        self.scheduler.notify(message.account)

    async def _admit(self, account: str) -> bool:
        """rate_limit.on_limit: reject — refuse while the backlog exceeds a window's worth."""
        if self.config.accounts[account].rate_limit.on_limit != "reject":
            return True
        capacity = self.scheduler.workers[account].limiter.window_capacity()
        if capacity is None:
            return True
        now = time.monotonic()
        at, count = self._waiting.get(account, (0.0, 0))
        if now - at > ADMIT_CACHE_S:
            count = await self.store.waiting_count(account)
            self._waiting[account] = (now, count)
        return count < capacity

    async def startup(self) -> None:
        for warning in config_warnings(self.config):
            log.warning("config: %s", warning)
        await self.store.open()  # StoreError: corrupt, foreign or locked queue file
        try:
            await self.scheduler.start()
            self.smtp_server = await start_listener(self.config, self.handler, self.limits)
            self.smtp_port = self.smtp_server.sockets[0].getsockname()[1]
            if self.config.metrics.enabled:
                app = build_app(self.registry, self.refresh_gauges, self.ready_problem)
                self.http_runner, self.http_port = await start_http(
                    app, self.config.metrics.host, self.config.metrics.port
                )
        except BaseException:
            await self.shutdown()
            raise
        event(log, logging.INFO, "started", version=__version__,
              listen=f"{self.config.listen.host}:{self.smtp_port}",
              metrics=f"{self.config.metrics.host}:{self.http_port}" if self.http_runner else None,
              queue=str(self.config.queue.path), accounts=",".join(self.config.accounts))

    async def refresh_gauges(self) -> None:
        """Queue gauges from the queue file (so they include changes made by the CLI)."""
        try:
            counts = await self.store.counts()
            oldest = await self.store.oldest_ready()
        except StoreError:
            return
        self.metrics.set_queue(counts, oldest, time.time())
        for name, transport in self.transports.items():
            self.metrics.connections_open.labels(name).set(transport.open_connections())

    async def ready_problem(self) -> str | None:
        if self.smtp_server is None or not self.smtp_server.is_serving():
            return "SMTP listener is not accepting"
        try:
            await self.store.execute([])
        except StoreError as exc:
            return f"queue not writable: {exc}"
        return None

    async def reload(self, new: Config) -> list[str]:
        """Apply a new, already validated config without dropping connections or messages.

        Accounts, limits, routing, retry, bounces and listener users take effect; what
        needs new sockets or another queue file keeps its old value until a restart (the
        returned notes say which).
        """
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
        }
        removed = set(old.accounts) - set(new.accounts)
        self.metrics.add_accounts(new.accounts)
        fresh = build_transports(new, self.metrics, names=changed)
        retired_transports = [self.transports.pop(n) for n in changed | removed
                              if n in self.transports]
        self.transports.update(fresh)
        retired = await self.scheduler.replace_accounts(new, self.transports, changed)
        self.config = new
        self.handler.configure(new)
        self.limits.configure(new)
        self._waiting.clear()
        task = asyncio.create_task(self._retire(retired, retired_transports))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        for name in sorted(removed):
            notes.append(f"account {name} removed: its queued messages wait until it returns")
        event(log, logging.INFO, "reloaded", changed=",".join(sorted(changed)) or None,
              removed=",".join(sorted(removed)) or None)
        return notes

    async def _retire(self, workers: list[AccountWorker], transports: list[Transport]) -> None:
        """Old workers finish their sends on their old connections, then those close."""
        await self.scheduler.drain(workers, grace=30.0)
        for transport in transports:
            await transport.close()

    async def serve(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight sends finish (up to grace), close everything."""
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
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
        await self.store.close()
        event(log, logging.INFO, "stopped")
