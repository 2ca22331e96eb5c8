"""`relay sendmail` and the `sendmail` command (/usr/sbin/sendmail for cron, PHP's mail(),
git send-email, logwatch, mutt): a message on standard input, submitted to relay.

It submits over SMTP to the running relay's listener (loopback). If nothing listens
there (connection refused), it writes the message into the queue file itself, through
the listener's own checks, so that the next `relay serve` sends it. If neither works it
says why on stderr and exits 75 (EX_TEMPFAIL): the caller keeps the message. Exit codes
are sendmail's (sysexits.h), which its callers read. Pure parts: relay.smtp.sendmail
(the options) and relay.smtp.pickup (the message). See docs/sendmail.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import pwd
import smtplib
import socket
import sys
from collections.abc import Sequence
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import BinaryIO

from relay.cli import hangup
from relay.cli.common import open_queue, out
from relay.cli.peer import peer_uid
from relay.cli.submit import Unsafe, smtp_error, submit_smtp, write_queue
from relay.config.loading import load_config
from relay.config.schema import Config
from relay.errors import ConfigError, StoreError
from relay.ingest.addresses import parse_path
from relay.queue.filters import MessageFilter
from relay.queue.types import MessageState
from relay.smtp.pickup import (
    BadAddress,
    Local,
    NoRecipients,
    Prepared,
    input_lines,
    prepare,
)
from relay.smtp.sendmail import Invocation, Mode, UsageError, parse_argv

# sysexits.h, what sendmail's callers (cron, PHP, git) understand.
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT = 0, 64, 65, 66
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78
# Where the packaged service's config lives (config/relay.service, the Dockerfile): read
# when neither --config nor $RELAY_CONFIG says, as cron and PHP pass neither.
DEFAULT_CONFIG = Path("/etc/relay/relay.yaml")
USAGE = """usage: sendmail [options] [recipient ...]
  -t            recipients also from the To, Cc and Bcc fields (Bcc is removed)
  -f SENDER     envelope sender (-f '<>': none); default: your login name @ sendmail.domain
  -F NAME       the From display name, when the message has no From
  -i, -oi       a line with only a dot does not end the message
  -B 8BITMIME   the body has 8-bit text
  -bm           read a message and submit it (the default)
  -bp           list the queue (like mailq)
  -q            make every deferred message due now (relay queue flush)
  -v            say on stderr how the message was submitted
  --config FILE relay's config (default: $RELAY_CONFIG, else /etc/relay/relay.yaml)
  --read-recipients, --read-envelope-from
                as msmtp: -t, and the sender from the From field
Other sendmail options (-oem, -odi, -odb, -oQ..., -L, -N, -h, -G, -U...) are accepted and
ignored. Exit codes: 0 submitted, 64 usage, 65 bad message or address, 75 try again later,
77 the listener wants a login, 78 config error."""


class Refused(Exception):
    """Submission failed; ``code`` is the exit status, the text says why."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """The `sendmail` entry point (and `relay sendmail`): named `mailq` it lists the
    queue, named `newaliases` it does nothing, as Postfix's does."""
    hangup.release()
    prog = Path(sys.argv[0]).name if argv is None else "sendmail"
    # Started with standard input closed: an empty message, as from /dev/null.
    stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    return sendmail(sys.argv[1:] if argv is None else argv, stdin, prog=prog)


def sendmail(argv: Sequence[str], stdin: BinaryIO, *, prog: str = "sendmail") -> int:
    """Do what ``argv`` asks with the message on ``stdin``; the exit code."""
    try:
        return run(parse_argv(argv, prog=prog), stdin)
    except UsageError as exc:
        return _fail(f"{exc} (sendmail --help lists the options)", EX_USAGE)
    except Refused as exc:
        return _fail(str(exc), exc.code)
    except ConfigError as exc:
        for problem in exc.problems:
            out(f"sendmail: config error: {problem}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return _fail("interrupted: nothing was submitted", EX_TEMPFAIL)


def _fail(text: str, code: int) -> int:
    out(f"sendmail: {text}", file=sys.stderr)
    return code


def config_path(invocation: Invocation) -> str | None:
    """--config, else $RELAY_CONFIG, else /etc/relay/relay.yaml if there is one, else
    None (the built-in defaults)."""
    if invocation.config or os.environ.get("RELAY_CONFIG"):
        path = invocation.config or os.environ["RELAY_CONFIG"]
        _trusted_config(path, "--config" if invocation.config else "RELAY_CONFIG")
        return path
    return str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None


def _trusted_config(path: str, via: str) -> None:
    """A config other than the default one is read only if root or the caller owns it and
    other users cannot write it (as Postfix's sendmail -C): the config says which file is
    the password and where it goes, and callers such as PHP's mail() let a web visitor
    add options. Refused (78) otherwise, naming why."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Refused(EX_CONFIG, f"{via} {path}: {exc.strerror}") from None
    if st.st_uid not in (0, os.getuid()):
        raise Refused(EX_CONFIG, f"{via} {path}: owned by {_user(st.st_uid)}: sendmail"
                      " reads only a config owned by root or by its caller")
    if st.st_mode & 0o002:
        raise Refused(EX_CONFIG, f"{via} {path}: writable by every user: sendmail will"
                      " not read it")


def run(invocation: Invocation, stdin: BinaryIO) -> int:
    if invocation.help:
        print(USAGE)
        return EX_OK
    if invocation.mode is Mode.NOTHING:
        return EX_OK
    path = config_path(invocation)
    if invocation.mode in (Mode.LIST, Mode.FLUSH):
        return _queue_command(invocation, path)
    config = load_config(path, secrets=False)  # not the service's secrets: any user runs it
    prepared, options = _message(invocation, config, stdin)
    return _submit(invocation, config, prepared, options)


def _queue_command(invocation: Invocation, path: str | None) -> int:
    """-bp (mailq) and -q: `relay queue list` of the mail not yet delivered, or
    "Mail queue is empty" as Postfix's mailq says (scripts look for it); `relay queue
    flush`."""
    from relay.cli.commands import main as relay_main

    config = ["--config", path] if path else []
    if invocation.mode is Mode.FLUSH:
        return relay_main(["queue", "flush", *config])
    try:
        waiting = asyncio.run(_count_waiting(load_config(path, secrets=False)))
    except StoreError as exc:
        raise Refused(EX_TEMPFAIL, str(exc)) from None
    if not waiting:
        out("Mail queue is empty")
        return EX_OK
    states = [arg for state in WAITING for arg in ("--state", state)]
    return relay_main(["queue", "list", *states, *config])


WAITING = ("queued", "deferred", "sending", "held")  # what mailq lists: not yet delivered


async def _count_waiting(config: Config) -> int:
    store = await open_queue(config)
    try:
        return await store.count_messages(MessageFilter(
            states=frozenset(MessageState(s) for s in WAITING)))
    finally:
        await store.close()


def _message(invocation: Invocation, config: Config, stdin: BinaryIO
             ) -> tuple[Prepared, list[str]]:
    """The envelope and bytes to submit, and the MAIL options they need."""
    limit = config.listen.max_message_size
    try:  # CRLF line ends may double the size: anything more is too big either way
        raw = read_input(stdin, 2 * limit + 1, dots_end_input=invocation.dots_end_input)
    except OSError as exc:
        raise Refused(EX_NOINPUT, f"cannot read the message: {exc.strerror or exc}"
                      ) from None
    domain = (config.sendmail.domain or config.hostname or socket.getfqdn()).strip("[]")
    login = _login()
    local = Local(login=login, domain=domain, date=formatdate(localtime=True),
                  message_id=make_msgid(domain=domain),
                  full_name=_text(invocation.full_name) or _full_name(),
                  admin_address=config.sendmail.admin_address)
    for word in (invocation.sender or "", *invocation.recipients):
        _check_utf8("sender" if word == invocation.sender else "recipient", word)
    try:
        prepared = prepare(input_lines(raw, dots_end_input=invocation.dots_end_input),
                           sender=invocation.sender, arguments=invocation.recipients,
                           extract=invocation.extract, local=local,
                           sender_from_header=invocation.sender_from_header)
    except NoRecipients as exc:
        raise Refused(EX_USAGE, str(exc)) from None
    except BadAddress as exc:
        raise Refused(EX_DATAERR, str(exc)) from None
    for role, address in [("sender", prepared.sender),
                          *(("recipient", r) for r in prepared.recipients)]:
        _check_utf8(role, address)
        if address and parse_path(f"<{address}>") is None:
            raise Refused(EX_DATAERR, f"bad {role} address {address!r}")
    if len(raw) > 2 * limit or len(prepared.data) > limit:
        raise Refused(EX_DATAERR, f"the message is larger than listen.max_message_size"
                      f" ({limit} bytes)")
    options = []
    if invocation.body_type == "8BITMIME" or not prepared.data.isascii():
        options.append("BODY=8BITMIME")  # RFC 6152
    if not all(a.isascii() for a in (prepared.sender, *prepared.recipients)):
        options.append("SMTPUTF8")  # RFC 6531
    return prepared, options


def _text(arg: str | None) -> str | None:
    """A command-line word as text: its bytes as UTF-8, else as Latin-1 (what an old
    locale's -F name is) rather than undecodable bytes."""
    if arg is None or _is_utf8(arg):
        return arg
    raw = os.fsencode(arg)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: bytes the locale's codec could not decode
        return False
    return True


def _check_utf8(role: str, address: str) -> None:
    """Bytes the locale could not decode (Latin-1, say) are no address: 65, not a
    traceback. Beyond ASCII, an address is UTF-8 and goes with SMTPUTF8 (RFC 6531)."""
    if not _is_utf8(address):
        raise Refused(EX_DATAERR, f"bad {role} address {os.fsencode(address)!r}: not"
                      " UTF-8 (an address beyond ASCII must be UTF-8, RFC 6531)")


def read_input(stdin: BinaryIO, limit: int, *, dots_end_input: bool) -> bytes:
    """At most ``limit`` bytes of standard input: up to its end, or (without -i) up to a
    line with only a dot, read no further: a caller may write the dot and wait for
    sendmail to exit before it closes the pipe."""
    if not dots_end_input:
        return stdin.read(limit)
    lines: list[bytes] = []
    size = 0
    while size < limit:
        line = stdin.readline(limit - size)
        if not line or line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def _login() -> str:
    """The user's login name, from the uid (not $USER, which the caller sets)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers, DynamicUser)
        return f"uid{os.getuid()}"


def _full_name() -> str | None:
    """The user's name from the passwd comment field, as Postfix's sendmail takes it."""
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].strip() or None
    return None


def _submit(invocation: Invocation, config: Config, prepared: Prepared,
            options: list[str]) -> int:
    """The message in as many transactions as listen.max_recipients asks (RFC 5321
    3.3, 4.5.3.1.8: more recipients than a server takes go in another transaction),
    each one with its share of the recipients; stops at the first refusal."""
    limit = config.listen.max_recipients
    recipients = prepared.recipients
    done = 0
    for start in range(0, len(recipients), limit):
        batch = dataclasses.replace(prepared, recipients=recipients[start:start + limit])
        try:
            reply, how = _submit_one(config, batch, options)
        except Refused as exc:
            raise Refused(exc.code, _partly(str(exc), done, len(recipients))) from None
        code = _exit_code(reply)
        if code != EX_OK:
            raise Refused(code, _partly(f"relay refused the message: {reply}", done,
                                        len(recipients)))
        done += len(batch.recipients)
        if invocation.verbose:
            out(f"sendmail: {reply} ({how})", file=sys.stderr)
    return EX_OK


def _partly(text: str, done: int, total: int) -> str:
    """A refusal after some transactions went through: say so, as a retry sends those
    recipients the message again."""
    if not done:
        return text
    return (f"{text} (after relay took the message for the first {done} of {total}"
            " recipients, in transactions of listen.max_recipients)")


def _submit_one(config: Config, prepared: Prepared, options: list[str]) -> tuple[str, str]:
    """One transaction: over SMTP, else (nothing listening) into the queue file; the
    reply, and how it went."""
    host, port = _listener(config)
    login = _credentials(config)
    anchor = config.listen.tls.cert if config.listen.tls is not None else None
    try:
        reply = submit_smtp(host, port, prepared, options, login,
                            peer=lambda sock: _vet_listener(config, sock, host, port),
                            anchor=anchor)
        return reply, f"over SMTP to {host}:{port}"
    except Unsafe as exc:
        raise Refused(EX_TEMPFAIL, f"{exc}; nothing was sent") from None
    except ConnectionRefusedError:
        try:
            reply = asyncio.run(write_queue(config, prepared, options))
        except (StoreError, OSError) as exc:
            raise Refused(EX_TEMPFAIL, f"no relay is listening on {host}:{port}, and the"
                          f" queue cannot be written: {exc}") from None
        return reply, f"into {config.queue.path} (no relay is listening on {host}:{port})"
    except (OSError, smtplib.SMTPException) as exc:
        raise Refused(EX_TEMPFAIL, f"cannot submit to relay on {host}:{port}: "
                      f"{smtp_error(exc)}") from None


def _vet_listener(config: Config, sock: socket.socket, host: str, port: int) -> bool:
    """True if the kernel says the listener is relay's (run by root, by this user, or
    by the queue file's owner), False if it cannot say; Unsafe if it is someone else's:
    a user squatting the port while relay is down."""
    uid = peer_uid(sock)
    if uid is None:
        return False
    if uid in _relay_uids(config):
        return True
    raise Unsafe(f"{host}:{port} is held by {_user(uid)}, not by relay's user"
                 f" (sendmail.listener_user, {config.sendmail.listener_user!r}, or the"
                 f" owner of {config.queue.path})")


def _relay_uids(config: Config) -> set[int]:
    """Who may run the listener sendmail talks to."""
    uids = {0, os.getuid()}
    with contextlib.suppress(OSError):  # a queue folder closed to the caller: unseen
        uids.add(config.queue.path.stat().st_uid)
    user = config.sendmail.listener_user
    if user.isdigit():
        uids.add(int(user))
    else:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(user).pw_uid)
    return uids


def _user(uid: int) -> str:
    with contextlib.suppress(KeyError):
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    return f"uid {uid}"


def _credentials(config: Config) -> tuple[str, str] | None:
    """sendmail.username and the password in sendmail.password_file, if set."""
    user, path = config.sendmail.username, config.sendmail.password_file
    if user is None or path is None:
        return None
    try:
        return user, path.read_text().strip()
    except OSError as exc:
        raise Refused(EX_NOPERM, f"cannot read sendmail.password_file {path}:"
                      f" {exc.strerror}") from None


def _listener(config: Config) -> tuple[str, int]:
    """Where to reach the listener: its own address, loopback for a wildcard."""
    host = config.listen.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, config.listen.port


def _exit_code(reply: str) -> int:
    if reply.startswith("2"):
        return EX_OK
    if reply.startswith(("530", "535", "538")):  # RFC 4954: a login is needed
        return EX_NOPERM
    return EX_TEMPFAIL if reply.startswith("4") else EX_DATAERR
