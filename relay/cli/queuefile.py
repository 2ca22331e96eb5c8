"""`relay queue backup` and `relay queue check`: the queue file itself, for upgrades,
backups and "is this file sound?", beside a running server or with none.

Exit codes: 0 ok, 1 a problem found (or the backup failed), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relay.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    QueueCheck,
    backup_queue,
    check_queue,
    fail,
    load,
    out,
)

STATE_ORDER = ("queued", "deferred", "sending", "held", "delivered", "failed")


def _summary(result: QueueCheck) -> str:
    counts = dict(sorted(result.counts.items(),
                         key=lambda kv: (STATE_ORDER.index(kv[0])
                                         if kv[0] in STATE_ORDER else 99, kv[0])))
    total = sum(counts.values())
    by_state = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"schema {result.schema}, {total} messages" + (f" ({by_state})" if by_state else "")


def _report(result: QueueCheck) -> int:
    for problem in result.problems:
        out(f"{result.path}: {problem}")
    if result.ok:
        out(f"{result.path}: ok: {_summary(result)}, integrity ok")
        return EXIT_OK
    return EXIT_FAILURE


NOT_A_FILE = ("the queue is in PostgreSQL (queue.url): back it up with pg_dump, and check it"
              " with PostgreSQL's tools; `relay queue backup/check` read SQLite files")


def cmd_backup(args: argparse.Namespace) -> int:
    config = load(args)
    if config.queue.url is not None:
        return fail(NOT_A_FILE)
    source = config.queue.path
    result = backup_queue(source, Path(args.path))
    out(f"backed up {source} to {args.path}")
    return _report(result)


def cmd_check(args: argparse.Namespace) -> int:
    if not args.path and load(args).queue.url is not None:
        return fail(NOT_A_FILE)
    path = Path(args.path) if args.path else load(args).queue.path
    return _report(check_queue(path))


def add_commands(qsub: Any, common: argparse.ArgumentParser) -> None:
    p = qsub.add_parser("backup", parents=[common],
                        help="a consistent copy of the queue, safe while relay runs")
    p.add_argument("path", metavar="PATH", help="the new file (never overwritten)")
    p.set_defaults(func=cmd_backup)
    p = qsub.add_parser("check", parents=[common],
                        help="integrity check and schema version of a queue file")
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="a queue file or backup (default: the config's queue.path)")
    p.set_defaults(func=cmd_check)
