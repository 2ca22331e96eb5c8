"""Which account a message goes through, and when it may go."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC
from email.utils import parsedate_to_datetime

from relay.smtp.headers import get_header, remove_headers

ACCOUNT_HEADER = "X-Account"
DEFERRED_HEADER = "Deferred-Delivery"  # RFC 2156
# Headers that instruct relay and are removed before the message goes upstream.
CONTROL_HEADERS = {ACCOUNT_HEADER, DEFERRED_HEADER}


_CONTROL_NAMES = frozenset(name.lower() for name in CONTROL_HEADERS)


def without_control_headers(body: bytes, fields: list[tuple[str, str]]) -> bytes:
    """The message as it goes upstream: ``body`` without the control headers. ``fields``
    (parse_headers(body)) names none in most messages: then ``body`` itself, without
    scanning its header section a second time."""
    if not any(name.lower() in _CONTROL_NAMES for name, _ in fields):
        return body
    return remove_headers(body, CONTROL_HEADERS)


class RoutingError(ValueError):
    """The message's headers ask for something relay cannot do; text names the header."""


def requested_account(fields: list[tuple[str, str]], accounts: Collection[str]) -> str | None:
    """The account the X-Account header names, or None when there is none."""
    value = get_header(fields, ACCOUNT_HEADER)
    if value is None:
        return None
    name = value.strip()
    if name not in accounts:
        raise RoutingError(f"{ACCOUNT_HEADER} header names unknown account {name[:64]!r}")
    return name


def choose_account(fields: list[tuple[str, str]], default: str, accounts: Collection[str]) -> str:
    """X-Account, or the default (without routing rules: relay.delivery.rules)."""
    return requested_account(fields, accounts) or default


def deferred_until(fields: list[tuple[str, str]]) -> float | None:
    """The Deferred-Delivery time as a Unix timestamp, or None when absent."""
    value = get_header(fields, DEFERRED_HEADER)
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        when = None
    if when is None:
        raise RoutingError(f"{DEFERRED_HEADER} header is not an RFC 5322 date")
    if when.tzinfo is None:
        # RFC 5322 3.3: '-0000' is UTC with no local zone known; Python reads it as naive.
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
