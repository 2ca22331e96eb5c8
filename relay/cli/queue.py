"""`relay queue ...` and `relay accounts test`: operate on the queue file directly.

These run in their own process beside `relay serve`; the server notices the changes
(SQLite's data_version) within a second. Operations over many messages are set-based
statements in windows (QueueStore.update_messages / delete_messages): bodies are never
loaded, and 100,000 messages take seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail, load, out, queue_of
from relay.cli.progress import ProgressBar
from relay.config.durations import format_duration, parse_duration, parse_since
from relay.config.schema import AccountConfig, effective_hostname
from relay.queue.ops import (
    DELETE,
    DELETE_FORCED,
    FLUSH,
    HOLD,
    PURGE,
    RELEASE,
    RETRY,
    RETRY_ALL,
    RETRY_FAILED,
    Operation,
    refusal,
)
from relay.queue.store import Progress, QueueStore
from relay.queue.types import MessageState, QueuedMessage
from relay.smtp.headers import parse_headers

STATES = [str(s) for s in MessageState]
DONE = {"hold": "held", "release": "released, due now", "retry": "queued, due now",
        "delete": "deleted"}


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


async def _apply(
    store: QueueStore,
    op: Operation,
    *,
    ids: Sequence[str] = (),
    updated_before: float | None = None,
    account: str | None = None,
    updated_since: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Carry out ``op`` on ``ids`` (or on every message in its states); count the changed."""
    if op.target is None:
        return await store.delete_messages(
            states=op.states, ids=ids, updated_before=updated_before, progress=progress
        )
    assert updated_before is None
    return await store.update_messages(
        states=op.states, to_state=str(op.target), now=time.time(), ids=ids,
        due_now=op.due_now, reset_failed=op.reset_failed, needs_body=op.needs_body,
        account=account, updated_since=updated_since, progress=progress,
    )


def _each(args: argparse.Namespace, op: Operation) -> int:
    """``op`` on each ID named; one line per message, refusals on stderr."""

    async def run() -> int:
        refused = 0
        async with queue_of(args) as store:
            for message_id in dict.fromkeys(args.ids):
                if await _apply(store, op, ids=[message_id]):
                    out(f"{message_id}: {DONE[op.name]}")
                else:
                    refused += 1
                    fail(refusal(op, message_id, await store.state_of(message_id)))
        return EXIT_FAILURE if refused else EXIT_OK

    return asyncio.run(run())


async def _with_progress(
    store: QueueStore, op: Operation, updated_before: float | None = None, **filters: Any
) -> int:
    """``op`` on every message in its states, with a progress bar on a terminal."""
    bar = ProgressBar(op.name, None)
    # Counted only for a bar; purge's "old enough" is not counted beforehand (no total).
    if bar.enabled and updated_before is None:
        counts = await store.counts()
        bar.total = sum(n for (_, state), n in counts.items() if state in op.states)
    with bar:
        return await _apply(store, op, updated_before=updated_before, progress=bar, **filters)


def _bulk(args: argparse.Namespace, op: Operation, updated_before: float | None = None) -> int:
    async def run() -> int:
        async with queue_of(args) as store:
            return await _with_progress(store, op, updated_before)

    return asyncio.run(run())


def cmd_list(args: argparse.Namespace) -> int:
    async def run() -> list[QueuedMessage]:
        async with queue_of(args) as store:
            return await store.list_messages(state=args.state, account=args.account)

    messages = asyncio.run(run())
    if args.json:
        print(json.dumps([_as_dict(m) for m in messages], indent=2))
        return EXIT_OK
    if not messages:
        out("queue is empty")
        return EXIT_OK
    out(f"{'ID':<20} {'STATE':<9} {'ACCOUNT':<12} {'PRIO':<6} {'TRIES':>5} "
          f"{'CREATED':<20} SENDER -> RECIPIENTS")
    for m in messages:
        rcpts = ", ".join(r.address for r in m.recipients)
        out(f"{m.id:<20} {m.state!s:<9} {m.account:<12} {m.priority.name.lower():<6} "
              f"{m.attempts:>5} {_iso(m.created_at):<20} <{m.sender}> -> {rcpts}")
        if m.last_error:
            out(f"{'':<20} last error: {m.last_error}")
    out(f"-- {len(messages)} message(s)")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    async def run() -> tuple[QueuedMessage | None, bytes | None]:
        async with queue_of(args) as store:
            return await store.get(args.id), await store.body_if_kept(args.id)

    message, body = asyncio.run(run())
    if message is None:
        return fail(f"no message {args.id} in the queue")
    data = _as_dict(message)
    data["headers"] = [[k, v] for k, v in parse_headers(body)] if body is not None else None
    data["attempt_log"] = [
        {**a, "at": _iso(float(str(a["at"])))} for a in message.attempts_log
    ]
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for key in ("id", "state", "account", "priority", "sender", "size", "attempts",
                "created_at", "next_attempt_at", "last_error"):
        out(f"{key + ':':<17}{data[key]}")
    out("recipients:")
    for r in data["recipients"]:
        out(f"  <{r['address']}> {r['state']} {r['reply']}".rstrip())
    out("headers:" if body is not None else "headers:        (body no longer kept)")
    for k, v in data["headers"] or []:
        out(f"  {k}: {v}")
    out("attempts:")
    for a in data["attempt_log"]:
        out(f"  {a['at']} {a['account']} {a['outcome']}: {a['reply']}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    bulk = args.all or args.state is not None
    if bool(args.ids) == bulk:
        return fail("queue retry: give message IDs, --all or --state (one of them)",
                     EXIT_USAGE)
    if args.ids:
        if args.account or args.since:
            return fail("queue retry: --account and --since go with --all or --state",
                         EXIT_USAGE)
        return _each(args, RETRY)
    since = None
    if args.since:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            return fail(f"queue retry: --since {exc}", EXIT_USAGE)
    op = RETRY_FAILED if args.state == "failed" else RETRY_ALL
    state = "failed" if op is RETRY_FAILED else "deferred"

    async def run() -> int:
        async with queue_of(args) as store:
            return await _with_progress(store, op, account=args.account, updated_since=since)

    count = asyncio.run(run())
    if not count:
        return fail(f"no {state} messages to retry")
    out(f"{count} {state} message(s) queued, due now")
    return EXIT_OK


def cmd_flush(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with queue_of(args) as store:
            count = await _with_progress(store, FLUSH)
            # Written last: the server sees it and ends account-wide backoffs too.
            await store.request_flush(time.time())
            return count

    count = asyncio.run(run())
    out(f"{count} deferred message(s) due now; accounts backing off resume")
    return EXIT_OK


def cmd_hold(args: argparse.Namespace) -> int:
    return _each(args, HOLD)


def cmd_release(args: argparse.Namespace) -> int:
    return _each(args, RELEASE)


def cmd_delete(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.state):
        return fail("queue delete: give message IDs or --state (one of them)", EXIT_USAGE)
    op = DELETE_FORCED if args.force else DELETE
    if args.ids:
        return _each(args, op)
    if args.state == MessageState.SENDING and not args.force:
        return fail("not deleting 'sending' messages: workers are delivering them right now"
                     " and deleting the rows cannot stop those sends, so they may still"
                     " arrive; wait for the attempts to finish, or use --force")
    count = _bulk(args, Operation("delete", frozenset({MessageState(args.state)}), None))
    if not count:
        return fail(f"no {args.state} messages to delete")
    out(f"deleted {count} {args.state} message(s)")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    try:
        age = parse_duration(args.older_than)
    except ValueError as exc:
        return fail(f"queue purge: --older-than {exc}", EXIT_USAGE)
    count = _bulk(args, PURGE, updated_before=time.time() - age)
    out(f"purged {count} delivered/failed record(s) older than {format_duration(age)}")
    return EXIT_OK


# -- accounts test ----------------------------------------------------------------------
Step = tuple[str, bool | None, str]  # name, ok (None: not tried), what happened


def smtp_steps(account: AccountConfig, peer: str, checked: list[tuple[str, str]]) -> list[Step]:
    """UpstreamPool.check() as connect, tls, auth, noop: each ok, failed or not tried."""
    if checked and checked[0][0] == "connect":
        return [(name, name != "noop" or text.startswith("ok"), text) for name, text in checked]
    failed_step, reason = checked[0] if checked else ("connect", "no result")
    tls = "ok" if account.tls != "none" else "off (tls: none)"
    if failed_step == "auth":  # AUTH comes after the connection and TLS succeeded
        reached = [("connect", True, f"ok ({peer})"), ("tls", True, tls)]
    elif "tls" in reason.lower():
        reached = [("connect", True, f"ok ({peer})")]
        failed_step = "tls"
    else:
        reached, failed_step = [], "connect"
    steps: list[Step] = [*reached, (failed_step, False, reason)]
    names = [s[0] for s in steps]
    return steps + [(n, None, "not tried") for n in ("connect", "tls", "auth", "noop")
                    if n not in names]


def maildir_steps(path: Path) -> list[Step]:
    """Is the Maildir there (or can it be made), and can a file be written in it?"""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("."))
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return [("directory", True, f"ok ({path} will be created in {parent})")]
        return [("directory", False, f"{path} is missing and {parent} is not a writable"
                 " directory")]
    if not path.is_dir():
        return [("directory", False, f"{path} is not a directory")]
    steps: list[Step] = [("directory", True, f"ok ({path})")]
    probe = (path / "tmp" if (path / "tmp").is_dir() else path) / f".relay-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [*steps, ("write", False, f"cannot write in {probe.parent}: {exc.strerror}")]
    return [*steps, ("write", True, "ok")]


async def _check_account(name: str, account: AccountConfig, hostname: str | None) -> list[Step]:
    if account.transport == "maildir":
        assert account.path is not None
        return maildir_steps(account.path)
    from relay.delivery.smtp.upstream import UpstreamPool

    pool = UpstreamPool(name, account, local_hostname=hostname)
    try:
        return smtp_steps(account, pool.peer, await pool.check())
    finally:
        await pool.close()


def cmd_accounts_test(args: argparse.Namespace) -> int:
    config = load(args)
    account = config.accounts.get(args.name)
    if account is None:
        return fail(f"no account named {args.name!r} (accounts: {', '.join(config.accounts)})")
    if account.transport == "maildir":
        out(f"account {args.name}: maildir {account.path}")
    else:  # never the password
        out(f"account {args.name}: smtp {account.host}:{account.effective_port}"
              f" tls={account.tls} user={account.username or '(none)'}")
    hostname = effective_hostname(config, socket.getfqdn())
    steps = asyncio.run(_check_account(args.name, account, hostname))
    for step, ok, text in steps:
        out(f"  {step + ':':<11}{text if ok is not False else 'FAILED: ' + text}")
    return EXIT_OK if all(ok for _, ok, _ in steps) else EXIT_FAILURE


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="inspect or act on the queue")
    queue.set_defaults(needs_secrets=False)  # the queue file only; no upstream passwords
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    p = qsub.add_parser("list", parents=[common],
                        help="list messages, including delivered/failed records not yet purged")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--account")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = qsub.add_parser("show", parents=[common], help="one message: envelope, headers, attempts")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = qsub.add_parser("retry", parents=[common],
                        help="make messages due now; a failed message is queued again")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every deferred message")
    p.add_argument("--state", choices=["deferred", "failed"],
                   help="every message in this state (failed: those whose body is kept)")
    p.add_argument("--account", help="with --all/--state: only this account's messages")
    p.add_argument("--since", metavar="WHEN",
                   help="with --all/--state: only those changed since (2h, 1d, or a UTC"
                        " time such as 2026-11-30T10:00:00Z)")
    p.set_defaults(func=cmd_retry)
    p = qsub.add_parser("flush", parents=[common],
                        help="every deferred message due now; backed-off accounts resume")
    p.set_defaults(func=cmd_flush)
    for name, func, text in (("hold", cmd_hold, "put queued/deferred messages aside"),
                             ("release", cmd_release, "queue held messages again, due now")):
        p = qsub.add_parser(name, parents=[common], help=text)
        p.add_argument("ids", nargs="+", metavar="ID")
        p.set_defaults(func=func)
    p = qsub.add_parser("delete", parents=[common],
                        help="remove messages with their bodies and attempts")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--state", choices=STATES, help="every message in this state")
    p.add_argument("--force", action="store_true",
                   help="also messages being delivered right now")
    p.set_defaults(func=cmd_delete)
    p = qsub.add_parser("purge", parents=[common],
                        help="delete delivered/failed records last changed before a time")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="e.g. 7d, 12h, 30m")
    p.set_defaults(func=cmd_purge)
    # Issue 20: backup/check (the file itself) and move, and the accounts group.
    from relay.cli import accounts, queuefile

    queuefile.add_commands(qsub, common)
    accounts.add_queue_commands(qsub, common)
    accounts.add_commands(sub, common, test=cmd_accounts_test)
