"""Failed logins per client, like Postfix's anvil: too many, and the client waits; and who
counts as one client.

Pure: time comes in as ``now`` (monotonic seconds); the listener applies the answer.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import MutableMapping
from typing import Any

# Addresses remembered at most; beyond it the longest-known is forgotten, so a scan from
# many addresses cannot grow the table without bound.
MAX_CLIENTS = 10_000


class FailureThrottle:
    """After ``limit`` failures within ``window`` seconds, a key is locked for ``lockout``."""

    def __init__(self, limit: int, window: float, lockout: float) -> None:
        self.limit, self.window, self.lockout = limit, window, lockout
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def configure(self, limit: int, window: float, lockout: float) -> None:
        """New limits (a reload); failures and lockouts so far are kept."""
        self.limit, self.window, self.lockout = limit, window, lockout

    def locked(self, key: str, now: float) -> bool:
        until = self._locked_until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._locked_until[key]
        return False

    def failed(self, key: str, now: float) -> bool:
        """Record a failure; True when it locks the key."""
        times = self._failures.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            self._locked_until[key] = now + self.lockout
            self._forget_oldest(self._locked_until)
            return True
        self._failures[key] = times  # re-inserted: the dict stays in order of last failure
        self._forget_oldest(self._failures)
        return False

    @staticmethod
    def _forget_oldest(table: MutableMapping[str, Any]) -> None:
        if len(table) > MAX_CLIENTS:
            del table[next(iter(table))]


LOOPBACK = "loopback"


def client_key(host: str | None) -> str | None:
    """The client an address stands for in per-client limits (connections, logins).

    Every loopback address (127.0.0.0/8, ::1, and their IPv4-mapped forms) is one client:
    any local process can bind any of them, so counting them apart would multiply every
    budget by 16 million. None (a Unix socket) stays None."""
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return LOOPBACK if address.is_loopback else str(address)


class LoginThrottle:
    """Failed logins counted per (client, user name), with a larger budget per client.

    One app's wrong password locks out that user from that client, not every app on the
    host; guessing many user names from one client still hits the client's budget."""

    def __init__(self, per_user: int, per_client: int, window: float, lockout: float) -> None:
        self.user = FailureThrottle(per_user, window, lockout)
        self.client = FailureThrottle(per_client, window, lockout)

    def configure(self, per_user: int, per_client: int, window: float,
                  lockout: float) -> None:
        self.user.configure(per_user, window, lockout)
        self.client.configure(per_client, window, lockout)

    @property
    def lockout(self) -> float:
        return self.user.lockout

    def locked(self, client: str, user: str, now: float) -> bool:
        return self.client.locked(client, now) or self.user.locked(_pair(client, user), now)

    def failed(self, client: str, user: str, now: float) -> str | None:
        """Record a failure; what it locked ("user" or "client"), if anything."""
        if self.client.failed(client, now):
            return "client"
        if self.user.failed(_pair(client, user), now):
            return "user"
        return None


def _pair(client: str, user: str) -> str:
    return f"{client}\x00{user}"
