"""The two ways `relay sendmail` hands a message to relay: one SMTP transaction with the
running relay's listener, or, with nothing listening, the listener's own handler writing
into the queue file (as the queue file's owner when run as root).
"""

from __future__ import annotations

import glob
import logging
import os
import smtplib
import ssl
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


def submit_smtp(host: str, port: int, prepared: Prepared, options: list[str],
                login: tuple[str, str] | None = None) -> str:
    """One SMTP transaction; the reply that ended it. A refused recipient ends it before
    DATA (RSET): the message goes to all of its recipients or to none."""
    with smtplib.SMTP(host, port, local_hostname="localhost",
                      timeout=SUBMIT_TIMEOUT_S) as smtp:
        smtp.ehlo()
        if login is not None and smtp.has_extn("starttls"):  # AUTH waits for TLS then
            smtp.starttls(context=_tls_context(host))
            smtp.ehlo()
        if login is not None:
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


def _tls_context(host: str) -> ssl.SSLContext:
    """Verified, except on loopback: the listener's certificate is for the names other
    hosts use, and a connection that never leaves the machine has nobody in between."""
    context = ssl.create_default_context()
    if is_loopback(host):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
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
        _give_back(path)


def _become_owner(path: Path) -> None:
    """Run as root (a root crontab), write as the queue's owner where it can: files that
    the store creates beside the queue must stay the service's, or it could not open its
    own queue. Where the owner cannot reach the file from here (systemd's DynamicUser
    keeps it under /var/lib/private, which only the unit's namespace opens), root writes,
    and SQLite gives the files it creates (-wal, -shm) the queue file's owner."""
    if os.geteuid() != 0:
        return
    st = path.stat()
    if st.st_uid == 0:
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    if not (os.access(path, os.R_OK | os.W_OK, effective_ids=True)
            and os.access(path.parent, os.W_OK | os.X_OK, effective_ids=True)):
        os.seteuid(0)
        os.setegid(0)


def _give_back(path: Path) -> None:
    """Still root (_become_owner could not switch): what the store created beside the
    queue file (its lock files, the owners' folder) goes to the queue file's owner."""
    if os.geteuid() != 0:
        return
    st = path.stat()
    if st.st_uid == 0:
        return
    for beside in path.parent.glob(glob.escape(path.name) + "?*"):
        if beside.lstat().st_uid == 0:
            os.lchown(beside, st.st_uid, st.st_gid)
