"""SMTP upstream accounts: a pool of authenticated aiosmtplib connections per account.

This is the only module that imports aiosmtplib, and ``map_smtp_error`` is the one place
its exceptions become relay's TemporaryFailure / PermanentFailure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from relay.config import AccountConfig
from relay.errors import DeliveryError, PermanentFailure, TemporaryFailure
from relay.transport import SendResult

log = logging.getLogger("relay.upstream")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
# Reuse a connection without a NOOP only if it was used this recently.
NOOP_AFTER_IDLE_S = 5.0


def _split_enhanced(text: str) -> tuple[str | None, str]:
    match = _ENHANCED.match(text)
    if match:
        return match.group(1), text[match.end() :]
    return None, text


def map_smtp_error(exc: BaseException, *, connecting: bool = False) -> DeliveryError:
    """Translate an aiosmtplib or socket error: 4xx/timeouts/disconnects are temporary."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        enhanced, text = _split_enhanced(exc.message)
        account_wide = connecting or isinstance(
            exc, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPConnectResponseError
        )
        cls = PermanentFailure if 500 <= exc.code < 600 and not account_wide else TemporaryFailure
        return cls(text or "no text", code=exc.code, enhanced=enhanced, account_wide=account_wide)
    if isinstance(exc, ssl.SSLError):
        return TemporaryFailure(f"TLS failure: {exc.reason or exc}", account_wide=True)
    # aiosmtplib wraps a failed DNS lookup in its own connect error; look at the cause.
    cause = exc if isinstance(exc, socket.gaierror) else exc.__cause__
    if isinstance(cause, socket.gaierror):
        return TemporaryFailure(f"DNS lookup failed: {cause.strerror}", account_wide=True)
    if isinstance(exc, TimeoutError):
        return TemporaryFailure("timed out waiting for the upstream", account_wide=connecting)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return TemporaryFailure(f"upstream lacks a required extension: {exc}", account_wide=True)
    if isinstance(exc, ConnectionError | OSError | aiosmtplib.SMTPException):
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return TemporaryFailure(f"connection failed: {text}", account_wide=connecting)
    return TemporaryFailure(f"unexpected error: {type(exc).__name__}")


@dataclass(eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None


class UpstreamPool:
    """At most pool.max_connections connections to one account, reused between messages."""

    def __init__(
        self,
        name: str,
        account: AccountConfig,
        *,
        local_hostname: str | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.account = account
        self._local_hostname = local_hostname or socket.gethostname()
        self._on_connect = on_connect
        self._limit = asyncio.Semaphore(account.pool.max_connections)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closing: set[asyncio.Task[None]] = set()  # QUITs under way, kept referenced
        self._closed = False

    @property
    def peer(self) -> str:
        return f"{self.account.host}:{self.account.effective_port}"

    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    async def _connect(self) -> _Connection:
        acc = self.account
        client = aiosmtplib.SMTP(
            hostname=acc.host,
            port=acc.effective_port,
            use_tls=acc.tls == "implicit",
            start_tls=acc.tls == "starttls",  # required, never opportunistic
            validate_certs=acc.tls_verify,
            timeout=acc.timeouts.command,
            local_hostname=self._local_hostname,
        )
        try:
            await client.connect(timeout=acc.timeouts.connect)
            if self._on_connect:
                self._on_connect()
            # connect() skips EHLO when there is no login; the extension checks need it.
            if client.is_ehlo_or_helo_needed:
                await client.ehlo(timeout=acc.timeouts.command)
            if acc.username:
                await client.login(acc.username, acc.secret or "", timeout=acc.timeouts.command)
        except BaseException as exc:
            client.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_smtp_error(exc, connecting=True) from None
        return _Connection(client)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A live connection, and whether it was reused from the pool."""
        while self._idle:
            conn = self._idle.pop()
            if conn.expiry:
                conn.expiry.cancel()
            if not conn.client.is_connected:
                conn.client.close()
                continue
            if time.monotonic() - conn.last_used > NOOP_AFTER_IDLE_S:
                try:
                    await conn.client.noop(timeout=self.account.timeouts.command)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    conn.client.close()
                    continue
            return conn, True
        return await self._connect(), False

    def _release(self, conn: _Connection, healthy: bool) -> None:
        self._busy.discard(conn)
        pool = self.account.pool
        if self._closed or not healthy or conn.sent >= pool.max_messages_per_connection:
            self._quit_later(conn)
            return
        conn.last_used = time.monotonic()
        conn.expiry = asyncio.get_running_loop().call_later(
            pool.idle_timeout, self._expire, conn
        )
        self._idle.append(conn)

    def _expire(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._quit_later(conn)

    def _quit_later(self, conn: _Connection) -> None:
        task = asyncio.create_task(self._quit(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, conn: _Connection) -> None:
        if conn.client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await conn.client.quit(timeout=5)
        conn.client.close()

    async def send(
        self, sender: str, recipients: list[str], body: bytes, mail_options: tuple[str, ...]
    ) -> SendResult:
        async with self._limit:
            conn, reused = await self._acquire()
            self._busy.add(conn)
            healthy = False
            try:
                try:
                    result = await self._transaction(conn, sender, recipients, body, mail_options)
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                    if not reused:
                        raise
                    # The server closed a pooled connection meanwhile: not a delivery
                    # failure. Replace it and try once more on a fresh one.
                    conn.client.close()
                    self._busy.discard(conn)
                    conn = await self._connect()
                    self._busy.add(conn)
                    result = await self._transaction(conn, sender, recipients, body, mail_options)
                healthy = True
                return result
            except aiosmtplib.SMTPResponseException as exc:
                # A refused transaction leaves a usable connection (aiosmtplib sent RSET
                # only in sendmail; do it here).
                healthy = await self._reset(conn)
                raise map_smtp_error(exc) from None
            except DeliveryError:
                healthy = await self._reset(conn)
                raise
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise map_smtp_error(exc) from None
            finally:
                if not healthy:
                    conn.client.close()
                self._release(conn, healthy)

    async def _reset(self, conn: _Connection) -> bool:
        if not conn.client.is_connected:
            return False
        try:
            await conn.client.rset(timeout=self.account.timeouts.command)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return True

    async def _transaction(
        self,
        conn: _Connection,
        sender: str,
        recipients: list[str],
        body: bytes,
        mail_options: tuple[str, ...],
    ) -> SendResult:
        timeouts = self.account.timeouts
        smtp = conn.client
        options = list(mail_options)
        utf8 = any(o.upper() == "SMTPUTF8" for o in options)
        if utf8 and not smtp.supports_extension("smtputf8"):
            raise PermanentFailure(
                "upstream does not support SMTPUTF8, needed for this message's addresses",
                code=553,
                enhanced="5.6.7",
            )
        if not smtp.supports_extension("8bitmime"):
            options = [o for o in options if not o.upper().startswith("BODY=")]
        if smtp.supports_extension("size"):
            options.insert(0, f"SIZE={len(body)}")
        encoding = "utf-8" if utf8 else "ascii"
        await self._mail_from(smtp, sender, options, encoding)
        refused: dict[str, DeliveryError] = {}
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt, encoding=encoding, timeout=timeouts.command)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[rcpt] = map_smtp_error(exc)
            except ValueError as exc:  # aiosmtplib refuses to send the address at all
                refused[rcpt] = PermanentFailure(str(exc), code=553, enhanced="5.1.3")
        accepted = [r for r in recipients if r not in refused]
        if not accepted:
            await smtp.rset(timeout=timeouts.command)
            return SendResult(accepted=[], refused=refused, peer=self.peer)
        response = await smtp.data(body, timeout=timeouts.data)
        conn.sent += 1
        return SendResult(
            accepted=accepted,
            refused=refused,
            reply=f"{response.code} {response.message}",
            peer=self.peer,
        )

    async def _mail_from(
        self, smtp: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str
    ) -> None:
        timeout = self.account.timeouts.command
        try:
            if sender:
                await smtp.mail(sender, options=options, encoding=encoding, timeout=timeout)
                return
        except ValueError as exc:
            raise PermanentFailure(str(exc), code=553, enhanced="5.1.7") from None
        # The null reverse-path (bounces, RFC 5321 4.5.5): aiosmtplib will not quote '<>',
        # so the command is sent as is.
        args = [b"FROM:<>", *(o.encode("ascii") for o in options)]
        response = await smtp.execute_command(b"MAIL", *args, timeout=timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)

    async def check(self) -> list[tuple[str, str]]:
        """Connect, TLS, AUTH, NOOP: each step with 'ok' or why it failed (accounts test)."""
        steps: list[tuple[str, str]] = []
        try:
            conn = await self._connect()
        except DeliveryError as exc:
            step = "auth" if exc.code == 535 or "auth" in exc.reason.lower() else "connect/tls"
            return [(step, exc.reply_text())]
        steps.append(("connect", f"ok ({self.peer})"))
        steps.append(("tls", "ok" if self.account.tls != "none" else "off (tls: none)"))
        steps.append(("auth", "ok" if self.account.username else "none configured"))
        try:
            response = await conn.client.noop(timeout=self.account.timeouts.command)
            steps.append(("noop", f"ok ({response.code})"))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            steps.append(("noop", map_smtp_error(exc).reply_text()))
        await self._quit(conn)
        return steps

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.expiry:
                conn.expiry.cancel()
        await asyncio.gather(*(self._quit(c) for c in idle), *self._closing,
                             return_exceptions=True)
        for conn in list(self._busy):
            conn.client.close()

