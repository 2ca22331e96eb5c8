"""The filter options shared by `relay queue list` and the bulk actions, and their
translation into a relay.queue.filters.MessageFilter (times parsed here, at the edge).
"""

from __future__ import annotations

import argparse
import time

from relay.config.durations import parse_since
from relay.queue.filters import MessageFilter, SortKey
from relay.queue.types import MessageState

STATES = [str(s) for s in MessageState]
WHEN = "an age (30m, 2h, 1d) or a UTC time (2026-11-30T10:00:00Z)"


def add_filter_options(p: argparse.ArgumentParser, *, states: list[str] | None = None,
                       account: bool = True) -> None:
    """--state, --account, --sender, --rcpt, --since, --until, --changed-since,
    --min-attempts, --error: each narrows the selection further. ``account`` False: the
    command names the account its own way (`queue move --from`, dest ``account``)."""
    g = p.add_argument_group("filters (each narrows the selection)")
    g.add_argument("--state", choices=states or STATES, action="append",
                   help="only messages in this state (repeat for several)")
    if account:
        g.add_argument("--account", metavar="NAME",
                       help="only messages routed to this account")
    g.add_argument("--sender", metavar="PATTERN",
                   help="envelope sender contains PATTERN, or matches it as a glob with * or ?"
                        " (case-insensitive)")
    g.add_argument("--rcpt", metavar="PATTERN",
                   help="a recipient contains PATTERN, or matches it as a glob with * or ?"
                        " (e.g. '*@example.com')")
    g.add_argument("--since", metavar="WHEN", help=f"accepted at or after WHEN: {WHEN}")
    g.add_argument("--until", metavar="WHEN", help=f"accepted before WHEN: {WHEN}")
    g.add_argument("--changed-since", metavar="WHEN",
                   help=f"last changed (attempted, failed, held...) at or after WHEN: {WHEN}")
    g.add_argument("--min-attempts", type=int, metavar="N",
                   help="only messages with at least N delivery attempts")
    g.add_argument("--error", metavar="TEXT",
                   help="the last error contains TEXT (case-insensitive), e.g. '4.7.0'")


def add_sort_options(p: argparse.ArgumentParser, sort_help: str) -> None:
    p.add_argument("--sort", choices=[str(k) for k in SortKey], default=str(SortKey.CREATED),
                   help=f"{sort_help}: created (arrival, the default), next-attempt,"
                        " attempts (most first)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="at most N messages (N at least 1; leave it out for no limit)")


def message_filter(args: argparse.Namespace, now: float | None = None) -> MessageFilter:
    """The filter the options name; ValueError names the option that is wrong."""
    now = time.time() if now is None else now

    def when(option: str) -> float | None:
        text = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if text is None:
            return None
        try:
            return parse_since(text, now)
        except ValueError as exc:
            raise ValueError(f"{option} {exc}") from None

    if (getattr(args, "min_attempts", None) or 0) < 0:
        raise ValueError("--min-attempts must not be negative")
    # 0 would read as "none", and `queue list` would call a full queue empty.
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1 (leave it out for no limit)")
    return MessageFilter(
        states=frozenset(MessageState(s) for s in args.state) if args.state else None,
        account=args.account,
        sender=args.sender,
        rcpt=args.rcpt,
        since=when("--since"),
        until=when("--until"),
        changed_since=when("--changed-since"),
        min_attempts=args.min_attempts,
        error=args.error,
    )
