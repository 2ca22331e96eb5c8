"""`relay queue list` and the actions (`retry`, `flush`, `hold`, `release`, `delete`,
`purge`), by ID or by the filters of relay/cli/filters.py; and `relay accounts test`.
`show` and `summary` are in queue_show.py.

These run in their own process beside `relay serve`; the server notices the changes
(SQLite's data_version) within a second. Operations over many messages are set-based
statements in windows (QueueStore.update_messages / delete_messages): bodies are never
loaded, and 100,000 messages take seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.cli import queue_show
from relay.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    config_path,
    fail,
    iso,
    out,
    queue_of,
)
from relay.cli.filters import STATES, add_filter_options, add_sort_options, message_filter
from relay.cli.progress import ProgressBar
from relay.cli.queue_show import as_dict
from relay.config.durations import format_duration, parse_duration
from relay.config.loading import load_config_report
from relay.config.report import unresolved_secrets
from relay.config.schema import AccountConfig, effective_hostname
from relay.errors import ConfigError
from relay.queue.filters import MessageFilter, SortKey
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
from relay.queue.store import OPERATOR_CHUNK, Progress, QueueStore
from relay.queue.types import MessageState, QueuedMessage

DONE = {"hold": "held", "release": "released, due now", "retry": "queued, due now",
        "delete": "deleted"}


async def _apply(
    store: QueueStore,
    op: Operation,
    *,
    ids: Sequence[str] = (),
    match: MessageFilter | None = None,
    progress: Progress | None = None,
) -> int:
    """Carry out ``op`` on ``ids`` (or on what ``match`` selects in its states); count
    the messages changed. A move prints a line per message moved: its record."""
    if op.to_account is not None:
        moved = await store.move_messages(
            to_account=op.to_account, states=op.states, now=time.time(), by="relay queue move",
            ids=ids, match=match, progress=progress)
        for message_id, source in moved:
            out(f"moved {message_id} from {source} to {op.to_account}")
        return len(moved)
    if op.target is None:
        return await store.delete_messages(
            states=op.states, ids=ids, match=match, progress=progress
        )
    return await store.update_messages(
        states=op.states, to_state=str(op.target), now=time.time(), ids=ids,
        due_now=op.due_now, reset_failed=op.reset_failed, needs_body=op.needs_body,
        match=match, progress=progress,
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


async def _with_progress(store: QueueStore, op: Operation, match: MessageFilter,
                         total: int | None = None, *, first: int | None = None,
                         sort: SortKey = SortKey.CREATED) -> int:
    """``op`` on what ``match`` selects (``first``: only the first so many in ``sort``
    order), with a progress bar when both stdout and stderr are terminals (never in a
    pipeline or a log)."""
    bar = ProgressBar(op.name, total)
    bar.enabled = bar.enabled and sys.stdout.isatty()
    with bar:
        if first is None:
            return await _apply(store, op, match=match, progress=bar)
        # Chosen once, then changed a window of IDs at a time: re-selecting "the first N"
        # per window would reach past N as changed messages leave the selection.
        chosen = [m.id async for m in store.iter_messages(match, sort=sort, limit=first)]
        done = 0
        for start in range(0, len(chosen), OPERATOR_CHUNK):
            done += await _apply(store, op, ids=chosen[start:start + OPERATOR_CHUNK],
                                 match=match)
            bar(done)
        return done


def _states_word(match: MessageFilter) -> str:
    """'deferred ' when the selection is of one state, else ''."""
    if match.states is not None and len(match.states) == 1:
        return f"{next(iter(match.states))} "
    return ""


def _confirm(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is no: n, end of input and Ctrl-C alike,
    so that every "not confirmed" ends the same way (exit 1, nothing changed)."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def bulk(args: argparse.Namespace, op: Operation, match: MessageFilter, done: str) -> int:
    """``op`` on every message ``match`` selects: count them, say so, confirm on a
    terminal (--yes skips it, --dry-run stops there), then report what changed."""
    match = match.within(op.sources)
    what = _states_word(match)

    async def count() -> int:
        async with queue_of(args) as store:
            return await store.count_messages(match, needs_body=op.needs_body)

    matched = asyncio.run(count())
    if args.limit is not None:
        matched = min(matched, args.limit)
    if not matched:
        return fail(f"no {what}messages to {op.name}")
    if getattr(args, "dry_run", False):
        out(f"would {op.name} {matched} {what}message(s)")
        return EXIT_OK
    ask = not getattr(args, "yes", False) and sys.stdin.isatty() and sys.stderr.isatty()
    if ask and not _confirm(f"{op.name} {matched} {what}message(s)?"):
        return fail("cancelled: nothing changed")

    async def run() -> int:
        async with queue_of(args) as store:
            return await _with_progress(store, op, match, matched, first=args.limit,
                                        sort=SortKey(args.sort))

    changed = asyncio.run(run())
    if not changed:  # all of them changed state meanwhile (the server claimed them)
        return fail(f"no {what}messages to {op.name}")
    out(done.format(n=changed, what=what))
    return EXIT_OK


def _filter_or_usage(args: argparse.Namespace, command: str) -> MessageFilter | int:
    """The filter the options name, or the exit code of a usage error (already printed)."""
    try:
        match = message_filter(args)
    except ValueError as exc:
        return fail(f"queue {command}: {exc}", EXIT_USAGE)
    chosen = getattr(args, "all", False) or match != MessageFilter()
    if bool(args.ids) == chosen:
        return fail(f"queue {command}: give message IDs, or --all or filters (one of them)",
                    EXIT_USAGE)
    return match


def cmd_list(args: argparse.Namespace) -> int:
    try:
        match = message_filter(args)
    except ValueError as exc:
        return fail(f"queue list: {exc}", EXIT_USAGE)
    mode = "jsonl" if args.jsonl else "json" if args.json else "text"

    async def run() -> int:
        shown = 0
        async with queue_of(args) as store, contextlib.aclosing(store.iter_messages(
                match, sort=SortKey(args.sort), limit=args.limit)) as rows:
            if mode == "json":  # one document, written as it is read
                sys.stdout.write("[")
            async for m in rows:
                if mode == "text" and not shown:
                    out(HEADER)
                shown += 1
                if mode == "jsonl":
                    sys.stdout.write(json.dumps(as_dict(m)) + "\n")
                elif mode == "json":
                    item = json.dumps(as_dict(m), indent=2).replace("\n", "\n  ")
                    sys.stdout.write(("," if shown > 1 else "") + "\n  " + item)
                else:
                    _print_row(m)
        if mode == "json":
            sys.stdout.write("\n]\n" if shown else "]\n")
        elif mode == "text":
            if shown:
                out(f"-- {shown} message(s)")
            else:
                out("queue is empty" if match == MessageFilter() else "no message matches")
        return EXIT_OK

    return asyncio.run(run())


# 22: a queue id's length (relay.queue.types.queue_id).
HEADER = (f"{'ID':<22} {'STATE':<9} {'ACCOUNT':<12} {'PRIO':<6} {'TRIES':>5} "
          f"{'CREATED':<20} SENDER -> RECIPIENTS")


def _print_row(m: QueuedMessage) -> None:
    rcpts = ", ".join(r.address for r in m.recipients)
    out(f"{m.id:<22} {m.state!s:<9} {m.account:<12} {m.priority.name.lower():<6} "
        f"{m.attempts:>5} {iso(m.created_at):<20} <{m.sender}> -> {rcpts}")
    if m.last_error:
        out(f"{'':<22} last error: {m.last_error}")


def cmd_retry(args: argparse.Namespace) -> int:
    match = _filter_or_usage(args, "retry")
    if isinstance(match, int):
        return match
    if args.ids:
        return _each(args, RETRY)
    # --all, or filters without --state: deferred messages
    states = match.states or frozenset({MessageState.DEFERRED})
    match = replace(match, states=states)
    op = (RETRY_FAILED if states == {MessageState.FAILED}
          else RETRY_ALL if states == {MessageState.DEFERRED} else RETRY)
    return bulk(args, op, match, "{n} {what}message(s) queued, due now")


def cmd_flush(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with queue_of(args) as store:
            counts = await store.counts()  # cheap (a table kept by the store): the bar's total
            total = sum(n for (_, state), n in counts.items() if state in FLUSH.states)
            count = await _with_progress(store, FLUSH, MessageFilter(), total)
            # Written last: the server sees it and ends account-wide backoffs too.
            await store.request_flush(time.time())
            return count

    count = asyncio.run(run())
    out(f"{count} deferred message(s) due now; accounts backing off resume")
    return EXIT_OK


def cmd_hold(args: argparse.Namespace) -> int:
    match = _filter_or_usage(args, "hold")
    if isinstance(match, int):
        return match
    if args.ids:
        return _each(args, HOLD)
    return bulk(args, HOLD, match, "held {n} {what}message(s)")


def cmd_release(args: argparse.Namespace) -> int:
    match = _filter_or_usage(args, "release")
    if isinstance(match, int):
        return match
    if args.ids:
        return _each(args, RELEASE)
    return bulk(args, RELEASE, match, "released {n} message(s), due now")


def cmd_delete(args: argparse.Namespace) -> int:
    match = _filter_or_usage(args, "delete")
    if isinstance(match, int):
        return match
    op = DELETE_FORCED if args.force else DELETE
    if args.ids:
        return _each(args, op)
    if match.states and MessageState.SENDING in match.states and not args.force:
        return fail("not deleting 'sending' messages: workers are delivering them right now"
                    " and deleting the rows cannot stop those sends, so they may still"
                    " arrive; wait for the attempts to finish, or use --force")
    return bulk(args, op, match, "deleted {n} {what}message(s)")


def cmd_purge(args: argparse.Namespace) -> int:
    try:
        age = parse_duration(args.older_than)
    except ValueError as exc:
        return fail(f"queue purge: --older-than {exc}", EXIT_USAGE)

    async def run() -> int:
        async with queue_of(args) as store:
            # No total for a bar: "old enough" is not counted beforehand.
            return await _with_progress(store, PURGE,
                                        MessageFilter(updated_before=time.time() - age))

    count = asyncio.run(run())
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
    """Only the tested account's secrets are read: an unrelated webhook's or account's
    unset variable is not this test's business (relay serve still refuses it)."""
    loaded = load_config_report(config_path(args), secrets=False)
    config = loaded.config
    account = config.accounts.get(args.name)
    if account is None:
        return fail(f"no account named {args.name!r} (accounts: {', '.join(config.accounts)})")
    key = f"accounts.{args.name}"
    problems = [p for p in [*loaded.unresolved, *unresolved_secrets(config)]
                if p.startswith(key + ".")]
    if problems:
        raise ConfigError(problems)
    try:
        account.load_secrets()
    except ValueError as exc:
        raise ConfigError([f"{key}.{exc}"]) from None
    if account.transport == "maildir":
        out(f"account {args.name}: maildir {account.path}")
    else:  # never the password
        out(f"account {args.name}: smtp {account.host}:{account.effective_port}"
              f" tls={account.tls} user={account.username or '(none)'}"
            + (f" auth={account.auth.mechanism}" if account.auth is not None else ""))
    hostname = effective_hostname(config, socket.getfqdn())
    steps = asyncio.run(_check_account(args.name, account, hostname))
    for step, ok, text in steps:
        out(f"  {step + ':':<11}{text if ok is not False else 'FAILED: ' + text}")
    return EXIT_OK if all(ok for _, ok, _ in steps) else EXIT_FAILURE


def _bulk_options(p: argparse.ArgumentParser, every: str, states: list[str]) -> None:
    p.add_argument("ids", nargs="*", metavar="ID", help="these messages (or use filters)")
    p.add_argument("--all", action="store_true", help=every)
    bulk_options(p, states)


def bulk_options(p: argparse.ArgumentParser, states: list[str], *, account: bool = True
                 ) -> None:
    """The filters, --sort/--limit, --yes and --dry-run of every bulk action (bulk())."""
    add_filter_options(p, states=states, account=account)
    add_sort_options(p, "with --limit: which come first")
    p.add_argument("--yes", "-y", action="store_true",
                   help="do not ask for confirmation on a terminal")
    p.add_argument("--dry-run", action="store_true",
                   help="only count the messages it would touch; change nothing")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="inspect or act on the queue")
    queue.set_defaults(needs_secrets=False)  # the queue file only; no upstream passwords
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    p = qsub.add_parser("list", parents=[common],
                        help="list messages, including delivered/failed records not yet purged")
    add_filter_options(p)
    add_sort_options(p, "order")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON array of messages")
    form.add_argument("--jsonl", action="store_true",
                      help="one JSON object per line, streamed as the queue is read")
    p.set_defaults(func=cmd_list)
    queue_show.add_commands(qsub, common)
    p = qsub.add_parser("retry", parents=[common],
                        help="make messages due now; a failed message is queued again")
    _bulk_options(p, "every deferred message (with --state failed: every failed one)",
                  ["deferred", "failed"])
    p.set_defaults(func=cmd_retry)
    p = qsub.add_parser("flush", parents=[common],
                        help="every deferred message due now; backed-off accounts resume")
    p.set_defaults(func=cmd_flush)
    p = qsub.add_parser("hold", parents=[common], help="put queued/deferred messages aside")
    _bulk_options(p, "every queued and deferred message", ["queued", "deferred"])
    p.set_defaults(func=cmd_hold)
    p = qsub.add_parser("release", parents=[common], help="queue held messages again, due now")
    _bulk_options(p, "every held message", ["held"])
    p.set_defaults(func=cmd_release)
    p = qsub.add_parser("delete", parents=[common],
                        help="remove messages with their bodies and attempts")
    _bulk_options(p, "every message (but those being sent, unless --force)", STATES)
    p.add_argument("--force", action="store_true",
                   help="also messages being delivered right now")
    p.set_defaults(func=cmd_delete)
    p = qsub.add_parser("purge", parents=[common],
                        help="delete delivered/failed records last changed before a time")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="e.g. 7d, 12h, 30m")
    p.set_defaults(func=cmd_purge)
    # Issue 20: backup/check (the file itself) and move, and the accounts group.
    from relay.cli import accounts, exchange, queuefile

    queuefile.add_commands(qsub, common)
    exchange.add_commands(qsub, common)
    accounts.add_queue_commands(qsub, common)
    accounts.add_commands(sub, common, test=cmd_accounts_test)
