"""Which schema migrations a queue needs, and what to say when it may not have them.

Pure: every store keeps an ordered list of numbered migrations (version 1 from an empty
queue, then each version from the one before); given the version found in a queue and the
versions a store knows, ``plan`` says up to date, needs these versions, or newer than this
relay. The stores apply the steps; this module decides and words the refusals, so both
stores refuse alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.errors import SchemaError


@dataclass(frozen=True)
class SchemaPlan:
    """What a queue at schema ``found`` needs from a relay that knows up to ``known``."""

    found: int  # 0: a new, empty queue
    known: int
    missing: tuple[int, ...]  # versions to apply, in order (empty when up to date or newer)

    @property
    def new(self) -> bool:
        """An empty queue: creating it needs no operator's consent."""
        return self.found == 0

    @property
    def up_to_date(self) -> bool:
        return self.found == self.known

    @property
    def newer(self) -> bool:
        return self.found > self.known

    def refusal(self) -> SchemaError:
        """Why a queue at this plan may not be used as it is (newer, or older and not to
        be migrated silently): one line naming the versions and what to do."""
        if self.newer:
            return SchemaError(
                f"queue schema {self.found} is newer than this relay (knows {self.known}):"
                " upgrade relay, or restore the backup taken before the upgrade",
                found=self.found, known=self.known)
        return SchemaError(
            f"queue schema {self.found} is older than this relay (knows {self.known}):"
            " run `relay queue migrate` (it backs the queue up first), or start with"
            " `relay serve --migrate`",
            found=self.found, known=self.known)


def check_numbering(versions: Sequence[int]) -> int:
    """The latest version of a store's list; ValueError unless it is 1, 2, ... N (a gap or
    a repeat would skip or apply a step twice)."""
    if list(versions) != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1..N in order, not {list(versions)}")
    return len(versions)


def plan(found: int, known: int) -> SchemaPlan:
    """What a queue at schema ``found`` needs from a store that knows migrations 1 to
    ``known`` (its SCHEMA_VERSION)."""
    if found < 0 or known < 1:
        raise ValueError(f"schema versions start at 0 (new) and 1 ({found}, {known})")
    return SchemaPlan(found, known, tuple(range(found + 1, known + 1)))
