"""Command line: `relay serve`, `relay check-config`, `relay queue ...`, `relay accounts test`.

argparse (standard library): subcommands, help and exit codes without a dependency.
Exit codes: 0 ok, 1 runtime failure (queue locked, port in use), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
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
from relay.cli.common import (
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    config_path,
    discard_stdout,
    fail,
    out,
    workers_arg,
)
from relay.config.loading import load_config_report
from relay.config.report import config_warnings, effective_config, unresolved_secrets
from relay.config.schema import Config, resolve_workers
from relay.errors import ConfigError, RelayError
from relay.runner import run

if TYPE_CHECKING:
    from relay.app import App, WorkerRole

def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate without the service's secrets (an admin's shell rarely has them): the
    ones not resolvable here are named, and do not fail the check."""
    path = config_path(args)
    config, sources, from_environment, unresolved = load_config_report(path, secrets=False)
    from relay.app import check_startable

    check_startable(config)  # what serve would refuse only as it starts
    for warning in config_warnings(config, from_environment):
        out(f"warning: {warning}", file=sys.stderr)
    named = {note.partition(": ")[0] for note in unresolved}
    for problem in [*unresolved, *(p for p in unresolved_secrets(config)
                                   if p.partition(": ")[0] not in named)]:
        out(f"note: {problem} ({_who_reads(problem)} read it)", file=sys.stderr)
    print(yaml.safe_dump(effective_config(config, socket.getfqdn()), sort_keys=False), end="")
    # As YAML comments, so that the output stays a config file one can save and reuse.
    out("# Where each value came from (keys not listed are defaults):")
    out(*(f"#   {key}: {origin}" for key, origin in sorted(sources.items())))
    return EXIT_OK


def _who_reads(problem: str) -> str:
    """The commands that need an unresolved secret: the queue's password is read by every
    command that opens a PostgreSQL queue, the others only by the two that connect."""
    if problem.startswith("queue."):
        return "`relay serve` and the commands that open the queue"
    return "only `relay serve` and `relay accounts test`"


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


async def _orphaned(app: App, parent: int) -> None:
    """A worker whose supervisor died (SIGKILL) stops as if told to: nobody would restart
    it, stop it, or forward a reload to it, and it would keep the port."""
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells a parent has died)
        await asyncio.sleep(1.0)
    app.request_stop()


async def _serve(config: Config, path: str | None, *, role: WorkerRole | None = None,
                 ready_fd: int | None = None, parent: int | None = None,
                 from_environment: frozenset[str] = frozenset()) -> None:
    from relay.app import App

    app = App(config, worker=role, from_environment=from_environment)
    watch = None if parent is None else asyncio.create_task(_orphaned(app, parent))
    loop = asyncio.get_running_loop()
    reloads = Reloads(app, path)
    # Before startup: a supervisor may send SIGTERM as soon as it sees the 'started' line.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reloads.on_hangup)
    reloads.held = hangup.taken()  # one that came while the command was still loading
    try:
        await app.startup()
        if ready_fd is not None:  # tell the supervisor this worker serves
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        reloads.started()
        await app.serve()
    finally:
        if watch is not None:
            watch.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # exiting: a late SIGHUP is not fatal
        await reloads.cancel()
        await app.shutdown()  # shutdown.grace, as reloaded


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
        new, _, from_environment, _ = load_config_report(path)
        new = _as_worker(new)  # as this process runs it: compare like with like
        handler = build_handler(new.logging.format, new.logging.file)
    except ConfigError as exc:
        _rejected(log, exc.problems)
        return
    try:
        notes = await app.reload(new, from_environment)
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
    from relay.observe.logs import event, setup_logging
    from relay.supervisors.multiprocess import ENV_INDEX, Supervisor, can_share_port

    path = config_path(args)
    # Where each value came from too: a password a variable gave is no literal (warnings).
    config, _, from_environment, _ = load_config_report(path)
    setup_logging(config.logging.level, config.logging.format, config.logging.file)
    if getattr(args, "migrate", False) and os.environ.get(ENV_INDEX) is None:
        _migrate_before_serving(config)
    count = resolve_workers(args.workers or config.workers)
    if count > 1 and not can_share_port():
        event(logging.getLogger("relay"), logging.WARNING, "workers_unavailable",
              reason="this platform has no SO_REUSEPORT: running one process")
        count = 1
    try:
        if os.environ.get(ENV_INDEX) is not None:  # one worker of `relay serve --workers`
            run(_serve_worker(config, path, from_environment))
        elif count > 1:
            return run(Supervisor(config, path, count).run())
        else:
            run(_serve(config, path, from_environment=from_environment))
    except OSError as exc:
        return fail(f"cannot listen: {exc.strerror or exc}")
    return EXIT_OK


def _migrate_before_serving(config: Config) -> None:
    """`relay serve --migrate`: what `relay queue migrate` does (backup included), logged;
    the start goes on only once the queue is at this relay's schema."""
    from relay.cli.common import migrate_queue
    from relay.config.report import queue_name
    from relay.observe.logs import event

    log = logging.getLogger("relay")
    try:
        done = asyncio.run(migrate_queue(config, backup=True))
    except RelayError as exc:
        event(log, logging.ERROR, "start_failed", reason=str(exc))
        raise
    if done.applied:
        event(log, logging.INFO, "queue_migrated", queue=queue_name(config),
              schema_from=done.plan.found, schema_to=done.applied[-1],
              applied=",".join(map(str, done.applied)),
              backup=str(done.backup) if done.backup else None)


def _as_worker(config: Config) -> Config:
    """The config as this worker process runs it: its parent's port, metrics only in
    worker 0. A reload compares the new file's config in the same form, or every SIGHUP
    would note a "change" the worker itself made."""
    from relay.supervisors.multiprocess import ENV_INDEX, ENV_PORT

    if ENV_INDEX not in os.environ:
        return config
    listen = config.listen.model_copy(update={"port": int(os.environ[ENV_PORT])})
    update: dict[str, object] = {"listen": listen}
    if int(os.environ[ENV_INDEX]):
        update["metrics"] = config.metrics.model_copy(update={"enabled": False})
    return config.model_copy(update=update)


async def _serve_worker(config: Config, path: str | None,
                        from_environment: frozenset[str] = frozenset()) -> None:
    """One of several processes: the port its parent chose, metrics only in worker 0
    (see relay.app.WorkerRole), and one byte on the ready pipe once serving."""
    from relay.app import WorkerRole
    from relay.supervisors.multiprocess import ENV_COUNT, ENV_INDEX, ENV_READY

    index = int(os.environ[ENV_INDEX])
    ready = int(os.environ[ENV_READY])
    await _serve(_as_worker(config), path,
                 role=WorkerRole(shared=True, index=index,
                                 count=int(os.environ[ENV_COUNT])),
                 ready_fd=ready,
                 parent=os.getppid(),
                 from_environment=from_environment)


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
    p.add_argument("--workers", metavar="N|auto", type=workers_arg,
                   help="worker processes on the one port and queue (default: config"
                   " `workers`, auto: one per usable CPU; 1: a single process)")
    p.add_argument("--migrate", action="store_true",
                   help="bring an older queue to this relay's schema first (after a backup"
                   " beside it), as `relay queue migrate` does")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate the config and print it with secrets masked")
    p.set_defaults(func=cmd_check_config, needs_secrets=False)

    p = sub.add_parser("hash-password",
                       help="print an argon2 hash for listen.auth.users.NAME.password_hash")
    p.set_defaults(func=cmd_hash_password)

    from relay.cli import queue as cli_queue

    cli_queue.add_commands(sub, common)
    from relay.cli import status as cli_status

    cli_status.add_command(sub, common)
    from relay.cli import route as cli_route

    cli_route.add_command(sub, common)
    from relay.cli import bench

    bench.add_command(sub)
    # Listed for --help only: main() hands `relay sendmail ...` over before argparse,
    # whose option syntax is not sendmail's (-FCronDaemon, -oi, -t).
    sub.add_parser("sendmail", add_help=False,
                   help="submit a message on stdin, as /usr/sbin/sendmail (see"
                   " `relay sendmail --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else list(argv)
    if args_given[:1] == ["sendmail"]:
        from relay.cli import sendmail

        return sendmail.main(args_given[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is not cmd_serve:
        hangup.release()
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`relay queue list | head`): stop quietly, as cat does.
        return _reader_gone()
    except ConfigError as exc:
        for problem in exc.problems:
            out(f"config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except RelayError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return code


def _reader_gone() -> int:
    """Exit code after a closed pipe (what is still buffered for it goes nowhere)."""
    discard_stdout()
    return EXIT_PIPE
