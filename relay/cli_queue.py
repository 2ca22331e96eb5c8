"""`relay queue ...` and `relay accounts test`: operate on the queue file directly.

These run in their own process beside `relay serve`; the server notices the changes
(SQLite's data_version) within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from relay.config import Config
from relay.headers import parse_headers
from relay.message import QueuedMessage
from relay.store import SQLiteStore


def _config(args: argparse.Namespace) -> Config:
    from relay.cli import _load

    return _load(args)


def _as_dict(m: QueuedMessage) -> dict[str, Any]:
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
        "next_attempt_at": _iso(m.next_attempt_at),
        "last_error": m.last_error,
        "created_at": _iso(m.created_at),
        "updated_at": _iso(m.updated_at),
    }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _open(config: Config) -> SQLiteStore:
    from relay.errors import StoreError

    if not config.queue.path.exists():
        raise StoreError(f"no queue at {config.queue.path} (has `relay serve` run here?)")
    store = SQLiteStore(config.queue.path, lock=False)
    await store.open()
    return store


def cmd_list(args: argparse.Namespace) -> int:
    async def run() -> list[QueuedMessage]:
        store = await _open(_config(args))
        try:
            return await store.list_messages(state=args.state, account=args.account)
        finally:
            await store.close()

    messages = asyncio.run(run())
    if args.json:
        print(json.dumps([_as_dict(m) for m in messages], indent=2))
        return 0
    if not messages:
        print("queue is empty")
        return 0
    print(f"{'ID':<20} {'STATE':<9} {'ACCOUNT':<12} {'PRIO':<6} {'TRIES':>5} "
          f"{'CREATED':<20} SENDER -> RECIPIENTS")
    for m in messages:
        rcpts = ", ".join(r.address for r in m.recipients)
        print(f"{m.id:<20} {m.state!s:<9} {m.account:<12} {m.priority.name.lower():<6} "
              f"{m.attempts:>5} {_iso(m.created_at):<20} <{m.sender}> -> {rcpts}")
        if m.last_error:
            print(f"{'':<20} last error: {m.last_error}")
    print(f"-- {len(messages)} message(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    async def run() -> tuple[QueuedMessage | None, bytes | None]:
        store = await _open(_config(args))
        try:
            return await store.get(args.id), await store.body_if_kept(args.id)
        finally:
            await store.close()

    message, body = asyncio.run(run())
    if message is None:
        print(f"relay: no message {args.id} in the queue", file=sys.stderr)
        return 1
    data = _as_dict(message)
    data["headers"] = [[k, v] for k, v in parse_headers(body)] if body is not None else None
    data["attempt_log"] = [
        {**a, "at": _iso(float(str(a["at"])))} for a in message.attempts_log
    ]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key in ("id", "state", "account", "priority", "sender", "size", "attempts",
                "created_at", "next_attempt_at", "last_error"):
        print(f"{key + ':':<17}{data[key]}")
    print("recipients:")
    for r in data["recipients"]:
        print(f"  <{r['address']}> {r['state']} {r['reply']}".rstrip())
    print("headers:" if body is not None else "headers:        (body no longer kept)")
    for k, v in data["headers"] or []:
        print(f"  {k}: {v}")
    print("attempts:")
    for a in data["attempt_log"]:
        print(f"  {a['at']} {a['account']} {a['outcome']}: {a['reply']}")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="inspect or act on the queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    p = qsub.add_parser("list", parents=[common], help="list messages")
    p.add_argument("--state", choices=["queued", "deferred", "sending", "held", "delivered",
                                       "failed"])
    p.add_argument("--account")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = qsub.add_parser("show", parents=[common], help="one message: envelope, headers, attempts")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
