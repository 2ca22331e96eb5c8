"""An operator's bulk change (`relay queue retry`, `delete`, `move` ...) for both stores:
which messages it takes (``selection``), and taking them a window of seq values at a
time, one committed transaction each (``in_windows``), so a change to a million rows
never holds one long write. What differs between SQLite and PostgreSQL is the
relay.queue.sqlwhere.Dialect each store names, and the reads and writes it runs through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from relay.queue.filters import MessageFilter
from relay.queue.sqlwhere import Dialect, where
from relay.queue.store import Progress
from relay.queue.types import MessageState

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
