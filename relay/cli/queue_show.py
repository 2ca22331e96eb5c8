"""`relay queue show` (one message: envelope, why it waits, its bytes) and `relay queue
summary` (what waits, by account or recipient domain and age, like Postfix's qshape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from relay.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    fail,
    iso,
    load,
    open_queue,
    out,
    process_alive,
)
from relay.config.schema import Config
from relay.delivery.health import decode
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.waiting import Reason, next_attempt, why_waiting
from relay.queue.types import MessageState, Priority, QueuedMessage
from relay.smtp.headers import header_end, parse_headers

# qshape's buckets (minutes, doubling): 0-5m, 5-10m, 10-20m, 20-40m, 40-80m, 80m+.
AGE_BOUNDS_S = (300.0, 600.0, 1200.0, 2400.0, 4800.0)
AGE_LABELS = ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80m+")


def as_dict(m: QueuedMessage) -> dict[str, Any]:
    """A message as `relay queue list --json` and `show --json` give it."""
    return {
        "id": m.id,
        "state": str(m.state),
        "account": m.account,
        "priority": m.priority.name.lower(),
        "sender": m.sender,
        "recipients": [
            {"address": r.address, "state": str(r.state), "reply": r.reply} for r in m.recipients
        ],
        "size": m.size,
        "attempts": m.attempts,
        "next_attempt_at": iso(m.next_attempt_at),
        "last_error": m.last_error,
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
    }


@dataclass(frozen=True)
class Shown:
    message: QueuedMessage | None
    body: bytes | None
    reasons: list[Reason]


async def _read(config: Config, message_id: str, now: float) -> Shown:
    store = await open_queue(config)
    try:
        message = await store.get(message_id)
        if message is None:
            return Shown(None, None, [])
        body = await store.body_if_kept(message_id)
        backoff = None
        report = decode(await store.read_health())
        health = report.accounts.get(message.account) if report else None
        if health is not None and health.failures and report and process_alive(report.pid):
            flush = await store.flush_requested()  # a flush ends a backoff
            if not (flush and report and float(flush) > report.published_at):
                backoff = health.backoff_until
        rate_wait, reserved = 0.0, False
        account = config.accounts.get(message.account)
        if account is not None and account.rate_limit.windows():
            limiter = RateLimiter(account.rate_limit.windows(),
                                  account.rate_limit.reserve_for_high)
            limiter.restore(await store.recent_sends(message.account,
                                                     now - limiter.longest_window), now)
            # Normal and low priority wait for their share (rate_limit.reserve_for_high).
            others = message.priority is not Priority.HIGH
            rate_wait = limiter.wait_time(now, others=others)
            reserved = others and rate_wait > limiter.wait_time(now)
        reasons = why_waiting(message.state, message.attempts, message.created_at,
                              message.next_attempt_at, now, backoff_until=backoff,
                              rate_wait_s=rate_wait, reserved=reserved,
                              last_error=message.last_error,
                              paused=message.account in await store.paused_accounts(),
                              sync_hold_s=config.sync_hold(message.account))
        return Shown(message, body, reasons)
    finally:
        await store.close()


def _body_gone(m: QueuedMessage) -> str:
    if m.state is MessageState.DELIVERED:
        return f"{m.id} was delivered; relay does not keep a delivered message's body"
    return f"the body of {m.id} is no longer kept"


def cmd_show(args: argparse.Namespace) -> int:
    now = time.time()
    shown = asyncio.run(_read(load(args), args.id, now))
    message, body = shown.message, shown.body
    if message is None:
        return fail(f"no message {args.id} in the queue")
    if args.raw or args.headers:
        if body is None:
            return fail(_body_gone(message), EXIT_FAILURE)
        return _write_raw(body[: header_end(body)] if args.headers else body)
    data = as_dict(message)
    data["headers"] = [[k, v] for k, v in parse_headers(body)] if body is not None else None
    data["body_kept"] = body is not None
    # The SMTP conversations only when asked for (--transcript): they are long.
    data["attempt_log"] = [
        {**{k: v for k, v in a.items() if k != "transcript" or args.transcript},
         "at": iso(float(str(a["at"])))} for a in message.attempts_log
    ]
    then = next_attempt(shown.reasons, message.next_attempt_at, now)
    data["waiting"] = None if message.state.final else {
        "reasons": [{"kind": r.kind, "until": iso(r.until) if r.until else None,
                     "text": r.text} for r in shown.reasons],
        "next_attempt": iso(then) if then is not None else None,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for key in ("id", "state", "account", "priority", "sender", "size", "attempts",
                "created_at", "next_attempt_at", "last_error"):
        out(f"{key + ':':<17}{data[key]}")
    if not message.state.final:
        _print_waiting(shown.reasons, then, now)
    out("recipients:")
    for r in data["recipients"]:
        out(f"  <{r['address']}> {r['state']} {r['reply']}".rstrip())
    if body is None:
        out(f"headers:         (body not kept: {_body_gone(message)})")
    else:
        out("headers:")
    for k, v in data["headers"] or []:
        out(f"  {k}: {v}")
    out("attempts:")
    for a in data["attempt_log"]:
        out(f"  {a['at']} {a['account']} {a['outcome']}: {a['reply']}")
        if args.transcript:
            _print_transcript(a.get("transcript") or [])
    return EXIT_OK


def _print_transcript(lines: list[str]) -> None:
    """One attempt's SMTP conversation (C: relay, S: the upstream), indented under it."""
    if not lines:
        out("      (no transcript: not an SMTP attempt, or made before relay kept them)")
    for line in lines:
        out(f"      {line}")


def _write_raw(data: bytes) -> int:
    if sys.stdout.isatty():
        # Read on a terminal: one escaped line per line, so an ESC sequence in the
        # message cannot drive the operator's terminal.
        text = data.decode("utf-8", "backslashreplace")
        out(*(line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")))
        return EXIT_OK
    # To a file or a pipe, the exact bytes: what the upstream receives (control headers
    # were removed on arrival), binary-safe.
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _print_waiting(reasons: list[Reason], then: float | None, now: float) -> None:
    if not reasons:
        out("waiting:         no: due now, the next free worker takes it")
        return
    for i, r in enumerate(reasons):
        until = f" until {iso(r.until)} (in {_left(r.until - now)})" if r.until else ""
        out(f"{'waiting:' if i == 0 else '':<17}{r.kind}: {r.text}{until}")
    out(f"{'next attempt:':<17}"
        + (f"{iso(then)} (in {_left(then - now)})" if then is not None
           else "when an operator or the send under way acts"))


def _left(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def shape(cells: dict[tuple[str, int], int]) -> list[tuple[str, list[int]]]:
    """Rows (key, count per age bucket), the most waiting first, then by name."""
    keys = {k for k, _ in cells}
    rows = [(k, [cells.get((k, i), 0) for i in range(len(AGE_LABELS))]) for k in keys]
    return sorted(rows, key=lambda row: (-sum(row[1]), row[0]))


def cmd_summary(args: argparse.Namespace) -> int:
    async def run() -> dict[tuple[str, int], int]:
        store = await open_queue(load(args))
        try:
            return await store.waiting_by_age(args.by, time.time(), AGE_BOUNDS_S)
        finally:
            await store.close()

    rows = shape(asyncio.run(run()))
    totals = [sum(counts[i] for _, counts in rows) for i in range(len(AGE_LABELS))]
    if args.json:
        print(json.dumps({
            "by": args.by, "buckets": list(AGE_LABELS),
            "total": {"total": sum(totals), **dict(zip(AGE_LABELS, totals, strict=True))},
            "rows": [{args.by: key, "total": sum(counts),
                      **dict(zip(AGE_LABELS, counts, strict=True))} for key, counts in rows],
        }, indent=2))
        return EXIT_OK
    width = max([len(args.by), 5, *(len(k) for k, _ in rows)])
    out(f"{args.by.upper():<{width}} {'TOTAL':>7}" + "".join(f" {b:>7}" for b in AGE_LABELS))
    out(f"{'total':<{width}} {sum(totals):>7}" + "".join(f" {n:>7}" for n in totals))
    for key, counts in rows:
        out(f"{key:<{width}} {sum(counts):>7}" + "".join(f" {n:>7}" for n in counts))
    return EXIT_OK


def add_commands(qsub: Any, common: argparse.ArgumentParser) -> None:
    p = qsub.add_parser("show", parents=[common],
                        help="one message: envelope, why it waits, headers, attempts")
    p.add_argument("id", metavar="ID", help="the queue ID (from `relay queue list`)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="as one JSON document")
    form.add_argument("--raw", action="store_true",
                      help="write the message's exact bytes (as they would be sent) to stdout")
    form.add_argument("--headers", action="store_true",
                      help="write only its header section, as bytes, to stdout")
    p.add_argument("--transcript", action="store_true",
                   help="with each attempt, the SMTP conversation with the upstream"
                   " (AUTH masked, no message body)")
    p.set_defaults(func=cmd_show)
    p = qsub.add_parser("summary", parents=[common],
                        help="messages waiting, by account or recipient domain and age (qshape)")
    p.add_argument("--by", choices=["account", "domain"], default="account",
                   help="rows per account (default) or per pending recipient's domain")
    p.add_argument("--json", action="store_true", help="as one JSON document")
    p.set_defaults(func=cmd_summary)
