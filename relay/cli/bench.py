"""`relay bench`: its arguments. The benchmark itself (relay.bench) loads only when it runs,
so `relay serve` never imports it.
"""

from __future__ import annotations

import argparse
from typing import Any

from relay.cli.common import workers_arg


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure relay against bare aiosmtpd and Postfix",
        description="relay against a bare aiosmtpd server and Postfix, in one run on this machine.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 round, small counts: under a minute (figures are rough)",
    )
    p.add_argument("--rounds", type=int, help="rounds; medians are taken over them (3)")
    p.add_argument("--messages", type=int, help="messages per ingest/latency case (5000)")
    p.add_argument("--e2e-messages", type=int, help="messages per end-to-end case (20000)")
    p.add_argument(
        "--queued", type=int, help="messages queued for the RSS/start-up figures; 0 skips (100000)"
    )
    p.add_argument(
        "--delivered", type=int,
        help="delivered records kept for the /metrics and RSS figure; 0 skips (1000000)",
    )
    p.add_argument("--size", type=int, default=10_240, help="payload bytes (10240)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent senders (20)")
    p.add_argument("--load", choices=("auto", "smtp-source", "builtin"), default="auto",
                   help="load generator: Postfix's smtp-source, the built-in one, or auto"
                        " (smtp-source when installed)")
    p.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                   help="upstream sink: Postfix's smtp-sink, an aiosmtpd one, or auto"
                        " (smtp-sink when installed)")
    p.add_argument(
        "--no-postfix", dest="postfix", action="store_false", help="skip the Postfix baseline"
    )
    p.add_argument("--workers", metavar="N|auto", type=workers_arg,
                   help="workers of the `relay workers` column, beside 1-process `relay`"
                   " (default as `relay serve`: auto, one per usable CPU)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write JSON here")
    p.add_argument("--workdir", metavar="DIR", help="where queues go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep queue files and logs")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from relay.bench.run import cmd_bench

    return cmd_bench(args)
