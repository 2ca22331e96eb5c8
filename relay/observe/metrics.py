"""Prometheus metrics: one registry passed in, base units, bounded labels (never addresses)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from relay import __version__
from relay.queue.types import MessageState

REJECT_REASONS = ("unknown_account", "bad_header", "too_big", "too_many_recipients",
                  "store_unavailable", "low_disk", "rate_limited", "internal_error", "bad_address",
                  "bare_newline", "access_denied", "too_many_connections", "cross_protocol",
                  "too_many_client_connections", "auth_locked",
                  "header_too_big", "queue_busy", "upstream_refused")
# Where relay_internal_errors_total is counted (each is restarted after an error).
INTERNAL_COMPONENTS = ("account_worker", "delivery", "queue_watcher", "queue_writer",
                       "webhook_sender")
# relay_account_backoffs_total reasons (worker.backoff_reason; relay.delivery.refusals.REASONS).
BACKOFF_REASONS = ("quota", "auth", "sender_not_allowed", "throttled", "refused", "connect",
                   "disk_full")
# Delivery transactions: milliseconds to minutes (RFC 5321 allows 10 minutes for DATA).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Event loop lag: a healthy loop wakes within a millisecond; a stall shows in seconds.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# How often the lag is sampled: twice a second costs nothing and misses no stall that
# long; a shorter one is seen only if a sample falls into it.
LOOP_LAG_INTERVAL_S = 0.5
# Queue delay: from instant to days (retries run for up to retry.max_age).
_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 172800)


class Metrics:
    def __init__(self, registry: CollectorRegistry, accounts: Iterable[str]) -> None:
        self.registry = registry
        r = registry
        acc = ["account"]
        self.received = Counter("relay_messages_received", "Messages accepted and queued.",
                                registry=r)
        self.delivered = Counter("relay_messages_delivered", "Messages delivered.", acc,
                                 registry=r)
        self.deferred = Counter("relay_messages_deferred", "Delivery attempts deferred.", acc,
                                registry=r)
        self.failed = Counter("relay_messages_failed", "Messages failed permanently.", acc,
                              registry=r)
        self.deduplicated = Counter(
            "relay_messages_deduplicated",
            "Messages not queued again: their Message-ID, sender, recipients and listener"
            " user were accepted within dedup.window.", registry=r)
        # Per webhook (its name: never the URL) and result: sent, failed (retried later),
        # gave_up (past max_age).
        self.webhook_deliveries = Counter(
            "relay_webhook_deliveries", "Webhook POSTs of delivery events, by result.",
            ["webhook", "result"], registry=r)
        self.rejected = Counter("relay_messages_rejected",
                                "Messages refused at the SMTP listener.", ["reason"], registry=r)
        # Several workers (multiprocess mode, see exposition_registry): the queue gauges
        # are set only by the process that serves /metrics, from the one queue file, so
        # they are taken once (livemax: the others hold 0), never summed per worker.
        self.queue = Gauge("relay_queue_messages", "Messages in the queue file by state.",
                           ["account", "state"], registry=r, multiprocess_mode="livemax")
        self.oldest = Gauge("relay_oldest_message_age_seconds",
                            "Age of the oldest undelivered message.", acc, registry=r,
                            multiprocess_mode="livemax")
        self.connections_opened = Counter("relay_upstream_connections_opened",
                                          "Upstream connections opened.", acc, registry=r)
        self.connections_open = Gauge("relay_upstream_connections_open",
                                      "Upstream connections open now.", acc, registry=r,
                                      multiprocess_mode="livesum")
        self.auth_failures = Counter("relay_upstream_auth_failures",
                                     "Upstream AUTH failures.", acc, registry=r)
        self.rate_limited = Counter("relay_rate_limited",
                                    "Times an account's rate limit held ready messages.", acc,
                                    registry=r)
        self.delivery_duration = Histogram("relay_delivery_duration_seconds",
                                           "Duration of upstream transactions.", acc,
                                           buckets=_DURATION_BUCKETS, registry=r)
        self.queue_delay = Histogram("relay_queue_delay_seconds",
                                     "Time from acceptance to delivery.", acc,
                                     buckets=_DELAY_BUCKETS, registry=r)
        self.loop_lag = Histogram("relay_event_loop_lag_seconds",
                                  "How late the event loop ran a timer: time no session,"
                                  " delivery or HTTP request made progress.",
                                  buckets=_LAG_BUCKETS, registry=r)
        self.account_backoffs = Counter("relay_account_backoffs",
                                        "Times an account backed off as a whole, by why.",
                                        ["account", "reason"], registry=r)
        # "Account down" as one alert: backed off (by this process) or paused (anywhere).
        # livemax: with worker processes, a dead worker's last value must go with it (the
        # default mode, all, keeps a killed worker's 1 for ever and the alert firing).
        self.account_backoff = Gauge("relay_account_backoff",
                                     "1 while the account is backed off as a whole.", acc,
                                     registry=r, multiprocess_mode="livemax")
        self.account_paused = Gauge("relay_account_paused",
                                    "1 while the account is paused (relay accounts pause).",
                                    acc, registry=r, multiprocess_mode="livemax")
        # From the sends recorded in the queue file (every process's), set by the process
        # that serves /metrics: window is the rate_limit key (per_minute, per_rolling_day).
        self.quota_remaining = Gauge("relay_account_quota_remaining",
                                     "Sends the account's rate-limit window still allows.",
                                     ["account", "window"], registry=r,
                                     multiprocess_mode="livemax")
        # 1: full speed; below 1 while the upstream asked this process to slow down
        # (relay.delivery.throttle). livemin: the most throttled worker shows.
        self.throttle_factor = Gauge("relay_account_throttle_factor",
                                     "Share of the account's rate and connections in use"
                                     " after the upstream's slow-down replies.", acc,
                                     registry=r, multiprocess_mode="livemin")
        self.internal_errors = Counter("relay_internal_errors",
                                       "Unexpected errors in a background task (restarted).",
                                       ["component"], registry=r)
        for component in INTERNAL_COMPONENTS:
            self.internal_errors.labels(component)
        self.sessions_active = Gauge("relay_smtp_sessions_active", "Open SMTP client sessions.",
                                     registry=r, multiprocess_mode="livesum")
        build = Gauge("relay_build_info", "relay version.", ["version"], registry=r,
                      multiprocess_mode="livemax")
        build.labels(__version__).set(1)
        self.accounts: list[str] = []
        self.add_accounts(accounts)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def add_accounts(self, names: Iterable[str]) -> None:
        """Create each account's series at zero, so they exist before the first event."""
        for name in names:
            if name in self.accounts:
                continue
            self.accounts.append(name)
            for metric in (self.delivered, self.deferred, self.failed, self.connections_opened,
                           self.auth_failures, self.rate_limited, self.delivery_duration,
                           self.queue_delay, self.oldest, self.connections_open,
                           self.account_backoff, self.account_paused):
                metric.labels(name)
            self.throttle_factor.labels(name).set(1.0)
            for state in MessageState:
                self.queue.labels(name, str(state))
            for reason in BACKOFF_REASONS:
                self.account_backoffs.labels(name, reason)

    def set_queue(self, counts: dict[tuple[str, str], int], oldest_created: dict[str, float],
                  now: float) -> None:
        for name in self.accounts:
            for state in MessageState:
                self.queue.labels(name, str(state)).set(counts.get((name, str(state)), 0))
            created = oldest_created.get(name)
            self.oldest.labels(name).set(max(now - created, 0.0) if created else 0.0)


def multiprocess_dir() -> str | None:
    """Set (by relay.supervisors) for the workers of `relay serve --workers N`: every
    metric is kept in files there, one per process, and read back together."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: this process's registry, or with several workers the
    figures of all of them (prometheus-client's multiprocess mode: counters and
    histograms summed, gauges by their ``multiprocess_mode``)."""
    path = multiprocess_dir()
    if path is None:
        return registry
    shared = CollectorRegistry()
    multiprocess.MultiProcessCollector(shared, path)  # type: ignore[no-untyped-call]
    return shared


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def forget_process(pid: int, path: str) -> None:
    """A worker died: drop its live gauges from ``path`` (its counters stay in the sums)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


async def watch_loop_lag(histogram: Histogram, interval: float = LOOP_LAG_INTERVAL_S) -> None:
    """Observe how much later than asked each sleep wakes up: the event loop's lag.

    Anything that holds the loop (a slow parse, a blocking call) delays every timer, so
    one task that sleeps and checks the clock sees every stall longer than its interval.
    """
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - start - interval))


def unexposed_metrics(accounts: Iterable[str]) -> Metrics:
    """Metrics in a registry of their own that nothing serves: for a one-shot process
    (`relay sendmail` writing into the queue itself) that drives the listener's code."""
    return Metrics(CollectorRegistry(), accounts)
