"""An operator's bulk change (`relay queue retry`, `delete`, `move` ...) for both stores:
which messages it takes (``selection``), and taking them a window of seq values at a
time, one committed transaction each (``in_windows``), so a change to a million rows
never holds one long write. What differs between SQLite and PostgreSQL is the
relay.queue.sqlwhere.Dialect each store names, and the reads and writes it runs through.

An import (`relay queue import`) commits in windows too, for both stores alike: messages
by count and body size (``message_windows``), other rows by count
(``statement_windows``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from relay.queue.filters import MessageFilter
from relay.queue.sqlwhere import Dialect, where
from relay.queue.store import Progress
from relay.queue.types import ExportedMessage, MessageState, unclaimed

EXPORT_PAGE = 100  # messages (with bodies) per fetch of an export
IMPORT_WINDOW = 500  # messages per committed transaction of an import...
IMPORT_WINDOW_BYTES = 16 * 1024 * 1024  # ...or fewer, once their bodies reach this
ROWS_WINDOW = 5000  # send times, dedup keys or events per fetch or transaction

# A statement with ``{where}`` to fill in, and its lead parameters (those before the
# window's and the selection's).
Templates = Sequence[tuple[str, tuple[Any, ...]]]
Fetch = Callable[[str, list[Any]], Awaitable[list[Any]]]  # a read: its rows
# Writes in one transaction: (statement, parameters) pairs -> each one's row count.
Execute = Callable[[list[Any]], Awaitable[list[int]]]


def selection(states: Sequence[str], ids: Sequence[str], match: MessageFilter | None,
              d: Dialect) -> tuple[str, list[Any]]:
    """``match`` limited to ``states`` (and to ``ids`` when given): clause, parameters."""
    clause, params = where((match or MessageFilter()).within(map(MessageState, states)), d)
    if ids:
        listed, values = d.any_of("id", ids)
        clause += f" AND {listed}"
        params.extend(values)
    return clause, params


async def in_windows(fetch: Fetch, execute: Execute, d: Dialect, where: str,
                     params: list[Any], templates: Templates, progress: Progress | None,
                     chunk: int) -> int:
    """Run each template (``{where}`` filled in) per window of ``chunk`` seq values, one
    transaction each (``execute``); sum the last's counts.

    Each template's parameters are its lead (for a SET clause or the values of an
    INSERT), then the window's bounds, then ``params``.
    """
    rows = await fetch(f"SELECT min(seq), max(seq) FROM messages WHERE {where}", params)
    if not rows or rows[0][0] is None:
        return 0
    low, high = int(rows[0][0]), int(rows[0][1])
    window = f"seq BETWEEN {d.mark} AND {d.mark} AND {where}"
    done = 0
    for start in range(low, high + 1, chunk):
        counts = await execute([
            (t.format(where=window), (*lead, start, start + chunk - 1, *params))
            for t, lead in templates])
        done += counts[-1]
        if progress is not None:
            progress(done)
    return done


async def message_windows(items: AsyncIterable[ExportedMessage], now: float
                          ) -> AsyncIterator[list[ExportedMessage]]:
    """An import's messages, claims given up (types.unclaimed), a window at a time:
    IMPORT_WINDOW of them, or fewer once their bodies reach IMPORT_WINDOW_BYTES."""
    window: list[ExportedMessage] = []
    size = 0
    async for item in items:
        window.append(unclaimed(item, now))
        size += len(item.body or b"")
        if len(window) >= IMPORT_WINDOW or size >= IMPORT_WINDOW_BYTES:
            yield window
            window, size = [], 0
    if window:
        yield window


async def statement_windows(statements: AsyncIterable[tuple[str, Sequence[Any]]],
                            execute: Execute) -> int:
    """Run ``statements`` ROWS_WINDOW at a time, one transaction each; rows changed."""
    added = 0
    window: list[tuple[str, Sequence[Any]]] = []
    async for statement in statements:
        window.append(statement)
        if len(window) >= ROWS_WINDOW:
            added += sum(await execute(window))
            window = []
    if window:
        added += sum(await execute(window))
    return added
