"""Keeping the SQLite queue file bounded: delivered records and old send times go a small
batch at a time, in the server only (the CLI opens the same file and leaves it to the
server). A mixin of SQLiteStore: it writes through the store's writer (``execute``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.errors import StoreError
from relay.queue.sqlite.schema import SENDS_KEPT_S

log = logging.getLogger("relay.store")
# Pruning deletes at most this many messages (or sends) per transaction: a batch holds
# the write lock for a few milliseconds, so sessions waiting for a commit barely notice.
PRUNE_BATCH = 500
PRUNE_INTERVAL_S = 60.0  # how often the pruner looks once it has caught up


class Pruning:
    """The pruning side of SQLiteStore."""

    _pruner: asyncio.Task[None] | None

    if TYPE_CHECKING:
        async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]: ...

    async def prune(self, now: float, keep_delivered_s: float,
                    batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """One batch: delivered messages older than ``keep_delivered_s`` with their
        attempts (and so their transcripts), send times older than SENDS_KEPT_S and
        dedup keys past their window. Returns (messages, the most of sends or keys)."""
        old = ("SELECT id FROM messages WHERE state='delivered' AND updated_at < ?"
               " ORDER BY updated_at LIMIT ?")
        before = now - keep_delivered_s
        counts = await self.execute([
            (f"DELETE FROM attempts WHERE message_id IN ({old})", (before, batch)),
            (f"DELETE FROM bodies WHERE id IN ({old})", (before, batch)),
            (f"DELETE FROM messages WHERE id IN ({old})", (before, batch)),
            ("DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE at < ?"
             " ORDER BY at LIMIT ?)", (now - SENDS_KEPT_S, batch)),
            ("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup WHERE expires_at < ?"
             " LIMIT ?)", (now, batch)),
        ])
        return counts[2], max(counts[3], counts[4])

    async def prune_all(self, now: float, keep_delivered_s: float,
                        batch: int = PRUNE_BATCH) -> int:
        """Prune in batches until nothing is left to prune; return messages removed.

        Each batch is its own transaction, and the loop yields between them, so new
        messages are committed in between instead of waiting for the whole prune."""
        total = 0
        while True:
            messages, sends = await self.prune(now, keep_delivered_s, batch)
            total += messages
            if messages < batch and sends < batch:
                return total
            await asyncio.sleep(0)

    def start_pruning(self, keep_delivered_s: float,
                      clock: Callable[[], float], interval_s: float = PRUNE_INTERVAL_S) -> None:
        """Prune now and every ``interval_s`` until the store closes (the server only:
        the CLI opens the same file and leaves that to the server)."""
        self._pruner = asyncio.create_task(
            self._prune_loop(keep_delivered_s, clock, interval_s), name="queue-pruner")

    async def _prune_loop(self, keep_delivered_s: float, clock: Callable[[], float],
                          interval_s: float) -> None:
        while True:
            try:
                removed = await self.prune_all(clock(), keep_delivered_s)
            except StoreError as exc:  # a full disk: try again at the next interval
                log.warning("queue pruning failed, will retry: %s", exc)
            else:
                if removed:
                    log.debug("pruned %d delivered messages", removed)
            await asyncio.sleep(interval_s)
