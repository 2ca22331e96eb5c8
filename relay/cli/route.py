"""`relay route`: which account a message would take, by which rule, and why; the same
decision the listener makes (relay.delivery.rules), without sending anything.
"""

from __future__ import annotations

import argparse
from typing import Any

from relay.cli.common import EXIT_OK, EXIT_USAGE, fail, load, out
from relay.config.schema import Config
from relay.delivery.routing import RoutingError, requested_account
from relay.delivery.rules import Facts, decide, route


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def _may_use(config: Config, user: str | None, account: str) -> bool:
    """As the listener's ListenerAuth.may_use, from the config alone (no password files)."""
    if user is None:
        return not config.listen.auth.required
    spec = config.listen.auth.users.get(user)
    return spec is not None and (spec.accounts is None or account in spec.accounts)


def cmd_route(args: argparse.Namespace) -> int:
    config = load(args)
    fields = list(args.header or [])
    if args.header_from and not any(k.lower() == "from" for k, _ in fields):
        fields.append(("From", args.header_from))
    try:
        requested = requested_account(fields, config.destinations)
    except RoutingError as exc:
        return fail(f"the listener would refuse it (550 5.7.1): {exc}", EXIT_USAGE)
    sender = "" if args.sender in ("", "<>") else args.sender
    decisions = decide(Facts(sender, tuple(args.to), fields, args.user),
                       config.routing.table(), requested)
    for d in decisions:
        by = f"rule {d.rule!r}" if d.rule else "X-Account" if requested else "default"
        group = config.routing.groups.get(d.account)
        what = (f"group {d.account} ({group.mode}: {', '.join(group.accounts)}; the account"
                " is decided at each attempt)" if group else f"account {d.account}")
        out(f"<{d.recipient}>: {what}, by {by} ({d.why})")
    routes = route(decisions)
    if len(routes) > 1:
        out(f"split into {len(routes)} queue entries, one 250 for the client: "
            + "; ".join(f"{r.account}: {', '.join(r.recipients)}" for r in routes))
    denied = [r.account for r in routes if not _may_use(config, args.user, r.account)]
    if denied:
        out(f"the listener would refuse it (550 5.7.1): user {args.user or '(none)'} may not"
            f" use {', '.join(denied)}")
    return EXIT_OK


def add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("route", parents=[common],
                       help="which account a message would take (routing rules), and why")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help="the envelope sender (MAIL FROM); '<>' for none")
    p.add_argument("--to", required=True, action="append", metavar="ADDRESS",
                   help="a recipient (repeat for several)")
    p.add_argument("--header", action="append", type=_header, metavar="'NAME: VALUE'",
                   help="a header field of the message (repeat for several)")
    p.add_argument("--header-from", metavar="VALUE",
                   help="the From header (default: none; or give --header 'From: ...')")
    p.add_argument("--user", metavar="NAME", help="the listener user the client logs in as")
    p.set_defaults(func=cmd_route, needs_secrets=False)

