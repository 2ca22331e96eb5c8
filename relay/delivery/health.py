"""Each account's health as the running server sees it, published for `relay status`.

Only the server knows that an account is backing off (worker.AccountWorker), and
another process cannot ask it. So the scheduler reports each change here, and this writes
every account's latest state into the queue as one small JSON value
(``QueueStore.publish_health``), which `relay status` reads, and the next start restores
(a restart, or a crash loop, must not end a quota or login backoff).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from relay.errors import StoreError
from relay.observe.logs import event

log = logging.getLogger("relay.delivery")


@dataclass(frozen=True)
class AccountHealth:
    """One account after its latest send, as AccountWorker._account_health saw it."""

    account: str
    backoff_until: float  # epoch seconds; in the past once the backoff is over
    failures: int  # account-wide failures in a row; 0: healthy
    last_error: str = ""
    auth: bool = False  # the last failure was an AUTH refusal (535, 5.7.8)
    reason: str = ""  # the backoff's label (relay_account_backoffs_total), "" when healthy
    throttle: float = 1.0  # relay.delivery.throttle: the share of its speed in use


@dataclass(frozen=True)
class HealthReport:
    """What a server published: when, from which process, and each account it reported."""

    pid: int
    published_at: float
    accounts: Mapping[str, AccountHealth]


def encode(report: HealthReport) -> str:
    return json.dumps({
        "pid": report.pid,
        "published_at": report.published_at,
        "accounts": {name: asdict(h) for name, h in report.accounts.items()},
    }, sort_keys=True)


def decode(text: str | None) -> HealthReport | None:
    """The report in ``text``; None when there is none or it is not one we can read."""
    if not text:
        return None
    try:
        data: Any = json.loads(text)
        accounts = {name: AccountHealth(**fields) for name, fields in data["accounts"].items()}
        return HealthReport(int(data["pid"]), float(data["published_at"]), accounts)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


HealthHook = Callable[[AccountHealth], None]


class HealthPublisher:
    """Takes changes from the workers (synchronously) and writes them in the background.

    Writes are coalesced: while one is in progress, later changes wait and go out together
    in the next, so a burst of failures costs at most two writes.
    """

    def __init__(self, write: Callable[[str], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
        self._write = write
        self._clock = clock
        self._accounts: dict[str, AccountHealth] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def update(self, health: AccountHealth) -> None:
        """Record ``health`` and make sure a write follows; never waits."""
        if self._accounts.get(health.account) == health:
            return
        self._accounts[health.account] = health
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._publish(), name="health-publisher")

    async def _publish(self) -> None:
        while self._dirty:
            self._dirty = False
            report = HealthReport(os.getpid(), self._clock(), dict(self._accounts))
            try:
                await self._write(encode(report))
            except StoreError as exc:  # best effort: the next change writes again
                event(log, logging.WARNING, "queue_error",
                      reason=f"cannot publish account health: {exc}")
                return
