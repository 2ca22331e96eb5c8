"""The two ways `relay sendmail` hands a message to relay: one SMTP transaction with the
running relay's listener, or, with nothing listening, the listener's own handler writing
into the queue file (as the queue file's owner when run as root).
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from relay.cli.common import open_queue
from relay.config.schema import Config, is_loopback
from relay.errors import StoreError
from relay.ingest.local import local_handler, submit_local
from relay.smtp.pickup import Prepared

SUBMIT_TIMEOUT_S = 60.0  # each SMTP step; the listener answers DATA after its commit


def smtp_error(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return f"{exc.smtp_code} {text}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Unsafe(Exception):
    """Nothing was sent: the listener is not provably relay's; the text says why."""


# The listener's owner, given the connected socket: True (relay's), False (unknown: not
# Linux, not loopback); raises Unsafe for another user's.
PeerCheck = Callable[[socket.socket], bool]


def submit_smtp(host: str, port: int, prepared: Prepared, options: list[str],
                login: tuple[str, str] | None = None, *, peer: PeerCheck | None = None,
                anchor: Path | None = None) -> str:
    """One SMTP transaction; the reply that ended it. A refused recipient ends it before
    DATA (RSET): the message goes to all of its recipients or to none.

    ``peer`` is asked who owns the listener before anything is sent. The password goes
    only to a listener it vouches for, or over STARTTLS verified against ``anchor`` (the
    listener's own certificate, listen.tls.cert) or, off loopback, the system's CAs."""
    with smtplib.SMTP(host, port, local_hostname="localhost",
                      timeout=SUBMIT_TIMEOUT_S) as smtp:  # greeted; nothing sent yet
        known = peer(smtp.sock) if peer is not None and smtp.sock is not None else False
        smtp.ehlo()
        if login is not None:
            if smtp.has_extn("starttls"):  # AUTH waits for TLS then
                smtp.starttls(context=_tls_context(host, None if known else anchor,
                                                   verify=not known))
                smtp.ehlo()
            elif not known:
                raise Unsafe(f"will not send sendmail.username's password to {host}:{port}:"
                             " its owner cannot be checked and it offers no STARTTLS")
            try:
                smtp.login(*login)
            except smtplib.SMTPAuthenticationError as exc:
                return smtp_error(exc)
        code, text = smtp.mail(prepared.sender, options)
        for recipient in prepared.recipients:
            if code >= 300:
                break
            code, text = smtp.rcpt(recipient)
        if code >= 300:
            smtp.rset()
            return f"{code} {text.decode('utf-8', 'replace')}"
        code, text = smtp.data(prepared.data)
        return f"{code} {text.decode('utf-8', 'replace')}"


def _tls_context(host: str, anchor: Path | None, *, verify: bool) -> ssl.SSLContext:
    """``verify``: the certificate must chain to ``anchor`` (on loopback, where the
    listener's certificate names other hosts, its name is not checked) or, off loopback,
    to the system's CAs for ``host``. Else (a listener whose owner was checked) verified
    except on loopback, where a connection never leaves the machine."""
    loopback = is_loopback(host)
    if not verify:
        context = ssl.create_default_context()
        if loopback:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
    if loopback and anchor is None:
        raise Unsafe(f"will not send sendmail.username's password to {host}: the"
                     " listener's owner cannot be checked and listen.tls.cert is not set"
                     " to verify it with")
    try:
        context = ssl.create_default_context(cafile=str(anchor) if anchor else None)
    except OSError as exc:
        raise Unsafe(f"cannot read listen.tls.cert {anchor} to verify the listener:"
                     f" {exc.strerror}") from None
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the listener's own cert
    context.check_hostname = not loopback
    return context


async def write_queue(config: Config, prepared: Prepared, options: list[str]) -> str:
    """No relay listening: the message into the queue file, as the listener would store
    it; the listener's reply. Only into a queue a `relay serve` has made: a new file
    where nothing serves would hold mail that nobody sends."""
    path = config.queue.path
    if not path.exists():
        raise StoreError(f"there is no queue at {path} (has `relay serve` run with this"
                         " config?)")
    user = config.sendmail.username
    if config.listen.auth.required and user is None:  # what the listener would answer
        return "530 5.7.0 Authentication required (listen.auth.required: set sendmail.username)"
    _become_owner(path)
    # The handler logs each message as the server does; here, only problems matter.
    logging.getLogger("relay").setLevel(logging.ERROR)
    store = await open_queue(config)
    try:
        return await submit_local(local_handler(config, store, user), prepared.sender,
                                  prepared.recipients, prepared.data, options, user)
    finally:
        await store.close()


def _become_owner(path: Path) -> None:
    """Run as root (a root crontab), write as the queue's owner: files that the store
    creates beside the queue must stay the service's, or it could not open its own queue,
    and that owner may have planted symlinks there that root would follow. Where the
    owner cannot reach the file from here (systemd's DynamicUser keeps it under
    /var/lib/private, which only the unit's namespace opens), nothing is written: root
    writing into a folder another user controls could create files anywhere."""
    if os.geteuid() != 0:
        return
    # Whoever controls the file or its folder (a symlink's own owner, not its target's).
    st = next((s for s in (path.lstat(), path.parent.stat()) if s.st_uid != 0), None)
    if st is None:
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    if not (os.access(path, os.R_OK | os.W_OK, effective_ids=True)
            and os.access(path.parent, os.W_OK | os.X_OK, effective_ids=True)):
        os.seteuid(0)
        os.setegid(0)
        raise StoreError(f"as root, sendmail writes {path} only as its owner (uid"
                         f" {st.st_uid}), who cannot reach it from here; nothing was written")
