"""`relay bench`: relay against a bare aiosmtpd server and Postfix, in one run on this machine.

Each case starts its servers fresh (relay as ``python -m relay serve`` on a new queue
file), drives load with Postfix's smtp-source when installed (else the built-in client)
and stops them. Cases are interleaved within a round; each relay figure is reported with
the median over rounds of its ratio to the baseline measured in the same round.
docs/performance.md explains the method and keeps the figures of a full run.

Usage: relay bench [--quick] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from relay.bench.loadgen import Load, LoadResult, run_builtin, run_smtp_source
from relay.bench.relayproc import RelayProcess, fill_delivered, queue_states, scrape_times
from relay.bench.render import machine, render
from relay.bench.sink import (
    HOST,
    BareServer,
    BenchSetupError,
    PostfixInstance,
    Sink,
    cpu_s,
    find_tool,
    free_port,
    postfix_problem,
    rss_mb,
    until,
)
from relay.bench.stats import (
    BARE,
    CASES,
    LABELS,
    PER_MESSAGE,
    POSTFIX,
    RELAY_WORKERS,
    SCRAPES,
    Sample,
    fmt_dict,
    summarize,
    targets,
)
from relay.config.schema import resolve_workers
from relay.errors import StoreError
from relay.runner import run

T = TypeVar("T")
FULL = {"rounds": 3, "messages": 5000, "e2e_messages": 20_000, "queued": 100_000,
        "delivered": 1_000_000}
QUICK = {"rounds": 1, "messages": 300, "e2e_messages": 1000, "queued": 2000, "delivered": 2000}
MIN_RATE = 20.0  # msgs/s: below this a load is cut off (every wait here is bounded)
QUIET_S = 0.5  # a sink count that has not moved for this long is final
WARMUP_PER_SESSION = 5  # untimed messages per sender before each measurement


@dataclass(frozen=True)
class Options:
    rounds: int
    messages: int
    e2e_messages: int
    queued: int
    delivered: int = 0
    size: int = 10_240
    sessions: int = 20
    load: str = "auto"
    sink: str = "auto"
    postfix: bool = True
    json_path: str | None = None
    workdir: str | None = None
    keep: bool = False
    workers: int | str | None = None  # the `relay workers` column (None: as serve, auto)


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.smtp_source = find_tool("smtp-source") if options.load != "builtin" else None
        self.smtp_sink = find_tool("smtp-sink") if options.sink != "aiosmtpd" else None
        if options.load == "smtp-source" and not self.smtp_source:
            raise BenchSetupError("--load smtp-source: smtp-source is not installed")
        if options.sink == "smtp-sink" and not self.smtp_sink:
            raise BenchSetupError("--sink smtp-sink: smtp-sink is not installed")
        self.postfix_reason = postfix_problem() if options.postfix else "disabled (--no-postfix)"
        self.workers = resolve_workers(options.workers or "auto")
        self._dirs = 0

    def _dir(self, name: str) -> Path:
        self._dirs += 1
        return self.workdir / f"{self._dirs:03d}-{name}"

    def _done_with(self, path: Path) -> None:
        if not self.options.keep:
            shutil.rmtree(path, ignore_errors=True)

    def systems(self, case: str) -> list[str]:
        """The case's systems that run here: no Postfix without it, no `relay workers`
        column when it would be one worker (the `relay` column is that)."""
        return [s for s in CASES[case][1] if (s != POSTFIX or self.postfix_reason is None)
                and (s != RELAY_WORKERS or self.workers > 1)]

    def _relay_workers(self, system: str) -> int:
        return self.workers if system == RELAY_WORKERS else 1

    async def _send(
        self, port: int, messages: int, *, persistent: bool, builtin: bool = False
    ) -> LoadResult:
        opts = self.options
        load = Load(messages, opts.sessions, opts.size, persistent)
        timeout_s = max(60.0, messages / MIN_RATE)
        if self.smtp_source and not builtin:
            return await run_smtp_source(self.smtp_source, HOST, port, load, timeout_s=timeout_s)
        return await run_builtin(HOST, port, load, timeout_s=timeout_s)

    async def _warm(self, port: int, *, persistent: bool, builtin: bool = False) -> int:
        """Untimed messages first, so every system is measured warm (Postfix has forked
        its smtpd and cleanup processes, relay has its pool); return how many went in."""
        result = await self._send(
            port, WARMUP_PER_SESSION * self.options.sessions, persistent=persistent, builtin=builtin
        )
        if not result.accepted:
            raise BenchSetupError(f"warm-up: nothing accepted ({'; '.join(result.errors)})")
        return result.accepted

    # -- cases -----------------------------------------------------------------------
    async def ingest(self, system: str, sample: Sample, *, persistent: bool) -> None:
        """Accept-and-commit only: relay's account points at a closed port, Postfix holds."""
        n = sample.messages
        paused = free_port()  # nothing listens there: delivery is paused
        root = self._dir(f"{sample.case}-{system}")
        try:
            if system == POSTFIX:
                async with PostfixInstance(root, sink_port=paused, hold=True) as postfix:
                    warm = await self._warm(postfix.port, persistent=persistent)
                    result = await self._send(postfix.port, n, persistent=persistent)
                    sample.take(result)
                    expected = warm + result.accepted
                    sample.verified = await until(lambda: postfix.queued(["hold"]) >= expected, 10)
            elif system == BARE:
                async with BareServer() as bare:
                    await self._warm(bare.port, persistent=persistent)
                    sample.take(await self._send(bare.port, n, persistent=persistent))
            else:
                async with RelayProcess(root, upstream_port=paused,
                                        workers=self._relay_workers(system)) as relay:
                    warm = await self._warm(relay.port, persistent=persistent)
                    cpu_before = cpu_s(relay.pid)
                    result = await self._send(relay.port, n, persistent=persistent)
                    self._process_figures(sample, relay, cpu_before)
                sample.take(result)
                states = await queue_states(relay.queue)
                sample.verified = sum(states.values()) == warm + result.accepted
        finally:
            self._done_with(root)

    async def ack(self, system: str, sample: Sample) -> None:
        """The built-in client times end of DATA to 250 while relay also delivers."""
        n = sample.messages
        if system == BARE:
            async with BareServer() as bare:
                await self._warm(bare.port, persistent=True, builtin=True)
                sample.take(await self._send(bare.port, n, persistent=True, builtin=True))
            return
        commit = "per-message" if system == PER_MESSAGE else "group"
        root = self._dir(f"ack-{system}")
        try:
            async with (
                Sink(self.smtp_sink) as sink,
                RelayProcess(root, upstream_port=sink.port, commit=commit,
                             workers=self._relay_workers(system)) as relay,
            ):
                await self._warm(relay.port, persistent=True, builtin=True)
                cpu_before = cpu_s(relay.pid)
                result = await self._send(relay.port, n, persistent=True, builtin=True)
                self._process_figures(sample, relay, cpu_before)
            sample.take(result)
        finally:
            self._done_with(root)

    async def e2e(self, system: str, sample: Sample) -> None:
        """First message sent to last received by the sink, ingest and delivery at once."""
        n = sample.messages
        root = self._dir(f"e2e-{system}")
        wait_s = max(60.0, n / MIN_RATE)
        try:
            async with Sink(self.smtp_sink) as sink:
                server: RelayProcess | PostfixInstance
                if system == POSTFIX:
                    server = PostfixInstance(root, sink_port=sink.port, hold=False)
                else:
                    server = RelayProcess(root, upstream_port=sink.port,
                                          workers=self._relay_workers(system))
                async with server:
                    sink.expect(WARMUP_PER_SESSION * self.options.sessions)
                    warm = await self._warm(server.port, persistent=True)
                    await sink.wait(wait_s)
                    cpu_before = cpu_s(server.pid) if isinstance(server, RelayProcess) else None
                    sink.expect(n)
                    started = time.perf_counter()
                    result = await self._send(server.port, n, persistent=True)
                    reached = await sink.wait(wait_s)
                    if isinstance(server, RelayProcess):
                        self._process_figures(sample, server, cpu_before)
                        states = await queue_states(server.queue, drained_within_s=30)
                        left = sum(states.get(s, 0) for s in ("queued", "deferred", "sending"))
                    else:
                        postfix = server
                        await until(lambda: postfix.queued() == 0, 30)
                        left = postfix.queued()
                    received = await sink.settle(QUIET_S) - warm
            sample.take(result)
            sample.ingest_rate = sample.rate
            sample.rate = n / (reached - started) if reached else None
            sample.verified = reached is not None and received == n and left == 0
            if not sample.verified:
                problem = f"sink got {received} of {n}, {left} left in the queue"
                sample.error = f"{sample.error}; {problem}" if sample.error else problem
        finally:
            self._done_with(root)

    def _process_figures(
        self, sample: Sample, relay: RelayProcess, cpu_before: float | None
    ) -> None:
        """Start-up time, RSS now, and CPU seconds since ``cpu_before``."""
        sample.startup_s = relay.startup_s
        sample.rss_mb = rss_mb(relay.pid)
        cpu_now = cpu_s(relay.pid)
        if cpu_now is not None and cpu_before is not None:
            sample.cpu_s = cpu_now - cpu_before

    async def queued(self) -> dict[str, Any]:
        """Fill a paused relay with ``queued`` messages; RSS, then start-up over them."""
        n = self.options.queued
        root = self._dir("queued")
        out: dict[str, Any] = {"messages": n}
        paused = free_port()
        try:
            async with RelayProcess(root, upstream_port=paused) as relay:
                result = await self._send(relay.port, n, persistent=True)
                out["fill_rate"] = result.rate
                out["fill_error"] = "; ".join(result.errors) or None
                out["rss_after_fill_mb"] = rss_mb(relay.pid)
            states = await queue_states(relay.queue)
            out["in_queue"] = sum(states.values())
            out["queue_file_mb"] = (
                sum(p.stat().st_size for p in root.glob("queue.sqlite3*")) / 2**20
            )
            async with RelayProcess(root, upstream_port=paused) as again:
                out["startup_s"] = again.startup_s
                await asyncio.sleep(2.0)  # its scheduler has claimed (and failed) a batch
                out["rss_after_restart_mb"] = rss_mb(again.pid)
        finally:
            self._done_with(root)
        return out

    async def delivered(self) -> dict[str, Any]:
        """A queue file holding ``delivered`` delivered records, all younger than
        queue.keep_delivered (none is pruned: the worst case): /metrics time and RSS."""
        n = self.options.delivered
        root = self._dir("delivered")
        out: dict[str, Any] = {"messages": n}
        try:
            started = time.perf_counter()
            await fill_delivered(root / "queue.sqlite3", n, account="sink")
            out["fill_s"] = time.perf_counter() - started
            out["queue_file_mb"] = (
                sum(p.stat().st_size for p in root.glob("queue.sqlite3*")) / 2**20
            )
            async with RelayProcess(root, upstream_port=free_port()) as relay:
                out["startup_s"] = relay.startup_s
                times = await scrape_times(relay.metrics_port, SCRAPES)
                out["scrape_p50_ms"] = statistics.median(times) * 1000
                out["scrape_max_ms"] = max(times) * 1000
                out["rss_mb"] = rss_mb(relay.pid)
        finally:
            self._done_with(root)
        return out

    # -- the run ---------------------------------------------------------------------
    async def measure(self, case: str, system: str, round_: int) -> Sample:
        n = self.options.e2e_messages if case == "e2e" else self.options.messages
        sample = Sample(round=round_, case=case, system=system, messages=n)
        runs: dict[str, Callable[[], Awaitable[None]]] = {
            "ingest_conn": lambda: self.ingest(system, sample, persistent=False),
            "ingest_sess": lambda: self.ingest(system, sample, persistent=True),
            "ack": lambda: self.ack(system, sample),
            "e2e": lambda: self.e2e(system, sample),
        }
        try:
            await runs[case]()
        except (BenchSetupError, StoreError, OSError) as exc:
            sample.error = str(exc)
            if system == POSTFIX and isinstance(exc, BenchSetupError):
                # Fall back cleanly: the remaining cases run without the Postfix baseline.
                self.postfix_reason = f"could not start a private instance: {exc}"
        _progress(sample)
        return sample

    async def run(self) -> tuple[list[Sample], dict[str, Any] | None, dict[str, Any] | None]:
        samples = []
        for round_ in range(1, self.options.rounds + 1):
            for case in CASES:
                systems = self.systems(case)
                shift = (round_ - 1) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    samples.append(await self.measure(case, system, round_))
        queued = None
        if self.options.queued:
            try:
                queued = await self.queued()
            except (BenchSetupError, StoreError, OSError) as exc:
                queued = {"messages": self.options.queued, "error": str(exc)}
            print(f"queued: {fmt_dict(queued)}", file=sys.stderr)
        delivered = None
        if self.options.delivered:
            try:
                delivered = await self.delivered()
            except (BenchSetupError, StoreError, OSError) as exc:
                delivered = {"messages": self.options.delivered, "error": str(exc)}
            print(f"delivered: {fmt_dict(delivered)}", file=sys.stderr)
        return samples, queued, delivered


def _progress(s: Sample) -> None:
    parts = [f"round {s.round} {s.case:<11} {LABELS[s.system]:<15}"]
    if s.rate is not None:
        parts.append(f"{s.rate:8.0f} msgs/s")
    if s.ingest_rate is not None:
        parts.append(f"(sent at {s.ingest_rate:.0f}/s)")
    if s.p99_ms is not None:
        parts.append(f"p50/p90/p99 {s.p50_ms:.1f}/{s.p90_ms:.1f}/{s.p99_ms:.1f} ms")
    if s.verified is False:
        parts.append("NOT VERIFIED")
    if s.error:
        parts.append(f"error: {s.error}")
    print(" ".join(parts), file=sys.stderr, flush=True)


async def run_bench(options: Options, workdir: Path) -> dict[str, Any]:
    info = machine()
    started = time.time()
    bench = Bench(options, workdir)
    if bench.postfix_reason:
        print(f"postfix baseline skipped: {bench.postfix_reason}", file=sys.stderr)
    samples, queued, delivered = await bench.run()
    info["loadavg_after"] = os.getloadavg()
    info["duration_s"] = round(time.time() - started, 1)
    figures = summarize(samples, options.rounds)
    return {
        "machine": info,
        "options": {**asdict(options), "workers_resolved": bench.workers},
        "cases": {case: description for case, (description, _) in CASES.items()},
        "tools": {
            "load": "smtp-source" if bench.smtp_source else "built-in client",
            "sink": "smtp-sink" if bench.smtp_sink else "aiosmtpd",
            "postfix": None if bench.postfix_reason else info.get("postfix", "yes"),
            "postfix_skipped_because": bench.postfix_reason,
        },
        "figures": figures,
        "queued": queued,
        "delivered": delivered,
        "targets": [
            {**asdict(t), "passed": t.passed} for t in targets(figures, queued, delivered)
        ],
        "samples": [asdict(s) for s in samples],
    }


# -- command line ---------------------------------------------------------------------------


def options_from(args: argparse.Namespace) -> Options:
    defaults = QUICK if args.quick else FULL
    values = {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}
    for key, default in defaults.items():
        if values.get(key) is None:
            values[key] = default
    return Options(**values)


def _rounded(node: Any) -> Any:
    """Floats to 4 decimals: the figures are not that precise, and the JSON reads easier."""
    if isinstance(node, float):
        return round(node, 4)
    if isinstance(node, dict):
        return {k: _rounded(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_rounded(v) for v in node]
    return node


_run = run  # the same event loop as `relay serve`


def cmd_bench(args: argparse.Namespace) -> int:
    options = options_from(args)
    if (
        min(options.rounds, options.messages, options.e2e_messages, options.sessions, options.size)
        < 1
        or options.queued < 0
        or options.delivered < 0
    ):
        print("relay bench: counts must be positive", file=sys.stderr)
        return 2
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not options.workdir:
        workdir.chmod(0o711)  # Postfix's daemons (user postfix) must pass through it
    try:
        report = _run(run_bench(options, workdir))
    except BenchSetupError as exc:
        print(f"relay bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(report))
    text = json.dumps(_rounded(report), indent=2)
    print(text)
    if options.json_path:
        Path(options.json_path).write_text(text + "\n")
    failed = [s for s in report["samples"] if s["error"] or s["verified"] is False]
    errors = [(report[k] or {}).get("error") for k in ("queued", "delivered")]
    return 1 if failed or any(errors) else 0
