"""The parent of N worker processes (`relay serve --workers N`).

Each worker is ``python -m relay serve`` with the same config file, told by environment
variables which worker it is (RELAY_WORKER_INDEX), which port to bind with SO_REUSEPORT
(RELAY_WORKER_PORT: the parent resolves port 0 once and holds it, so all bind the same
one) and which pipe to write one byte to once it is serving (RELAY_READY_FD). Every
worker delivers, sharing each account's limits through the queue (relay.delivery.host);
worker 0 also serves metrics.

The parent holds the queue's exclusive lock (a second `relay serve` on the same queue is
refused, as before) and opens the queue itself: when a worker dies, its claims go back
to the queue at once (their owner's liveness lock went with it), and it is started again
after a backoff that grows while it keeps dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from relay.app import build_store
from relay.config.loading import load_config
from relay.config.schema import Config, resolve_workers
from relay.errors import ConfigError, StoreError
from relay.observe.logs import event
from relay.observe.metrics import MULTIPROC_ENV, forget_process
from relay.queue.store import QueueStore

log = logging.getLogger("relay.supervisor")
READY_TIMEOUT_S = 60.0  # a worker that is not serving by then failed to start
STOP_TIMEOUT_S = 30.0  # after SIGTERM: then SIGKILL (its claims return to the queue)
HEALTHY_RUN_S = 30.0  # a worker that ran this long before dying restarts at once
MAX_RESTART_DELAY_S = 30.0
ENV_INDEX, ENV_PORT, ENV_READY = "RELAY_WORKER_INDEX", "RELAY_WORKER_PORT", "RELAY_READY_FD"
ENV_COUNT = "RELAY_WORKERS"


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a row quickly."""
    return 0.0 if failures <= 1 else min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (failures - 2))


def can_share_port() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


class WorkerFailed(Exception):
    """A worker exited (or hung) before it was serving."""


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # monotonic
    failures: int = 0
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, count: int) -> None:
        self.config = config
        self.path = config_path
        self.workers = [Worker(i) for i in range(count)]
        self.port = config.listen.port
        self.stopping = asyncio.Event()
        self._port_holder: socket.socket | None = None
        # Every worker's metrics, read back together by the one that serves /metrics.
        self.metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        # The exclusive lock: one supervisor (or single relay) per queue file.
        self.store: QueueStore = build_store(config, role="supervisor")

    async def run(self) -> int:
        """Start every worker, keep them running until SIGTERM; 1 if they cannot start."""
        try:
            await self.store.open()
        except StoreError as exc:
            event(log, logging.ERROR, "start_failed", reason=str(exc))
            return 1
        loop = asyncio.get_running_loop()
        try:
            self._reserve_port()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop)
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
            try:
                await asyncio.gather(*(self._start(w) for w in self.workers))
            except (WorkerFailed, OSError) as exc:
                event(log, logging.ERROR, "start_failed", reason=f"workers: {exc}")
                await self._stop_all()
                return 1
            event(log, logging.INFO, "workers_started", count=len(self.workers),
                  listen=f"{self.config.listen.host}:{self.port}",
                  pids=",".join(str(w.proc.pid) for w in self.workers if w.proc))
            for worker in self.workers:
                worker.keeper = asyncio.create_task(self._keep(worker))
            await self.stopping.wait()
            await self._stop_all()
            event(log, logging.INFO, "workers_stopped")
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._port_holder is not None:
                self._port_holder.close()
            await self.store.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _reserve_port(self) -> None:
        """Port 0 means any free port, but the same one for every worker: bind it here
        with SO_REUSEPORT (not listening, so it takes no connections) and keep it."""
        if self.port != 0:
            return
        family = socket.AF_INET6 if ":" in self.config.listen.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((self.config.listen.host, 0))
        self.port = int(holder.getsockname()[1])
        self._port_holder = holder

    async def _start(self, worker: Worker) -> None:
        """Spawn one worker and wait until it serves (its byte on the ready pipe)."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **{ENV_INDEX: str(worker.index), ENV_PORT: str(self.port),
                                  ENV_READY: str(write_fd), ENV_COUNT: str(len(self.workers)),
                                  MULTIPROC_ENV: self.metrics_dir})
        args = ["--config", self.path] if self.path else []
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", *args, "--workers", "1",
                env=env, pass_fds=(write_fd,), stdin=asyncio.subprocess.DEVNULL,
                # Signals from a terminal (Ctrl-C) reach the parent only: it stops the
                # workers in order, and never mistakes their exit for a crash.
                start_new_session=True)
        finally:
            os.close(write_fd)
        worker.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            reading = loop.run_in_executor(None, os.read, read_fd, 1)
            try:
                ready = await asyncio.wait_for(asyncio.shield(reading), READY_TIMEOUT_S)
            except TimeoutError:
                worker.proc.kill()
                await reading  # the kill closes the pipe: the read returns
                raise WorkerFailed(f"worker {worker.index} did not start in time") from None
        finally:
            os.close(read_fd)
        if not ready:
            code = await worker.proc.wait()
            raise WorkerFailed(f"worker {worker.index} exited with status {code} at start")

    async def _keep(self, worker: Worker) -> None:
        """Restart the worker whenever it dies, until relay stops."""
        while not self.stopping.is_set():
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self.stopping.is_set():
                return
            quick = time.monotonic() - worker.started_at < HEALTHY_RUN_S
            worker.failures = worker.failures + 1 if quick else 1
            event(log, logging.ERROR, "worker_exited", worker=worker.index,
                  pid=worker.proc.pid, status=code)
            forget_process(worker.proc.pid, self.metrics_dir)
            await self._requeue_orphans()
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(restart_delay(worker.failures)):
                        await self.stopping.wait()
                if self.stopping.is_set():
                    return
                try:
                    await self._start(worker)
                    event(log, logging.WARNING, "worker_restarted", worker=worker.index,
                          pid=worker.proc.pid)
                    break
                except (WorkerFailed, OSError) as exc:
                    worker.failures += 1
                    event(log, logging.ERROR, "worker_exited", worker=worker.index,
                          reason=str(exc))

    async def _requeue_orphans(self) -> None:
        """A dead worker's claims back to the queue now, not when their lease runs out."""
        try:
            count = await self.store.requeue_expired(time.time())
        except StoreError as exc:
            event(log, logging.ERROR, "queue_error", reason=str(exc))
            return
        if count:
            event(log, logging.WARNING, "recovered", count=count,
                  reason="a worker died: the messages it was sending are queued again")

    def _on_hangup(self) -> None:
        """SIGHUP: forward it only if the file is valid here (each worker checks it again;
        an invalid file leaves every worker on the config it runs)."""
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            for problem in exc.problems:
                event(log, logging.ERROR, "reload_rejected", reason=problem)
            event(log, logging.ERROR, "reload_rejected", reason="the new config is invalid;"
                  " not passed to the workers, which keep the previous one")
            return
        # The file's own value against the file's at start: `--workers N` on the command
        # line overrides both, and a reload does not change what the command line said.
        if resolve_workers(new.workers) != resolve_workers(self.config.workers):
            event(log, logging.WARNING, "reload_note",
                  reason="workers changed: takes effect at the next restart")
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGHUP)

    def _on_stop(self) -> None:
        """SIGTERM or SIGINT. The first stops the workers (_stop_all); a second is passed
        on, so each worker skips the rest of its shutdown.drain_delay as one relay does."""
        if not self.stopping.is_set():
            self.stopping.set()
            return
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains as a single relay does), then wait."""
        self.stopping.set()
        keepers = [w.keeper for w in self.workers if w.keeper is not None]
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*waits, return_exceptions=True)
        await self._requeue_orphans()
