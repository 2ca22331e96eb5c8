"""`relay status`: the queue by account and state, recent attempts, and account health.

One screen, like Postfix's `postqueue -p` and `qshape` together. Counts and attempt rates
come from the queue file. Account health (backing off, AUTH failing) is known only to the
running server, which publishes each change into the queue file (relay/delivery/health.py); this
reads the latest, and says when no server is running to have published it.

``gather`` does the I/O; ``summarise`` (the ``--json`` document) and ``render`` (the text)
are pure. The JSON document's keys are stable:

    generated_at, queue                      when (UTC), and the queue file
    server.running                           a `relay serve` holds the queue's lock
    server.health_reported_at                when that server last reported a change, or null
    server.processes                         [{pid, role}]: role serve, supervisor, worker N
    accounts.NAME.queue.STATE                messages per state (every MessageState)
    accounts.NAME.undelivered                queued + deferred + sending
    accounts.NAME.oldest_undelivered_age_s   seconds, or null
    accounts.NAME.attempts.WINDOW.OUTCOME    WINDOW last_minute | last_hour,
                                             OUTCOME delivered | deferred | failed | partial
    accounts.NAME.health.state               one of HEALTH_STATES
    accounts.NAME.health.backoff_until       UTC time while backing off, else null
    accounts.NAME.health.backoff_left_s      seconds to it, else null
    accounts.NAME.health.failures            account-wide failures in a row
    accounts.NAME.health.last_error          the upstream's reply to the last of them
    accounts.NAME.health.throttle_factor     1.0 at full speed, less after "slow down"
                                             replies (relay.delivery.throttle); null unknown
    accounts.NAME.paused_since               UTC time of `relay accounts pause NAME`, or null
    accounts.NAME.rate_limit.windows         [{window, used, limit, remaining, next_slot_at}]
                                             per configured window (next_slot_at: UTC
                                             time that window next has room, null: now)
    accounts.NAME.rate_limit.next_send_at    UTC time the limits next allow a send, or null (now)
                                             (with rate_limit.reserve_for_high: of high
                                             priority; then also normal_next_send_at, and
                                             normal_limit, normal_remaining,
                                             normal_next_slot_at per window: normal and low
                                             priority's share)
    totals.queue, totals.undelivered, totals.attempts   the same, over all accounts
    oldest_undelivered                       null, or id, account, state, created_at, age_s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.cli.common import (
    EXIT_OK,
    iso,
    load,
    lock_path,
    open_queue,
    process_alive,
    server_running,
)
from relay.config.report import queue_name
from relay.config.schema import Config
from relay.delivery.health import AccountHealth, HealthReport, decode
from relay.delivery.host import decode_reason
from relay.delivery.ratelimit import share_for_others
from relay.printable import escape
from relay.queue.store import QueueStore
from relay.queue.types import MessageState, QueuedMessage

S = MessageState
STATES = [str(s) for s in MessageState]
# Waiting to be delivered, as relay_oldest_message_age_seconds counts them; a held
# message was put aside by an operator and is counted but not "oldest".
UNDELIVERED = (S.QUEUED, S.DEFERRED, S.SENDING)
OUTCOMES = ("delivered", "deferred", "failed", "partial")  # AttemptResult.outcome
WINDOWS = (("last_minute", 60.0), ("last_hour", 3600.0))
HEALTH_STATES = ("ok", "backing_off", "probing", "auth_failing", "unknown", "not_configured")


@dataclass(frozen=True)
class Snapshot:
    """Everything `relay status` shows, as read at ``now``."""

    now: float
    queue: str
    configured: Sequence[str]  # account names in config order
    counts: Mapping[tuple[str, str], int]  # (account, state) -> messages
    oldest_by_account: Mapping[str, float]  # account -> created_at of its oldest undelivered
    oldest: QueuedMessage | None  # the oldest undelivered message of all
    attempts: Mapping[str, Mapping[tuple[str, str], int]]  # window -> (account, outcome) -> n
    server_running: bool
    health: HealthReport | None  # None: no report from the server that is running now
    flush_at: float | None = None  # the last `relay queue flush`
    paused: Mapping[str, float] = field(default_factory=dict)  # account -> paused at
    # account -> ((key, window seconds, limit), ...) and its send times within the longest
    limits: Mapping[str, Sequence[tuple[str, float, int]]] = field(default_factory=dict)
    sends: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # account -> rate_limit.reserve_for_high, where it keeps a share for high priority
    reserves: Mapping[str, float] = field(default_factory=dict)
    processes: Sequence[tuple[int, str]] = ()  # (pid, role) of the relay processes on it
    # account -> (until, reason): backoffs the workers of `relay serve --workers N` share
    backoffs: Mapping[str, tuple[float, str]] = field(default_factory=dict)


def _shared_health(snap: Snapshot, name: str, h: AccountHealth | None,
                   result: dict[str, Any]) -> dict[str, Any]:
    """With several workers the queue's shared backoff is the account's state (each
    worker's report says only what that worker saw last); the report adds the detail."""
    shared = snap.backoffs.get(name)
    if shared is None:
        return result
    until, why, failures = decode_reason(*shared)
    waiting = snap.now < until
    state = "auth_failing" if why == "auth" else "backing_off" if waiting else "probing"
    return {**result, "state": state, "backoff_until": _iso(until) if waiting else None,
            "backoff_left_s": round(until - snap.now, 3) if waiting else None,
            "failures": max(h.failures if h else 0, failures),
            "last_error": h.last_error if h and h.last_error else why}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def account_health(snap: Snapshot, name: str) -> dict[str, Any]:
    """One account's health: state (one of HEALTH_STATES), its backoff, failures, error."""
    result: dict[str, Any] = {"state": "ok", "backoff_until": None, "backoff_left_s": None,
                              "failures": 0, "last_error": "", "throttle_factor": 1.0}
    if name not in snap.configured:
        return {**result, "state": "not_configured", "throttle_factor": None}
    if not snap.server_running:
        return {**result, "state": "unknown", "throttle_factor": None}
    h: AccountHealth | None = snap.health.accounts.get(name) if snap.health else None
    if h is not None:
        result["throttle_factor"] = h.throttle
    if any(role.startswith("worker ") for _, role in snap.processes):
        return _shared_health(snap, name, h, result)
    if h is None or h.failures == 0:
        return result
    assert snap.health is not None
    flushed = snap.flush_at is not None and snap.flush_at > snap.health.published_at
    waiting = snap.now < h.backoff_until and not flushed
    state = "auth_failing" if h.auth else "backing_off" if waiting else "probing"
    return {"state": state, "backoff_until": _iso(h.backoff_until) if waiting else None,
            "backoff_left_s": round(h.backoff_until - snap.now, 3) if waiting else None,
            "failures": h.failures, "last_error": h.last_error, "throttle_factor": h.throttle}


def _accounts(snap: Snapshot) -> list[str]:
    seen = {a for a, _ in snap.counts} | {a for w in snap.attempts.values() for a, _ in w}
    return [*snap.configured, *sorted(seen - set(snap.configured))]


def _attempts(snap: Snapshot, accounts: Sequence[str]) -> dict[str, dict[str, int]]:
    return {window: {o: sum(snap.attempts.get(window, {}).get((a, o), 0) for a in accounts)
                     for o in OUTCOMES}
            for window, _ in WINDOWS}


WINDOW_NAMES = {1.0: "per_second", 60.0: "per_minute", 3600.0: "per_hour",
                86400.0: "per_day"}


def rate_use(limits: Sequence[tuple[float, int] | tuple[str, float, int]],
             sends: Sequence[float], now: float, reserve_for_high: float = 0.0
             ) -> dict[str, Any]:
    """How much of each rate window the recorded sends use, what is left, and when the
    next send may go: the moment enough sends leave every full window (sliding windows,
    as the limiter counts them). ``limits``: (seconds, limit), or (key, seconds, limit).

    With ``reserve_for_high``, normal and low priority may use only each window's
    ``share_for_others``: their own remaining and next slot are given beside the totals
    (``normal_*``), since the reserve holds them while high priority may still send."""
    windows, next_at, normal_at = [], None, None
    ordered = sorted(sends)
    for item in limits:
        name, length, limit = item if len(item) == 3 else (None, *item)
        inside = [t for t in ordered if t > now - length]
        free_at = _free_at(inside, limit, length)
        window = {"window": name or WINDOW_NAMES.get(length, f"{length:g}s"),
                  "used": len(inside), "limit": limit,
                  "remaining": max(limit - len(inside), 0),
                  "next_slot_at": _iso(free_at)}
        if free_at is not None:
            next_at = free_at if next_at is None else max(next_at, free_at)
        if reserve_for_high > 0:
            share = share_for_others(limit, reserve_for_high)
            normal_free = _free_at(inside, share, length)
            window |= {"normal_limit": share, "normal_remaining": max(share - len(inside), 0),
                       "normal_next_slot_at": _iso(normal_free)}
            if normal_free is not None:
                normal_at = normal_free if normal_at is None else max(normal_at, normal_free)
        windows.append(window)
    use: dict[str, Any] = {"windows": windows, "next_send_at": _iso(next_at)}
    if reserve_for_high > 0:
        use["normal_next_send_at"] = _iso(normal_at)
    return use


def _free_at(inside: Sequence[float], limit: int, length: float) -> float | None:
    """When a window holding the sorted send times ``inside`` next has room under
    ``limit`` (None: it has room now)."""
    return inside[len(inside) - limit] + length if len(inside) >= limit else None


def summarise(snap: Snapshot) -> dict[str, Any]:
    """The `relay status --json` document (its keys: the module's docstring)."""
    accounts: dict[str, Any] = {}
    for name in _accounts(snap):
        queue = {s: snap.counts.get((name, s), 0) for s in STATES}
        created = snap.oldest_by_account.get(name)
        accounts[name] = {
            "queue": queue,
            "undelivered": sum(queue[str(s)] for s in UNDELIVERED),
            "oldest_undelivered_age_s": None if created is None else round(snap.now - created, 3),
            "attempts": _attempts(snap, [name]),
            "health": account_health(snap, name),
            "paused_since": _iso(snap.paused.get(name)),
            "rate_limit": rate_use(snap.limits.get(name, ()), snap.sends.get(name, ()),
                                   snap.now, snap.reserves.get(name, 0.0)),
        }
    totals = {s: sum(a["queue"][s] for a in accounts.values()) for s in STATES}
    oldest = snap.oldest
    return {
        "generated_at": _iso(snap.now),
        "queue": snap.queue,
        "server": {
            "running": snap.server_running,
            "processes": [{"pid": pid, "role": role} for pid, role in snap.processes],
            "health_reported_at": _iso(snap.health.published_at) if snap.health else None,
        },
        "accounts": accounts,
        "totals": {
            "queue": totals,
            "undelivered": sum(totals[str(s)] for s in UNDELIVERED),
            "attempts": _attempts(snap, list(accounts)),
        },
        "oldest_undelivered": None if oldest is None else {
            "id": oldest.id, "account": oldest.account, "state": str(oldest.state),
            "created_at": _iso(oldest.created_at),
            "age_s": round(snap.now - oldest.created_at, 3),
        },
    }


# -- text ---------------------------------------------------------------------------------
def age(seconds: float) -> str:
    """A short, rounded duration: 45s, 12m, 3h 12m, 2d 4h."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


_WIDTH = {s: max(len(s), 6) + 1 for s in STATES}
_SHORT = {"delivered": "DLVD", "deferred": "DEFR", "failed": "FAIL", "partial": "PART"}


def _queue_lines(summary: dict[str, Any]) -> list[str]:
    head = "".join(f"{s.upper():>{_WIDTH[s]}}" for s in STATES)
    lines = [f"{'QUEUE':<14}{head}{'OLDEST':>9}"]
    rows = [(n, a["queue"], a["oldest_undelivered_age_s"]) for n, a in summary["accounts"].items()]
    ages = [r[2] for r in rows if r[2] is not None]
    rows.append(("total", summary["totals"]["queue"], max(ages, default=None)))
    for name, queue, oldest_s in rows:
        cells = "".join(f"{queue[s]:>{_WIDTH[s]}}" for s in STATES)
        lines.append(f"{name:<14}{cells}{'-' if oldest_s is None else age(oldest_s):>9}")
    oldest = summary["oldest_undelivered"]
    if oldest:
        lines.append(f"oldest undelivered: {oldest['id']} ({oldest['account']},"
                     f" {oldest['state']}), {age(oldest['age_s'])} old")
    else:
        lines.append("nothing waiting to be delivered")
    return lines


def _attempt_cells(counts: dict[str, int]) -> str:
    tried = sum(counts.values())
    errors = counts["deferred"] + counts["failed"]
    share = f"{100 * errors / tried:.0f}%" if tried else "-"
    return "".join(f"{counts[o]:>6}" for o in OUTCOMES) + f"{share:>6}"


def _attempt_lines(summary: dict[str, Any]) -> list[str]:
    names = "".join(f"{_SHORT[o]:>6}" for o in OUTCOMES) + f"{'ERR%':>6}"
    lines = [f"{'ATTEMPTS':<14}{' last minute ':-^30}  {' last hour ':-^30}",
             f"{'':<14}{names}  {names}"]
    rows = [(n, a["attempts"]) for n, a in summary["accounts"].items()]
    rows.append(("total", summary["totals"]["attempts"]))
    for name, windows in rows:
        cells = "  ".join(_attempt_cells(windows[w]) for w, _ in WINDOWS)
        lines.append(f"{name:<14}{cells}")
    lines.append("DLVD delivered, DEFR deferred, FAIL failed, PART partly delivered or refused;")
    lines.append("ERR% deferred and failed as a share of all attempts")
    return lines


def _health_text(h: dict[str, Any]) -> str:
    throttle = h.get("throttle_factor")
    slowed = (f"; slowed to {throttle:.0%} of its rate and connections (the upstream asked)"
              if throttle is not None and throttle < 1 else "")
    return _state_text(h) + slowed


def _state_text(h: dict[str, Any]) -> str:
    state = h["state"]
    if state == "ok":
        return "ok"
    if state == "not_configured":
        return "not in the config; its messages wait until it is back"
    if state == "unknown":
        return "unknown"
    if h["backoff_until"] is not None:
        wait = f"backing off until {h['backoff_until']} (in {age(h['backoff_left_s'])})"
    else:
        wait = "backoff over, sending one message at a time to test it"
    what = "AUTH failing" if state == "auth_failing" else "failing"
    return f"{what} ({h['failures']} in a row): {h['last_error']}; {wait}"


def _health_lines(summary: dict[str, Any], lock: str) -> list[str]:
    server = summary["server"]
    if not server["running"]:
        return ["account health: unknown, as relay serve is not running",
                f"  (nothing holds the queue's lock {lock})"]
    workers = [p for p in server["processes"] if p["role"].startswith("worker")]
    pre = [f"workers: {len(workers)} ("
           + ", ".join(f"{p['role']} pid {p['pid']}" for p in workers) + ")"] if workers else []
    if server["health_reported_at"]:
        head = f"account health, as reported by the running server at" \
               f" {server['health_reported_at']}:"
    else:
        head = "account health (the running server has reported no backoff since it started):"
    # "ok" alone for a paused account would read as "it sends" at a glance.
    return [*pre, head] + [f"  {name:<14}{_health_text(a['health'])}"
                           + ("; paused: nothing is sent" if a["paused_since"] else "")
                           for name, a in summary["accounts"].items()]


def _rate_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for name, account in summary["accounts"].items():
        rate = account["rate_limit"]
        if not rate["windows"]:
            continue
        used = ", ".join(f"{w['used']}/{w['limit']} {w['window'].replace('_', ' ')}"
                         for w in rate["windows"])
        at = rate["next_send_at"]
        text = f"  {name:<14}{used}; next send: {'now' if at is None else at}"
        normal = rate.get("normal_next_send_at")
        if normal is not None and normal != at:  # the reserve holds normal mail longer
            text += f" (high priority); normal and low: {normal}, the rest is reserved"
        lines.append(text)
    if not lines:
        return []
    return ["rate limits (sends recorded in the queue file):", *lines, ""]


def _paused_lines(summary: dict[str, Any]) -> list[str]:
    paused = {n: a["paused_since"] for n, a in summary["accounts"].items() if a["paused_since"]}
    if not paused:
        return []
    return ["paused (new mail is queued, nothing is sent):"] + [
        f"  {name:<14}since {since}; `relay accounts resume {name}`"
        for name, since in paused.items()] + [""]


def render(summary: dict[str, Any]) -> str:
    """The text of `relay status`, from the ``summarise`` document."""
    queue = summary["queue"]
    lines = [f"relay status of {queue} at {summary['generated_at']}", "",
             *_queue_lines(summary), "", *_attempt_lines(summary), "",
             *_rate_lines(summary),
             *_paused_lines(summary),
             *_health_lines(summary, str(lock_path(Path(queue))))]
    # One escape per line, as cli.out: last errors come from upstreams.
    return "\n".join(escape(line) for line in lines) + "\n"


# -- I/O ----------------------------------------------------------------------------------
def rate_limits(config: Config) -> dict[str, list[tuple[str, float, int]]]:
    """Each rate-limited account's windows: (key, seconds, limit)."""
    return {name: acc.rate_limit.named_windows() for name, acc in config.accounts.items()
            if acc.rate_limit.windows()}


async def recent_sends(store: QueueStore, limits: dict[str, list[tuple[str, float, int]]],
                       now: float) -> dict[str, list[float]]:
    """The send times recorded in each account's longest window, by every process."""
    return {name: await store.recent_sends(name, now - max(w for _, w, _ in wins))
            for name, wins in limits.items()}


async def gather(config: Config, now: float) -> Snapshot:
    shared = config.queue.url is not None  # PostgreSQL: relays on any host, no lock file
    running = not shared and server_running(config.queue.path)
    store = await open_queue(config)
    try:
        processes = await store.processes()  # one read: the snapshot and `running` agree
        if shared:
            running = any(role == "serve" or role.startswith("worker ")
                          for _, role in processes)
        firsts = [m for s in UNDELIVERED
                  for m in await store.list_messages(state=str(s), limit=1)]
        accounts = [*config.accounts, *config.routing.groups]  # a group's mail is its own
        attempts = {w: await store.attempt_counts(accounts, now - span) for w, span in WINDOWS}
        report = decode(await store.read_health())
        flush = await store.flush_requested()
        limits = rate_limits(config)
        snap = Snapshot(
            now=now, queue=queue_name(config),
            configured=accounts,
            counts=await store.counts(), oldest_by_account=await store.oldest_ready(),
            oldest=min(firsts, key=lambda m: m.created_at, default=None),
            attempts=attempts, server_running=running,
            # A report from a process that is gone is from an earlier run of the server.
            # (A pid says nothing across hosts: there the report's publisher is live if
            # any relay is, and the next report replaces it.)
            health=report if running and report and (shared or process_alive(report.pid))
            else None,
            flush_at=float(flush) if flush else None,
            paused=await store.paused_accounts(),
            limits=limits,
            reserves={name: config.accounts[name].rate_limit.reserve_for_high
                      for name in limits},
            sends=await recent_sends(store, limits, now),
            processes=processes,
            backoffs=await store.backoffs(),
        )
    finally:
        await store.close()
    return snap


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    now = time.time()
    summary = summarise(asyncio.run(gather(config, now)))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render(summary), end="")
    return EXIT_OK


def add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common],
                       help="the queue by account and state, recent attempts, account health")
    p.add_argument("--json", action="store_true", help="one JSON document with stable keys")
    p.set_defaults(func=cmd_status, needs_secrets=False)
