"""`relay queue backup`, `check` and `migrate`: the queue file itself, for upgrades,
backups and "is this file sound?", beside a running server or with none (but `migrate`,
which wants the relay stopped).

Exit codes: 0 ok, 1 a problem found (or the backup failed), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
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
    migrate_queue,
    out,
)
from relay.config.report import queue_name

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
        if result.older:
            out(f"{result.path}: schema {result.schema} is older than this relay's"
                f" ({result.known}): `relay queue migrate` brings it up to date")
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


def cmd_migrate(args: argparse.Namespace) -> int:
    config = load(args)
    done = asyncio.run(migrate_queue(config, backup=not args.no_backup,
                                     dest=Path(args.backup) if args.backup else None))
    found = done.plan
    where = queue_name(config)
    if found.new:
        out(f"no queue yet at {where}: nothing to migrate (relay creates it at"
            f" schema {found.known})")
    elif not done.applied:
        out(f"queue schema {found.found} is up to date: nothing to migrate")
    else:
        if done.backup is not None:
            out(f"backed up {config.queue.path} (schema {found.found}) to {done.backup}")
        out(f"migrated {where} from schema {found.found} to {done.applied[-1]}"
            f" (applied {', '.join(map(str, done.applied))})")
    return EXIT_OK


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
    p = qsub.add_parser("migrate", parents=[common],
                        help="bring the queue to this relay's schema (backs it up first)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--backup", metavar="PATH",
                       help="where the backup goes (default: beside the queue, named"
                       " QUEUE.schema-N.TIME.bak)")
    where.add_argument("--no-backup", action="store_true",
                       help="migrate without taking a backup first")
    p.set_defaults(func=cmd_migrate)
