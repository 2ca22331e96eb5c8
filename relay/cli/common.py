"""What every `relay` command shares: exit codes, escaped output, loading the config,
opening the queue. Public, so command modules import it instead of each other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, cast

from relay.config.loading import load_config
from relay.config.schema import Config
from relay.errors import StoreError, StoreLockedError
from relay.printable import escape
from relay.queue.migrations import SchemaPlan, plan
from relay.queue.sqlite import maintenance
from relay.queue.sqlite.maintenance import QueueCheck as QueueCheck
from relay.queue.sqlite.owners import lock_held
from relay.queue.sqlite.store import SQLiteStore, server_lock_path
from relay.queue.store import QueueStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe ended


def load(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, else $RELAY_CONFIG, else the built-in defaults."""
    path = config_path(args)
    return load_config(path, secrets=getattr(args, "needs_secrets", True))


def iso(ts: float) -> str:
    """``ts`` as an ISO date; one no date can show (a queue written by an older relay's
    import may hold 1e308; inf, nan) says so, rather than ending the command with a
    traceback."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"out of range ({ts!r})"


def out(*lines: str, file: TextIO | None = None) -> None:
    """Print each of ``lines`` as one line, control characters escaped: what the queue
    holds comes from clients and upstreams, and a CR, LF or ESC sequence in a header
    or a reply must not forge a line or drive the terminal. Every CLI printer uses it
    (JSON output needs not: json.dumps escapes them itself)."""
    for line in lines:
        print(escape(line), file=file or sys.stdout)


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    out(f"relay: {message}", file=sys.stderr)
    return code


def discard_stdout() -> None:
    """Point standard output at /dev/null: after a write to it failed (a closed pipe, a
    full disk), what is still buffered goes nowhere instead of failing again, with a
    traceback, in the interpreter's own flush at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def process_alive(pid: int) -> bool:
    """Is process ``pid`` running (a report from a server that is gone is from an earlier
    run)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def postgres_store(config: Config, *, create: bool = False) -> QueueStore:
    """The config's PostgreSQL queue (queue.url), not opened. ``create``: an empty
    database becomes a new queue (`relay queue import` into it); otherwise it is "no
    queue", as a missing SQLite file is."""
    q = config.queue
    assert q.url is not None
    from relay.queue.postgres.store import PostgresStore  # (only for a PostgreSQL queue)

    password = q.secret
    if password is None and (q.password_env or q.password_file):
        # The CLI reads no account secrets, but the queue's own: without it there is no
        # queue to show (the operator needs read access to the file or the variable).
        try:
            password = q._read_secret()
        except ValueError as exc:
            raise StoreError(f"queue.{exc}") from None
    return PostgresStore(q.url, password=password, connect_timeout=q.connect_timeout,
                         statement_timeout=q.statement_timeout,
                         allow_unsafe_commit=q.allow_unsafe_commit, create=create)


def new_store(config: Config, *, lock: bool = False, create: bool = False) -> QueueStore:
    """The config's queue, not opened (``lock``: as `relay serve`, alone on it;
    ``create``: an empty PostgreSQL database becomes a queue, as a new SQLite file does)."""
    if config.queue.url is not None:
        return postgres_store(config, create=create)
    return SQLiteStore(config.queue.path, lock=lock)


async def open_queue(config: Config) -> QueueStore:
    """The queue beside a running server (no lock): operator commands share it. An older
    schema is refused (SchemaError, naming `relay queue migrate`), never migrated here."""
    store: QueueStore
    if config.queue.url is not None:
        store = postgres_store(config)
        await store.open()
        return store
    if not config.queue.path.exists():
        raise StoreError(f"no queue at {config.queue.path} (has `relay serve` run here?)")
    store = new_store(config)
    await store.open()
    return store


@contextlib.asynccontextmanager
async def queue_of(args: argparse.Namespace) -> AsyncIterator[QueueStore]:
    store = await open_queue(load(args))
    try:
        yield store
    finally:
        await store.close()


@dataclass(frozen=True)
class Migrated:
    """What `relay queue migrate` (or `relay serve --migrate`) did."""

    plan: SchemaPlan
    applied: list[int]
    backup: Path | None


def default_backup(queue: Path, found: int, now: float) -> Path:
    """Beside the queue, named for the schema it holds and when it was taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return queue.with_name(f"{queue.name}.schema-{found}.{stamp}.bak")


async def migrate_queue(config: Config, *, backup: bool, dest: Path | None = None
                        ) -> Migrated:
    """Apply the migrations the queue lacks, after a checked backup (unless ``backup`` is
    False). Nothing to do for a new or current queue; SchemaError for a newer one;
    StoreLockedError while a relay runs on it (a relay of the older version would go on
    writing the old schema)."""
    store = new_store(config, lock=True)
    if config.queue.url is None:  # refused as `relay serve` refuses it, not "no queue yet"
        await asyncio.to_thread(maintenance.refuse_foreign, config.queue.path)
    found = plan(await store.schema_version(), store.SCHEMA_VERSION)
    if found.newer:
        raise found.refusal()
    if found.new or found.up_to_date:
        return Migrated(found, [], None)
    if config.queue.url is not None:  # each step under an advisory lock; back up with
        return Migrated(found, await store.migrate(), None)  # pg_dump (docs/operations.md)
    queue = config.queue.path
    if server_running(queue):
        raise StoreLockedError(f"a relay is running on {queue}: stop it before migrating")
    copy = None
    if backup:
        copy = dest or default_backup(queue, found.found, time.time())
        checked = await asyncio.to_thread(backup_queue, queue, copy)
        if not checked.ok:  # a copy of a damaged queue is no backup: do not leave it
            with contextlib.suppress(FileNotFoundError):  # to be mistaken for one
                copy.unlink()
            raise StoreError(f"the backup {copy} does not check clean ({checked.problems[0]}):"
                             " removed it; nothing migrated (`relay queue check` the queue)")
    return Migrated(found, await store.migrate(), copy)


def backup_queue(source: Path, dest: Path) -> QueueCheck:
    """A consistent copy of a (possibly live) queue file, checked (`relay queue backup`)."""
    return maintenance.backup(source, dest)


def check_queue(path: Path) -> QueueCheck:
    """Schema and integrity of a queue file, read-only (`relay queue check`)."""
    return maintenance.check(path)


def lock_path(queue: Path) -> Path:
    """The lock `relay serve` holds on its queue while it runs."""
    return server_lock_path(queue)


def server_running(queue: Path) -> bool:
    """True while a `relay serve` holds the queue's lock."""
    return lock_held(server_lock_path(queue))


def config_path(args: argparse.Namespace) -> str | None:
    """``--config``, else $RELAY_CONFIG, else None (the built-in defaults)."""
    return args.config or os.environ.get("RELAY_CONFIG") or None


def workers_arg(value: str) -> int | str:
    """argparse type for --workers: a number or 'auto', refused as the config key is."""
    from relay.config.schema import parse_workers

    try:
        return cast(int | str, parse_workers(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
