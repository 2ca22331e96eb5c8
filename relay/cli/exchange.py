"""`relay queue export FILE|-` and `relay queue import FILE|-`: a whole queue (messages in
every state with attempts and bodies, send times for rate limits, paused accounts, dedup
keys in their window, webhook events not yet sent) moved
between stores, e.g. from SQLite to PostgreSQL, as JSON lines (relay.queue.exchange,
docs/queue.md).

Both stream: an export writes each message as the store reads it, an import commits a
window of messages at a time, so 100,000 messages never sit in memory. An import from a
file reads it twice: once to check every line, then to import, so a bad line anywhere
leaves the queue as it was; from standard input each window is committed as it comes.
An export is safe beside a running server (one snapshot of its messages); so is an
import into a live queue with --merge.

Exit codes: 0 done, 1 refused or failed (a file left incomplete says so), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

from relay import __version__
from relay.cli.common import (
    EXIT_OK,
    discard_stdout,
    fail,
    load,
    new_store,
    open_queue,
    out,
)
from relay.config.schema import Config
from relay.errors import StoreError
from relay.queue.exchange import (
    FORMAT_VERSION,
    End,
    ExportFormatError,
    ExportReader,
    Header,
    Paused,
    SendsBatcher,
    dedup_line,
    end_line,
    event_line,
    header_line,
    message_line,
    parse_record,
    paused_line,
    sends_line,
)
from relay.queue.store import QueueStore
from relay.queue.types import ExportedEvent, MessageState

T = TypeVar("T")
TAIL_BYTES = 1 << 20  # the end line is short; a message line may be long (its body)


async def _write_export(store: QueueStore, stream: TextIO) -> tuple[End, dict[str, int]]:
    """Every record of the queue, in the format's order; (the end record, messages by
    state)."""
    stream.write(header_line(Header(FORMAT_VERSION, store.SCHEMA_VERSION,
                                    type(store).__name__.removesuffix("Store").lower(),
                                    time.time(), __version__)))
    paused = await store.paused_accounts()
    for account, at in sorted(paused.items()):
        stream.write(paused_line(Paused(account, at)))
    sends = 0
    batcher = SendsBatcher()
    async with contextlib.aclosing(store.export_sends()) as times:
        async for account, at in times:
            sends += 1
            if (line := batcher.add(account, at)) is not None:
                stream.write(sends_line(line))
    if (line := batcher.flush()) is not None:
        stream.write(sends_line(line))
    states: dict[str, int] = {}
    async with contextlib.aclosing(store.export_messages()) as messages:
        async for m in messages:
            states[str(m.state)] = states.get(str(m.state), 0) + 1
            stream.write(message_line(m))
    dedup = events = 0
    async with contextlib.aclosing(store.export_dedup()) as keys:
        async for key in keys:
            dedup += 1
            stream.write(dedup_line(key))
    async with contextlib.aclosing(store.export_events()) as pending:
        async for event in pending:
            events += 1
            stream.write(event_line(event))
    end = End(sum(states.values()), sends, len(paused), dedup, events)
    stream.write(end_line(end))
    return end, states


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[TextIO]:
    """A private file written beside ``path`` and renamed into place once complete and
    synced: an interrupted export never leaves a file under the name asked for."""
    if path.exists():
        raise StoreError(f"{path} already exists; give a new name (an export never"
                         " overwrites)")
    partial = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # mail is private
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _summary(end: End, states: dict[str, int]) -> str:
    order = [str(s) for s in MessageState]
    by_state = ", ".join(f"{states[s]} {s}" for s in order if states.get(s))
    return (f"{end.messages} messages" + (f" ({by_state})" if by_state else "")
            + f", {end.sends} send times, {end.paused} paused accounts, {end.dedup} dedup"
            f" keys, {end.events} webhook events")


def cmd_export(args: argparse.Namespace) -> int:
    config = load(args)

    async def run(stream: TextIO) -> tuple[End, dict[str, int]]:
        store = await open_queue(config)
        try:
            return await _write_export(store, stream)
        finally:
            await store.close()

    try:
        if args.file == "-":
            end, states = asyncio.run(run(sys.stdout))
            sys.stdout.flush()
            out(f"exported {_summary(end, states)}", file=sys.stderr)
        else:
            with _new_file(Path(args.file)) as stream:
                end, states = asyncio.run(run(stream))
            out(f"exported {_summary(end, states)} to {args.file}")
    except BrokenPipeError:
        raise  # the reader went away: main stops quietly, as for any command
    except OSError as exc:  # e.g. the disk is full
        if args.file == "-":
            discard_stdout()  # what is still buffered cannot be written either
            return fail(f"cannot write standard output: {exc.strerror or exc}; the export"
                        " is incomplete")
        return fail(f"cannot write {args.file}: {exc.strerror or exc}; nothing exported")
    return EXIT_OK


# -- import --------------------------------------------------------------------------------
async def _each(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def _complete(path: Path) -> None:
    """ExportFormatError unless the file's last line is an end line: a truncated file is
    refused before anything of it is imported."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        tail = f.read().decode("utf-8", "replace").rstrip().rpartition("\n")[2]
    try:
        last = parse_record(tail, 0)
    except ExportFormatError:
        last = None
    if not isinstance(last, End):
        raise ExportFormatError(0, f"{path} ends without its end line: the export is"
                                   " incomplete (nothing imported)")


async def _read_into(store: QueueStore, reader: ExportReader, merge: bool,
                     hooks: set[str]) -> tuple[int, int, int, int, int, int]:
    """(imported, skipped, sends, paused, dedup keys, events): paused accounts first, so
    that a live server sends nothing of theirs; then send times, so its rate limits count
    them; then mail; then the dedup keys and events that name it (``hooks``: gets the
    webhooks those events are for)."""
    paused = 0
    for p in reader.paused():
        await store.set_paused(p.account, True, p.at)
        paused += 1
    sends = await store.import_sends(_each(reader.sends()))
    imported, skipped = await store.import_messages(_each(reader.messages()), merge=merge)
    dedup = await store.import_dedup(_each(reader.dedup()))
    events = await store.import_events(_each(_noting(reader.events(), hooks)))
    reader.finish()
    return imported, skipped, sends, paused, dedup, events


def _noting(events: Iterable[ExportedEvent], hooks: set[str]) -> Iterator[ExportedEvent]:
    for e in events:
        hooks.add(e.webhook)
        yield e


def _check_all(path: Path, now: float) -> None:
    """The first of two passes over a file: every line read and checked, nothing
    written, so that a bad line anywhere refuses the whole file."""
    with open(path, encoding="utf-8") as f:
        reader = ExportReader(f, now=now)
        for _ in (*reader.paused(), *reader.sends()):
            pass
        for _ in reader.messages():
            pass
        for _ in (*reader.dedup(), *reader.events()):
            pass
        reader.finish()


def _unrouted(counts: dict[tuple[str, str], int], config: Config) -> list[str]:
    """Accounts (or groups) with mail still to send that this config does not have."""
    return sorted({account for (account, state), n in counts.items()
                   if n and not MessageState(state).final} - config.destinations)


def cmd_import(args: argparse.Namespace) -> int:
    config = load(args)
    name = "standard input" if args.file == "-" else args.file
    now = time.time()

    hooks: set[str] = set()

    async def run(lines: Iterable[str]) -> tuple[int, int, int, int, int, int, list[str]]:
        reader = ExportReader(lines, now=now)
        store = new_store(config, create=True)  # a queue that does not exist is created
        await store.open()
        try:
            if not args.merge and (held := sum((await store.counts()).values())):
                raise StoreError(f"the queue already holds {held} messages: import into an"
                                 " empty queue, or add --merge (ids already queued are"
                                 " skipped)")
            done = await _read_into(store, reader, args.merge, hooks)
            return (*done, _unrouted(await store.counts(), config))
        finally:
            await store.close()

    checked = False  # a file: every line checked before anything is imported
    try:
        if args.file == "-":
            imported, skipped, sends, paused, dedup, events, unrouted = asyncio.run(
                run(sys.stdin))
        else:
            _complete(Path(args.file))
            _check_all(Path(args.file), now)
            checked = True
            with open(args.file, encoding="utf-8") as f:
                imported, skipped, sends, paused, dedup, events, unrouted = asyncio.run(
                    run(f))
    except ExportFormatError as exc:
        if exc.line == 0:  # found before reading (_complete)
            return fail(str(exc))
        if exc.line == 1 or (args.file != "-" and not checked):
            return fail(f"{name}: {exc}; nothing imported")
        return fail(f"{name}: {exc}; the messages committed before it stay: import the fixed"
                    " file again with --merge (those are skipped)")
    except OSError as exc:
        return fail(f"cannot read {name}: {exc.strerror or exc}")
    out(f"imported {imported} messages" + (f" (skipped {skipped} already queued)"
                                            if skipped else "")
        + f", {sends} send times, {paused} paused accounts, {dedup} dedup keys, {events}"
        f" webhook events from {name}")
    if unrouted:
        out(f"note: mail waits for accounts this config does not have: {', '.join(unrouted)}"
            " (add them, or `relay queue move` it)", file=sys.stderr)
    if gone := sorted(hooks - {h.label for h in config.events.webhooks}):
        out(f"note: webhook events wait for webhooks this config does not have:"
            f" {', '.join(gone)} (a relay gives them up unless they are added)",
            file=sys.stderr)
    return EXIT_OK


def add_commands(qsub: Any, common: argparse.ArgumentParser) -> None:
    p = qsub.add_parser("export", parents=[common],
                        help="the whole queue as JSON lines (to move it to another store)")
    p.add_argument("file", metavar="FILE|-", help="a new file (never overwritten), or - for"
                   " standard output")
    p.set_defaults(func=cmd_export)
    p = qsub.add_parser("import", parents=[common],
                        help="add the messages of an export to the queue")
    p.add_argument("file", metavar="FILE|-", help="an export, or - for standard input")
    p.add_argument("--merge", action="store_true",
                   help="into a queue that already holds messages (ids already there are"
                   " skipped)")
    p.set_defaults(func=cmd_import)
