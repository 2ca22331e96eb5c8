"""`relay accounts test|quota|pause|resume` and `relay queue move`: what an on-call engineer
does to an account that is down (docs/runbooks.md).

Pause and resume are stored in the queue file, so a running relay (every process of it)
sees them within a second and they survive restarts. None of these read secrets except
`accounts test`, which logs in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from relay.cli.common import EXIT_OK, EXIT_USAGE, fail, iso, load, open_queue, out
from relay.cli.filters import message_filter
from relay.cli.queue import bulk, bulk_options
from relay.cli.status import rate_limits, rate_use, recent_sends
from relay.config.schema import Config
from relay.queue.ops import MOVABLE, move_to
from relay.queue.types import MessageState


def _known(config: Config, name: str, key: str, *, group: bool = False) -> str | None:
    """None if ``name`` is an account (or, with ``group``, a group), else the problem."""
    if name in config.accounts or (group and name in config.routing.groups):
        return None
    members = config.routing.groups.get(name)
    if members is not None:
        return (f"{key}: {name!r} is a group (routing.groups): name one of its accounts"
                f" ({', '.join(members.accounts)})")
    groups = f"; groups: {', '.join(config.routing.groups)}" if group and \
        config.routing.groups else ""
    return (f"{key}: no account named {name!r} (accounts: {', '.join(config.accounts)}"
            f"{groups})")


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_paused(args, True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_paused(args, False)


def _set_paused(args: argparse.Namespace, paused: bool) -> int:
    config = load(args)
    problem = _known(config, args.name, "NAME")
    if problem:
        return fail(problem, EXIT_USAGE)

    async def run() -> None:
        store = await open_queue(config)
        try:
            await store.set_paused(args.name, paused, time.time())
        finally:
            await store.close()

    asyncio.run(run())
    if paused:
        out(f"paused {args.name}: new mail for it is queued, nothing is sent"
            f" (sends under way finish) until `relay accounts resume {args.name}`")
    else:
        out(f"resumed {args.name}: its queued mail is sent again")
    return EXIT_OK


def cmd_quota(args: argparse.Namespace) -> int:
    """What each rate-limited account has left in each window, from the sends recorded in
    the queue file (every process's), and when its next slot opens."""
    config = load(args)
    now = time.time()
    limited = rate_limits(config)

    async def run() -> dict[str, list[float]]:
        store = await open_queue(config)
        try:
            return await recent_sends(store, limited, now)
        finally:
            await store.close()

    sends = asyncio.run(run())
    use = {name: rate_use(wins, sends[name], now,
                          config.accounts[name].rate_limit.reserve_for_high)
           for name, wins in limited.items()}
    if args.json:
        print(json.dumps({"generated_at": iso(now), "accounts": use}, indent=2))
        return EXIT_OK
    for name in config.accounts:
        if name not in use:
            out(f"{name}: no rate limit")
            continue
        preset = config.accounts[name].preset
        out(f"{name}:" + (f" (preset {preset})" if preset else ""))
        for w in use[name]["windows"]:
            slot = "now" if w["next_slot_at"] is None else w["next_slot_at"]
            out(f"  {w['window']:<16}{w['remaining']:>7} left of {w['limit']:<7}"
                f" ({w['used']} used); next slot: {slot}")
            if "normal_limit" in w:  # what normal and low priority may still use
                slot = "now" if w["normal_next_slot_at"] is None else w["normal_next_slot_at"]
                out(f"  {'  normal/low':<16}{w['normal_remaining']:>7} left of"
                    f" {w['normal_limit']:<7} (the rest is reserved for high); next slot:"
                    f" {slot}")
        reserve = config.accounts[name].rate_limit.reserve_for_high
        if reserve:
            out(f"  ({reserve:.0%} of each window is kept for high-priority mail)")
    return EXIT_OK


def cmd_move(args: argparse.Namespace) -> int:
    """A bulk action (relay.cli.queue.bulk) with the account as its filter: count, ask,
    --dry-run, --yes as hold or delete do."""
    config = load(args)
    source, target = args.account, args.target
    if source == target:
        return fail("--from and --to name the same account", EXIT_USAGE)
    problem = _known(config, target, "--to", group=True)
    if problem:
        return fail(problem, EXIT_USAGE)
    try:
        match = message_filter(args)
    except ValueError as exc:
        return fail(f"queue move: {exc}", EXIT_USAGE)
    if match.states is None:  # held mail stays where it is unless asked for
        match = replace(match, states=frozenset({MessageState.QUEUED, MessageState.DEFERRED}))
    names = f"from {source} to {target}".replace("{", "{{").replace("}", "}}")
    code = bulk(args, move_to(target), match, "{n} {what}message(s) moved " + names)
    if code != EXIT_OK or args.dry_run:
        return code
    out("(each keeps its state and next attempt time; messages being sent right now are"
        " not moved)")

    async def paused() -> dict[str, float]:
        store = await open_queue(config)
        try:
            return await store.paused_accounts()
        finally:
            await store.close()

    if target in asyncio.run(paused()):
        out(f"note: {target} is paused; they wait until `relay accounts resume {target}`")
    return EXIT_OK


def add_commands(sub: Any, common: argparse.ArgumentParser,
                 test: Callable[[argparse.Namespace], int]) -> None:
    accounts = sub.add_parser("accounts", help="test, pause or resume upstream accounts")
    asub = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    p = asub.add_parser("test", parents=[common],
                        help="connect, TLS, AUTH and NOOP against one account")
    p.add_argument("name", metavar="NAME", help="the account's name under accounts:")
    p.set_defaults(func=test)
    p = asub.add_parser("quota", parents=[common],
                        help="what each account's rate limits have left, and the next slot")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_quota, needs_secrets=False)
    p = asub.add_parser("pause", parents=[common],
                        help="queue new mail for NAME but send nothing (persisted)")
    p.add_argument("name", metavar="NAME", help="the account to pause")
    p.set_defaults(func=cmd_pause, needs_secrets=False)
    p = asub.add_parser("resume", parents=[common], help="send NAME's mail again")
    p.add_argument("name", metavar="NAME", help="the paused account to resume")
    p.set_defaults(func=cmd_resume, needs_secrets=False)


def add_queue_commands(qsub: Any, common: argparse.ArgumentParser) -> None:
    p = qsub.add_parser("move", parents=[common],
                        help="re-route queued and deferred mail (held with --state held) from one"
                             " account to another, or to a group; each keeps its state and"
                             " due time")
    # --from is the account filter (dest "account"), so message_filter reads it as such.
    p.add_argument("--from", dest="account", required=True, metavar="ACCOUNT",
                   help="the account whose queued mail moves")
    p.add_argument("--to", dest="target", required=True, metavar="ACCOUNT|GROUP",
                   help="the account that sends it from now on")
    bulk_options(p, sorted(str(s) for s in MOVABLE), account=False)
    p.set_defaults(func=cmd_move)
