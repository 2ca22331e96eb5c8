"""Routing rules (``routing.rules``): which account each recipient of a message goes
through, and why. Pure: the message's facts in, routes out; the listener applies them.

Order of decision (docs/routing.md): an ``X-Account`` header the listener user may use
decides for the whole message; otherwise each recipient takes the first rule whose
conditions all hold; otherwise ``routing.default_account``. Recipients that end on
different accounts become one route (one queue entry) each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from fnmatch import fnmatchcase

from relay.smtp.headers import get_header


@dataclass(frozen=True)
class Rule:
    """One of routing.rules, translated from the config (each condition: globs, any of
    which may match; None: not a condition of this rule)."""

    name: str
    account: str
    sender: tuple[str, ...] | None = None
    from_domain: tuple[str, ...] | None = None
    recipient_domain: tuple[str, ...] | None = None
    user: tuple[str, ...] | None = None
    header: tuple[str, str] | None = None  # (name, value glob)


@dataclass(frozen=True)
class RoutingTable:
    default_account: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Facts:
    """What rules may look at: the envelope, the header fields, the listener user."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    fields: Sequence[tuple[str, str]]
    user: str | None = None  # None: the client did not log in


@dataclass(frozen=True)
class Decision:
    """Where one recipient goes, and why."""

    recipient: str
    account: str
    rule: str | None  # the rule's name; None: X-Account or the default account
    why: str


@dataclass(frozen=True)
class Route:
    """The recipients of a message that go through one account: one queue entry."""

    account: str
    recipients: tuple[str, ...]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _glob(value: str, patterns: Sequence[str]) -> str | None:
    """The first pattern the value matches (case-insensitive), or None."""
    lowered = value.lower()
    return next((p for p in patterns if fnmatchcase(lowered, p.lower())), None)


def _sender(address: str, patterns: Sequence[str]) -> str | None:
    """The first pattern the sender matches; the null sender <> matches none (docs)."""
    if not address:
        return None
    for pattern in patterns:
        if pattern.startswith("@"):
            if fnmatchcase(_domain(address), pattern[1:].lower()) and "@" in address:
                return pattern
        elif fnmatchcase(address.lower(), pattern.lower()):
            return pattern
    return None


def _from_domains(fields: Sequence[tuple[str, str]]) -> list[str]:
    value = get_header(list(fields), "From")
    if value is None:
        return []
    return [_domain(addr) for _, addr in getaddresses([value]) if "@" in addr]


def _message_reasons(rule: Rule, facts: Facts) -> list[str] | None:
    """Why the rule's message-wide conditions hold (one phrase each), or None if one
    does not."""
    reasons = []
    if rule.sender is not None:
        hit = _sender(facts.sender, rule.sender)
        if hit is None:
            return None
        reasons.append(f"sender <{facts.sender}> matches {hit!r}")
    if rule.from_domain is not None:
        found = [(d, p) for d in _from_domains(facts.fields)
                 if (p := _glob(d, rule.from_domain)) is not None]
        if not found:
            return None
        reasons.append(f"From domain {found[0][0]} matches {found[0][1]!r}")
    if rule.user is not None:
        hit = None if facts.user is None else _glob(facts.user, rule.user)
        if hit is None:
            return None
        reasons.append(f"listener user {facts.user} matches {hit!r}")
    if rule.header is not None:
        name, pattern = rule.header
        value = get_header(list(facts.fields), name)
        if value is None or not fnmatchcase(value.strip().lower(), pattern.lower()):
            return None
        reasons.append(f"header {name} matches {pattern!r}")
    return reasons


def _recipient_reason(rule: Rule, recipient: str) -> str | None:
    if rule.recipient_domain is None:
        return ""
    hit = _glob(_domain(recipient), rule.recipient_domain)
    return None if hit is None else f"recipient domain {_domain(recipient)} matches {hit!r}"


def decide(facts: Facts, routing: RoutingTable, requested: str | None = None
           ) -> list[Decision]:
    """Each recipient's account, in the recipients' order.

    ``requested``: the X-Account header's account (already checked to exist), which
    decides for every recipient.
    """
    if requested is not None:
        why = f"X-Account header names {requested}"
        return [Decision(r, requested, None, why) for r in facts.recipients]
    message_reasons = [_message_reasons(rule, facts) for rule in routing.rules]
    decisions = []
    for recipient in facts.recipients:
        decision = Decision(recipient, routing.default_account, None,
                            "no rule matched: routing.default_account")
        for rule, reasons in zip(routing.rules, message_reasons, strict=True):
            own = None if reasons is None else _recipient_reason(rule, recipient)
            if reasons is None or own is None:
                continue
            decision = Decision(recipient, rule.account, rule.name,
                                "; ".join([*reasons, own] if own else reasons))
            break
        decisions.append(decision)
    return decisions


def route(decisions: Sequence[Decision]) -> list[Route]:
    """One route per account (in the order accounts first appear), recipients in order."""
    grouped: dict[str, list[str]] = {}
    for d in decisions:
        grouped.setdefault(d.account, []).append(d.recipient)
    return [Route(account, tuple(rcpts)) for account, rcpts in grouped.items()]
