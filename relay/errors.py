"""The exception tree; every failure says whether it is temporary or permanent.

    RelayError
     +-- ConfigError            bad configuration: one line per problem, key path first
     +-- StoreError             the queue could not be read or written
     |    +-- StoreFullError    disk full or read-only: the client should retry (452 4.3.1)
     |    |    +-- StoreReserveError  free space below queue.min_free: new mail waits
     |    +-- StoreLockedError  another relay holds the queue file
     |    +-- StoreBusyError    other processes held the write lock too long (451 4.3.0)
     |    +-- SchemaError       the queue's schema is older (not migrated) or newer than known
     +-- DeliveryError          one delivery attempt went wrong
          +-- TemporaryFailure  try again later (4xx, connection lost, timeout)
          +-- PermanentFailure  do not try again (5xx)
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; ``problems`` holds one 'key.path: reason' per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class StoreError(RelayError):
    """The queue store failed."""


class StoreFullError(StoreError):
    """The queue could not commit because the disk is full or the file is read-only."""


class StoreReserveError(StoreFullError):
    """Free space is below queue.min_free: new mail is refused, delivery goes on."""


class StoreLockedError(StoreError):
    """Another process holds the queue file."""


class StoreBusyError(StoreError):
    """The write lock shared by the processes of one queue was not free in time."""


class SchemaError(StoreError):
    """The queue's schema is not the one this relay knows: older and not to be migrated
    on open (``relay queue migrate``), or newer (written by a later relay)."""

    def __init__(self, message: str, *, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(message)


class DeliveryError(RelayError):
    """A delivery attempt failed; carries the SMTP reply when there was one."""

    temporary: bool = True

    def __init__(
        self,
        reason: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        account_wide: bool = False,
        account_reason: str | None = None,
        offered: bool = True,
    ) -> None:
        self.reason = reason
        # False when the message never reached the upstream (no connection could be set
        # up, or the login was held back): the attempt is not counted (outcome.settle).
        self.offered = offered
        self.code = code
        self.enhanced = enhanced
        # True when the failure says nothing about this message but about the account
        # (connection refused, 421 at greeting, AUTH failure): back the account off.
        self.account_wide = account_wide or account_reason is not None
        # Why, as a short label (relay.refusals.REASONS, "auth", "connect"...), for the
        # backoff log line and relay_account_backoffs_total.
        self.account_reason = account_reason
        super().__init__(reason)

    def reply_text(self) -> str:
        """The upstream reply as a log line would show it ('451 4.3.0 busy')."""
        parts = [str(self.code)] if self.code else []
        if self.enhanced and not self.reason.startswith(self.enhanced):
            parts.append(self.enhanced)
        parts.append(self.reason)
        return " ".join(parts)


class TemporaryFailure(DeliveryError):
    """Retry later: 4xx, connection refused or lost, timeout, TLS or DNS failure."""

    temporary = True


class PermanentFailure(DeliveryError):
    """Give up: 5xx reply, or a message the upstream can never accept."""

    temporary = False
