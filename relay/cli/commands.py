"""Command line: `relay serve`, `relay check-config`, `relay queue ...`, `relay accounts test`.

argparse (standard library): subcommands, help and exit codes without a dependency.
Exit codes: 0 ok, 1 runtime failure (queue locked, port in use), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from relay import __version__
from relay.cli import hangup
from relay.cli.common import EXIT_OK, EXIT_USAGE, fail, load, out
from relay.config.loading import load_config
from relay.config.report import config_warnings, effective_config
from relay.config.schema import Config
from relay.errors import ConfigError, RelayError
from relay.runner import run

if TYPE_CHECKING:
    from relay.app import App

def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.app import check_startable

    config = load(args)
    check_startable(config)  # what serve would refuse only as it starts
    for warning in config_warnings(config):
        out(f"warning: {warning}", file=sys.stderr)
    print(yaml.safe_dump(effective_config(config, socket.getfqdn()), sort_keys=False), end="")
    return EXIT_OK


class Reloads:
    """SIGHUP for a running App: one reload task per signal; a signal before the start
    has finished is held until it has; none once the shutdown has begun."""

    def __init__(self, app: App, path: str | None) -> None:
        self.app = app
        self.path = path
        self.held = False
        self.tasks: set[asyncio.Task[None]] = set()

    def on_hangup(self) -> None:
        if self.app.stopping:  # a reload now would only race the shutdown
            return
        if not self.app.started:
            self.held = True
            return
        task = asyncio.create_task(_reload(self.app, self.path))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def started(self) -> None:
        """The start has finished: apply a SIGHUP held meanwhile."""
        if self.held:
            self.held = False
            self.on_hangup()

    async def cancel(self) -> None:
        """Before the shutdown: a reload switches nothing until its last await."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _serve(config: Config, path: str | None) -> None:
    from relay.app import App

    app = App(config)
    loop = asyncio.get_running_loop()
    reloads = Reloads(app, path)
    # Before startup: a supervisor may send SIGTERM as soon as it sees the 'started' line.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reloads.on_hangup)
    reloads.held = hangup.taken()  # one that came while the command was still loading
    try:
        await app.startup()
        reloads.started()
        await app.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # exiting: a late SIGHUP is not fatal
        await reloads.cancel()
        await app.shutdown(grace=5.0)


async def _reload(app: App, path: str | None) -> None:
    """SIGHUP: read the config again; one that is invalid or cannot be applied leaves the
    running one in place (logging included). Never raises: an exception left in the task
    would be logged by asyncio with its arguments, which may quote the file's secrets."""
    log = logging.getLogger("relay")
    try:
        await _reload_now(app, path, log)
    except Exception as exc:  # a bug: the type only, never the exception's text
        _rejected(log, [f"reload failed: internal error ({type(exc).__name__})"])


async def _reload_now(app: App, path: str | None, log: logging.Logger) -> None:
    from relay.observe.logs import build_handler, event, install_handler

    try:
        new = load_config(path)
        handler = build_handler(new.logging.format, new.logging.file)
    except ConfigError as exc:
        _rejected(log, exc.problems)
        return
    try:
        notes = await app.reload(new)
    except ConfigError as exc:
        handler.close()
        _rejected(log, exc.problems)
        return
    except Exception as exc:  # e.g. the queue file, read for new rate windows
        handler.close()
        _rejected(log, [f"cannot apply the new config: {exc}"])
        return
    install_handler(handler, new.logging.level)
    for note in notes:
        event(log, logging.WARNING, "reload_note", reason=note)


def _rejected(log: logging.Logger, problems: list[str]) -> None:
    from relay.observe.logs import event

    for problem in problems:
        event(log, logging.ERROR, "reload_rejected", reason=problem)
    event(log, logging.ERROR, "reload_rejected",
          reason="the new config is invalid; still running with the previous one")


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.observe.logs import setup_logging

    config = load(args)
    setup_logging(config.logging.level, config.logging.format, config.logging.file)
    try:
        run(_serve(config, args.config or os.environ.get("RELAY_CONFIG") or None))
    except OSError as exc:
        return fail(f"cannot listen: {exc.strerror or exc}")
    return EXIT_OK


def cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from relay.ingest.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            return fail("the two passwords differ", EXIT_USAGE)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        return fail("empty password", EXIT_USAGE)
    out(hash_password(password))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A local SMTP relay for applications: accepts mail on localhost, queues it"
        " durably, delivers it through pooled upstream accounts.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE",
                        help="YAML config file (default: $RELAY_CONFIG, else built-in defaults)")

    p = sub.add_parser("serve", parents=[common], help="run the relay")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate the config and print it with secrets masked")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-password",
                       help="print an argon2 hash for listen.auth.users.NAME.password_hash")
    p.set_defaults(func=cmd_hash_password)

    from relay.cli import queue as cli_queue

    cli_queue.add_commands(sub, common)
    from relay.cli import status as cli_status

    cli_status.add_command(sub, common)
    from relay.cli import bench

    bench.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is not cmd_serve:
        hangup.release()
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            out(f"config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except RelayError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return code
