"""SMTP upstream accounts: a pool of authenticated connections per account.

aiosmtplib opens each connection (TCP, TLS or STARTTLS with verification, EHLO, AUTH);
then relay's own ``Channel`` takes the transport over and runs the transactions, with
the whole envelope in one write where the server offers PIPELINING (RFC 2920).
aiosmtplib reads one reply per command, so it cannot pipeline. The pool is here; the
channel is channel.py, and errors.py is the one place aiosmtplib's exceptions and the
channel's replies become relay's TemporaryFailure / PermanentFailure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiosmtplib
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import Default

from relay.config.schema import AccountConfig
from relay.delivery.refusals import login_refused
from relay.delivery.smtp.channel import Channel, Connection
from relay.delivery.smtp.errors import (
    ChannelClosed,
    ServiceClosing,
    closing_error,
    map_smtp_error,
    refusal,
    sender_refusal,
    split_enhanced,
    too_many_recipients,
)
from relay.delivery.smtp.tokens import TokenSource
from relay.delivery.transport import (
    TRANSCRIPT,
    HostShare,
    Pace,
    SendResult,
    SlotsHeldElsewhere,
    Transcript,
)
from relay.errors import ConfigError, DeliveryError, PermanentFailure, TemporaryFailure
from relay.smtp import wire as smtpwire
from relay.smtp.wire import Reply

log = logging.getLogger("relay.upstream")


_DEFAULT = Default.token  # aiosmtplib's "the client's own timeout"

# Reuse a connection without a NOOP only if it was used this recently.
NOOP_AFTER_IDLE_S = 5.0


# After the server refused a connection at the greeting (421, "too many connections from
# your host": Postfix smtpd_client_connection_count_limit), try one more this much later.
CAPACITY_PROBE_S = 10.0


# With several workers sharing the account's connections, an idle one keeps its slot at
# most this long: another worker may be waiting for it (pool.idle_timeout is per process).
SHARED_IDLE_S = 2.0
# How often a send that found every shared slot taken tries again (unless one of this
# process's connections comes back first), and how long it waits when this process has
# no connection to the account at all before it gives the message back to the queue.
SLOT_POLL_S = 0.1
SLOT_GIVE_UP_S = 0.5


# SASL mechanisms relay can use with a password, strongest first (aiosmtplib's order);
# xoauth2 is used only when configured (auth: {mechanism: xoauth2}).
AUTH_MECHANISMS = ("cram-md5", "plain", "login")


def choose_mechanism(configured: str, advertised: list[str]) -> str | None:
    """The one SASL mechanism to try: the configured one, or the strongest both offer.

    Only one: aiosmtplib's login() tries each advertised mechanism in turn, so a wrong
    password would cost two or three failed logins per attempt (Postfix logs auth=0/2),
    and providers lock accounts by failed-login counts.
    """
    offered = [m.lower() for m in advertised]
    if configured != "auto":
        return configured if configured in offered else None
    return next((m for m in AUTH_MECHANISMS if m in offered), None)


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, remembering whether TCP connected: connect() closes (and
    forgets the transport) when the greeting never comes or is a refusal, and such a
    connection still counts in relay_upstream_connections_opened_total. Its commands
    and replies (EHLO, STARTTLS, AUTH) go to the attempt's transcript, AUTH masked."""

    tcp_connected = False
    _in_auth = False  # after AUTH, until a reply other than 334: SASL payloads

    async def execute_command(
        self, *args: bytes, timeout: Any = _DEFAULT  # noqa: ASYNC109 (aiosmtplib's)
    ) -> SMTPResponse:
        transcript = TRANSCRIPT.get()
        if transcript is None:
            return await super().execute_command(*args, timeout=timeout)
        if args and args[0].upper() == b"AUTH":
            self._in_auth = True
            mechanism = args[1].decode("ascii", "replace") if len(args) > 1 else ""
            transcript.client(f"AUTH {mechanism} ***")
        elif self._in_auth:
            transcript.client("***")
        else:
            transcript.client(b" ".join(args).decode("utf-8", "replace"))
        try:
            response = await super().execute_command(*args, timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            self._in_auth = False
            transcript.server(exc.code, exc.message)
            raise
        if self._in_auth and response.code == 334:  # a challenge: may quote the payload
            transcript.server(334, "***")
        else:
            self._in_auth = False
            transcript.server(response.code, response.message)
        return response

    def close(self) -> None:
        if self.transport is not None:
            self.tcp_connected = True
        super().close()


async def _starttls(client: aiosmtplib.SMTP, within: float) -> None:
    """STARTTLS, in the transcript (aiosmtplib sends it past execute_command)."""
    transcript = TRANSCRIPT.get()
    if transcript is not None:
        transcript.client("STARTTLS")
    await _noted(transcript, client.starttls(timeout=within))


async def _noted(transcript: Transcript | None,
                 reply: Awaitable[aiosmtplib.SMTPResponse]) -> aiosmtplib.SMTPResponse:
    """Await a command's reply (or a greeting), noting it, or the refusal, in the
    transcript."""
    try:
        response = await reply
    except aiosmtplib.SMTPResponseException as exc:
        if transcript is not None:
            transcript.server(exc.code, exc.message)
        raise
    if transcript is not None:
        transcript.server(response.code, response.message)
    return response


class _Replace(Exception):
    """This connection cannot carry the message, another may at once (421, or a pooled
    connection the server closed meanwhile); ``error`` if none can."""

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(error.reason)
        self.error = error


def _local_literal(client: aiosmtplib.SMTP) -> str:
    """RFC 5321 4.1.4: with no domain name to give, the connection's own address."""
    transport = client.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname:
        raise ChannelClosed("connection closed during setup")
    return smtpwire.address_literal(str(sockname[0]))


def _tls_context(name: str, account: AccountConfig) -> ssl.SSLContext | None:
    """With tls_ca_file: the system's CAs and the account's own (Postfix's
    smtp_tls_CAfile), built once so that a bad file fails the start or reload."""
    if account.tls_ca_file is None or account.tls == "none":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        context.load_verify_locations(cafile=account.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError([f"accounts.{name}.tls_ca_file: cannot load"
                           f" {account.tls_ca_file}: {reason}"]) from None
    return context


class _Slots:
    """A semaphore whose size can change: the connections the server lets us have.

    ``limit`` is pool.max_connections; ``size`` drops while the server refuses more
    connections (421 at the greeting) and rises again by one every CAPACITY_PROBE_S.
    """

    def __init__(self, limit: int) -> None:
        self.limit = self.size = limit
        self.in_use = 0
        self.raise_at = 0.0  # monotonic
        self._freed = asyncio.Event()

    async def acquire(self) -> None:
        while self.in_use >= self.size:
            self._freed.clear()
            await self._freed.wait()
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        if self.size < self.limit and time.monotonic() >= self.raise_at:
            self.size += 1  # try one more; a new 421 lowers it again
            self.raise_at = time.monotonic() + CAPACITY_PROBE_S
        self._freed.set()

    def lower(self, to: int) -> None:
        self.size = max(1, min(to, self.size - 1))
        self.raise_at = time.monotonic() + CAPACITY_PROBE_S

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()


class UpstreamPool:
    """At most pool.max_connections connections to one account, reused between messages."""

    def __init__(
        self,
        name: str,
        account: AccountConfig,
        *,
        local_hostname: str | None = None,
        on_connect: Callable[[], None] | None = None,
        login_hold_s: float = 60.0,
        host: HostShare | None = None,
    ) -> None:
        """``local_hostname``: the top-level hostname; None: an address literal.
        ``host``: the account's connections and logins are shared with other workers."""
        self.name = name
        self.account = account
        self._ehlo_name = account.ehlo_name or local_hostname
        self._on_connect = on_connect
        self._tls_context = _tls_context(name, account)
        self._limit = _Slots(account.pool.max_connections if host is None else host.share)
        # AUTH: until a login has worked, connections log in one at a time, and one that
        # waited while another's login was refused does not try at all (11.3).
        self._login_lock = asyncio.Lock()
        self._login_proven = False
        self._logins_refused = 0
        # After a refused login no connection logs in for this long (auth_backoff.initial):
        # sends already under way when the account backed off must not each try once.
        self._login_hold_s = login_hold_s
        self._login_hold_until = 0.0  # monotonic
        # auth: xoauth2 logs in with tokens from here instead of a password.
        self.tokens = TokenSource(name, account.auth) if account.auth is not None else None
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closing: set[asyncio.Task[None]] = set()  # QUITs under way, kept referenced
        self._closed = False
        self._host = host
        self._returned = asyncio.Event()  # a connection went back to the idle list
        self._idle_s = account.pool.idle_timeout if host is None else min(
            account.pool.idle_timeout, SHARED_IDLE_S)

    @property
    def peer(self) -> str:
        return f"{self.account.host}:{self.account.effective_port}"

    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    @property
    def capacity(self) -> int:
        """How many connections the server lets us have now (at most max_connections),
        and, with workers sharing them, no more than this process holds while the others
        hold every other one."""
        if self._host is not None and self._host.starved:
            return max(1, min(self._limit.size, self.open_connections()))
        return self._limit.size

    def _too_many_connections(self, exc: DeliveryError) -> bool:
        """A 421 at the greeting while our other connections work: the server limits
        connections per client, not an account failure. Use fewer connections."""
        # Others working, being opened (this one is counted in in_use) or idle.
        others = self._limit.in_use - 1 + len(self._idle)
        if exc.code != 421 or others < 1:
            return False
        if others < self._limit.size:
            log.warning("%s: upstream refused another connection (%s); using at most %d",
                        self.name, exc.reply_text(), others)
        self._limit.lower(others)
        return True

    async def _connect(self, slot: int | None = None) -> Connection:
        """A new connection, holding a slot of the host's pool while workers share it
        (``slot``, or one waited for)."""
        if self._host is None:
            return await self._login_and_open()
        if slot is None:
            slot = await self._host.take_slot()
        try:
            conn = await self._login_and_open()
        except BaseException:
            await self._host.give_slot(slot)
            raise
        conn.slot = slot
        return conn

    async def _login_and_open(self) -> Connection:
        if not self.account.username or self._login_proven:
            return await self._open()
        refused = self._logins_refused
        async with self._login_lock:
            if self._logins_refused != refused or time.monotonic() < self._login_hold_until:
                # Another connection's login was refused while this one waited: do not
                # spend another failed login on the same password.
                raise TemporaryFailure("not logging in: the account's last login was refused",
                                       account_reason="auth")
            if self._host is None:
                return await self._open()
            # Not proven in this process: in the host's login turn, so the other workers
            # learn of a refusal before they try the same password.
            await self._host.begin_login()
            try:
                return await self._open()
            finally:
                await self._host.end_login(
                    self._login_hold_s if self._logins_refused != refused else None)

    def end_login_hold(self) -> None:
        """Allow the next login now (`relay queue flush` ends the account's backoff)."""
        self._login_hold_until = 0.0

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        """AUTH with one mechanism; counts a refused login (see choose_mechanism)."""
        acc = self.account
        assert acc.username is not None
        if not client.supports_extension("auth"):
            raise TemporaryFailure("the upstream does not offer AUTH", account_reason="auth")
        configured = acc.auth.mechanism if acc.auth is not None else acc.auth_mechanism
        mechanism = choose_mechanism(configured, client.server_auth_methods)
        if mechanism is None:
            offered = " ".join(client.server_auth_methods) or "none"
            key = "auth.mechanism" if acc.auth is not None else "auth_mechanism"
            raise TemporaryFailure(
                f"no usable AUTH mechanism (the upstream offers {offered};"
                f" {key}: {configured})", account_reason="auth")
        try:
            if self.tokens is not None:
                await self._login_xoauth2(client, self.tokens)
            else:
                method = getattr(client, f"auth_{mechanism.replace('-', '')}")
                await method(acc.username, acc.secret or "", timeout=acc.timeouts.command)
        except aiosmtplib.SMTPAuthenticationError as exc:
            if not login_refused(exc.code, split_enhanced(exc.message)[0]):
                raise  # 454, 421: a temporary failure, not a refused login (map_smtp_error)
            self._logins_refused += 1
            self._login_proven = False
            self._login_hold_until = time.monotonic() + self._login_hold_s
            raise
        self._login_proven = True

    async def _login_xoauth2(self, client: aiosmtplib.SMTP, tokens: TokenSource) -> None:
        """AUTH XOAUTH2; a refused token (it expired early, was revoked) is replaced
        once and tried once more on the same connection before it counts as refused."""
        acc = self.account
        assert acc.username is not None
        token = await tokens.token()
        try:
            await client.auth_xoauth2(acc.username, token, timeout=acc.timeouts.command)
            return
        except aiosmtplib.SMTPAuthenticationError as exc:
            if not login_refused(exc.code, split_enhanced(exc.message)[0]):
                raise
            tokens.refused(token)
            if not client.is_connected:
                raise  # the server hung up after the refusal: the next login has a new one
            log.info("%s: the upstream refused the XOAUTH2 token (%d); fetching a new one",
                     self.name, exc.code)
        await client.auth_xoauth2(acc.username, await tokens.token(),
                                  timeout=acc.timeouts.command)

    async def _open(self) -> Connection:
        acc = self.account
        if self.tokens is not None:
            # Before connecting: a slow token endpoint must not hold an idle session open
            # (servers close those), and no token means no connection at all.
            await self.tokens.token()
        client = _Client(
            hostname=acc.host,
            port=acc.effective_port,
            use_tls=acc.tls == "implicit",
            start_tls=False,  # below, once the EHLO name is known
            validate_certs=acc.tls_verify,
            tls_context=self._tls_context,  # None: aiosmtplib's (system CAs, tls_verify)
            timeout=acc.timeouts.command,
            local_hostname=self._ehlo_name or "localhost",  # (connect() sends no EHLO)
        )
        counted = False
        transcript = TRANSCRIPT.get()
        if transcript is not None:
            transcript.note(f"new connection to {self.peer} (tls: {acc.tls})")
        try:
            await _greeted(client, acc.timeouts.connect, transcript)
            if self._on_connect:
                counted = True
                self._on_connect()
            client.local_hostname = self._ehlo_name or _local_literal(client)
            await client.ehlo(timeout=acc.timeouts.command)
            if acc.tls == "starttls":  # required, never opportunistic
                await _starttls(client, acc.timeouts.command)
                await client.ehlo(timeout=acc.timeouts.command)
            if acc.username:
                await self._login(client)
            # (uvloop's transports are not asyncio.Transport subclasses: no isinstance.)
            transport = cast(asyncio.Transport | None, client.transport)
            if transport is None or transport.is_closing():
                raise ChannelClosed("connection closed during setup")
        except BaseException as exc:
            if not counted and self._on_connect and (client.transport is not None
                                                     or client.tcp_connected):
                # TCP connected, but no (or no good) greeting: a connection all the same
                # (docs/monitoring.md), or a server that never greets would show none.
                self._on_connect()
            client.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_smtp_error(exc, connecting=True) from None
        return Connection(Channel(transport), frozenset(client.esmtp_extensions))

    async def _acquire(self) -> tuple[Connection, bool]:
        """A live connection, and whether it was reused from the pool."""
        since = time.monotonic()
        while True:
            conn = await self._reuse()
            if conn is not None:
                return conn, True
            slot = None
            if self._host is not None:
                slot = await self._host.try_slot()
                if slot is None and not self.open_connections() \
                        and time.monotonic() - since >= SLOT_GIVE_UP_S:
                    raise SlotsHeldElsewhere  # a worker with a connection will send it
                if slot is None:
                    # The other workers hold every slot: the first of ours to come back,
                    # or of theirs to be given back, carries this message.
                    self._returned.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SLOT_POLL_S):
                            await self._returned.wait()
                    continue
            try:
                return await self._connect(slot), False
            except DeliveryError as exc:
                if not self._too_many_connections(exc):
                    raise
            await self._wait_for_ours()

    async def _reuse(self) -> Connection | None:
        """An idle connection that still works, if there is one."""
        while self._idle:
            conn = self._idle.pop()
            if conn.expiry:
                conn.expiry.cancel()
            if not conn.channel.is_connected:
                await self._closed_now(conn)
                continue
            if time.monotonic() - conn.last_used > NOOP_AFTER_IDLE_S:
                try:
                    reply = await conn.channel.command(b"NOOP\r\n", self.account.timeouts.command)
                except (OSError, TimeoutError):
                    reply = None
                if reply is None or reply.code != 250:
                    await self._closed_now(conn)
                    continue
            transcript = TRANSCRIPT.get()
            if transcript is not None:
                transcript.note(f"reused connection to {self.peer}"
                                f" ({conn.sent} message(s) sent on it before)")
            return conn
        return None

    async def _wait_for_ours(self) -> None:
        """Give our slot up until one of our connections is free (the pool is smaller)."""
        self._limit.release()
        try:
            await self._limit.acquire()
        except BaseException:
            self._limit.in_use += 1  # the caller's `async with` gives it back
            raise

    def _release(self, conn: Connection, healthy: bool) -> None:
        self._busy.discard(conn)
        pool = self.account.pool
        if self._closed or not healthy or conn.sent >= pool.max_messages_per_connection:
            self._quit_later(conn)
            return
        conn.last_used = time.monotonic()
        conn.expiry = asyncio.get_running_loop().call_later(
            self._idle_s, self._expire, conn
        )
        self._idle.append(conn)
        self._returned.set()

    def _expire(self, conn: Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._quit_later(conn)

    def _quit_later(self, conn: Connection) -> None:
        task = asyncio.create_task(self._quit(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, conn: Connection) -> None:
        if conn.channel.is_connected:
            with contextlib.suppress(OSError, TimeoutError):
                await conn.channel.command(b"QUIT\r\n", 5)
        await self._closed_now(conn)

    async def _closed_now(self, conn: Connection) -> None:
        """Close ``conn`` and give its host slot back (the connection is gone)."""
        conn.channel.close()
        slot, conn.slot = conn.slot, None
        if slot is not None and self._host is not None:
            await self._host.give_slot(slot)

    async def send(
        self, sender: str, recipients: list[str], body: bytes, mail_options: tuple[str, ...],
        *, pace: Pace | None = None,
    ) -> SendResult:
        """``pace``: awaited before every transaction after the first (see Pace)."""
        async with self._limit:
            try:
                conn, reused = await self._acquire()
            except DeliveryError as exc:
                exc.offered = False  # no connection (or the login held): never offered
                raise
            try:
                return await self._attempt(conn, reused, sender, recipients, body,
                                           mail_options, pace)
            except _Replace:
                # Not this message's fault: it goes out at once on a fresh connection
                # (pooled ones may be as spent), within the same attempt. Once only; then
                # it is an ordinary deferral. It is one more transaction: paced.
                if pace is not None:
                    await pace(SendResult(accepted=[], peer=self.peer))
                conn = await self._connect()
                try:
                    return await self._attempt(
                        conn, False, sender, recipients, body, mail_options, pace
                    )
                except _Replace as again:
                    raise again.error from None

    async def _attempt(
        self,
        conn: Connection,
        reused: bool,
        sender: str,
        recipients: list[str],
        body: bytes,
        mail_options: tuple[str, ...],
        pace: Pace | None = None,
    ) -> SendResult:
        """Deliver on one connection; raise _Replace if another connection should try."""
        self._busy.add(conn)
        healthy = False
        answered = conn.channel.replies_read
        try:
            result = await self._deliver_all(conn, sender, recipients, body, mail_options,
                                             pace)
            healthy = conn.channel.is_connected
            return result
        except ServiceClosing as exc:
            error = closing_error(exc)
            if error.account_wide:  # a throttle: another connection now would only add to it
                raise error from None
            raise _Replace(error) from None
        except ChannelClosed as exc:
            if reused and conn.channel.replies_read == answered:
                # The server closed a pooled connection meanwhile, before it answered
                # anything of this transaction: not a delivery failure.
                raise _Replace(map_smtp_error(exc)) from None
            raise map_smtp_error(exc) from None
        except DeliveryError:
            healthy = await self._reset(conn)
            raise
        except (OSError, TimeoutError) as exc:
            raise map_smtp_error(exc) from None
        finally:
            if not healthy:
                conn.channel.close()
            self._release(conn, healthy)

    async def _deliver_all(
        self,
        conn: Connection,
        sender: str,
        recipients: list[str],
        body: bytes,
        mail_options: tuple[str, ...],
        pace: Pace | None = None,
    ) -> SendResult:
        """Transactions on one connection until no recipient is left over by '452 too many
        recipients' (RFC 5321 4.5.3.1.10): the rest go at once, not after a retry delay
        (but within the rate limit: ``pace``)."""
        total = await self._transaction(conn, sender, recipients, body, mail_options)
        while total.accepted:
            rest = [r for r, e in total.refused.items() if too_many_recipients(e)]
            if not rest:
                break
            try:
                if pace is not None:
                    await pace(total)
                more = await self._transaction(conn, sender, rest, body, mail_options)
            except (DeliveryError, OSError, TimeoutError) as exc:
                # Some recipients already have the message: only the rest wait for a retry.
                if isinstance(exc, ServiceClosing):
                    error = closing_error(exc)
                elif isinstance(exc, DeliveryError):
                    error = exc
                else:
                    error = map_smtp_error(exc)
                if not (isinstance(exc, DeliveryError) and await self._reset(conn)):
                    conn.channel.close()
                total.refused.update(dict.fromkeys(rest, error))
                break
            for rcpt in rest:
                del total.refused[rcpt]
            total.refused.update(more.refused)
            if not more.accepted:
                break  # no progress: the rest are deferred with the server's reply
            total.accepted += more.accepted
            total.reply = f"{total.reply}; {more.reply}"
        return total

    async def _reset(self, conn: Connection) -> bool:
        """RSET after a refused transaction, so the connection can be used again."""
        if not conn.channel.is_connected:
            return False
        try:
            reply = await conn.channel.command(b"RSET\r\n", self.account.timeouts.command)
        except (OSError, TimeoutError):
            return False
        return reply.code == 250

    async def _transaction(
        self,
        conn: Connection,
        sender: str,
        recipients: list[str],
        body: bytes,
        mail_options: tuple[str, ...],
    ) -> SendResult:
        """MAIL, RCPT..., DATA: in one write if the server pipelines, else one by one."""
        channel = conn.channel
        mail, rcpts, refused = self._envelope(conn, sender, recipients, body, mail_options)
        if not rcpts:
            return SendResult(accepted=[], refused=refused, peer=self.peer)
        mail_reply, rcpt_replies, data_reply = await self._exchange(conn, mail, rcpts)
        accepted: list[str] = []
        for (rcpt, _), reply in zip(rcpts, rcpt_replies, strict=False):
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                refused[rcpt] = refusal(reply, "recipient")
        if data_reply is not None and data_reply.code == 354 and not (
            mail_reply.code == 250 and accepted
        ):
            # RFC 2920 3.1: a server may start DATA although nothing before it was
            # accepted. End that empty transaction; its reply means nothing.
            channel.write(smtpwire.END_OF_DATA)
            await channel.reply(self.account.timeouts.data)
            data_reply = None
        if mail_reply.code != 250:
            raise sender_refusal(mail_reply)
        if not accepted:
            if not await self._reset(conn):  # the server still holds the MAIL
                channel.close()
            return SendResult(accepted=[], refused=refused, peer=self.peer)
        if data_reply is None or data_reply.code != 354:
            raise refusal(data_reply or Reply(451, "no reply to DATA"), "DATA")
        channel.write_body(smtpwire.data_lines(body), len(body))
        final = await channel.reply(self.account.timeouts.data)
        conn.sent += 1
        if final.code != 250:
            raise refusal(final, "message")
        return SendResult(accepted=accepted, refused=refused, reply=str(final), peer=self.peer)

    def _envelope(
        self,
        conn: Connection,
        sender: str,
        recipients: list[str],
        body: bytes,
        mail_options: tuple[str, ...],
    ) -> tuple[bytes, list[tuple[str, bytes]], dict[str, DeliveryError]]:
        """The MAIL line, (recipient, RCPT line) pairs, and recipients that cannot be sent."""
        extensions = conn.extensions
        options = list(mail_options)
        utf8 = any(o.upper() == "SMTPUTF8" for o in options)
        if utf8 and "smtputf8" not in extensions:
            raise PermanentFailure(
                "upstream does not support SMTPUTF8, needed for this message's addresses",
                code=553,
                enhanced="5.6.7",
            )
        if "8bitmime" not in extensions:
            if not body.isascii():
                # RFC 6152: 8-bit data only to a server that offers 8BITMIME. relay does
                # not convert to quoted-printable: that would break DKIM signatures.
                raise PermanentFailure(
                    "upstream does not support 8BITMIME and this message has 8-bit data;"
                    " relay does not convert it (see docs/configuration.md)",
                    code=554,
                    enhanced="5.6.3",
                )
            options = [o for o in options if not o.upper().startswith("BODY=")]
        elif not body.isascii():
            # 8-bit data is declared whatever the client said (none, or BODY=7BIT): the
            # upstream may otherwise treat it as 7-bit (RFC 6152 section 3).
            options = [o for o in options if not o.upper().startswith("BODY=")]
            options.append("BODY=8BITMIME")
        if "size" in extensions:
            options.insert(0, f"SIZE={len(body)}")
        try:
            mail = smtpwire.mail_from(sender, options, utf8=utf8)
        except ValueError as exc:
            raise PermanentFailure(
                f"cannot send sender address: {exc}", code=553, enhanced="5.1.7"
            ) from None
        rcpts: list[tuple[str, bytes]] = []
        refused: dict[str, DeliveryError] = {}
        for rcpt in recipients:
            try:
                rcpts.append((rcpt, smtpwire.rcpt_to(rcpt, utf8=utf8)))
            except ValueError as exc:
                refused[rcpt] = PermanentFailure(
                    f"cannot send recipient address: {exc}", code=553, enhanced="5.1.3"
                )
        return mail, rcpts, refused

    async def _exchange(
        self, conn: Connection, mail: bytes, rcpts: list[tuple[str, bytes]]
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """Send the envelope and DATA; the replies to MAIL, each RCPT, and DATA if sent."""
        channel, within = conn.channel, self.account.timeouts.command
        if "pipelining" in conn.extensions:
            channel.write(mail, *(line for _, line in rcpts), b"DATA\r\n")
            mail_reply = await channel.reply(within)
            rcpt_replies = [await channel.reply(within) for _ in rcpts]
            return mail_reply, rcpt_replies, await channel.reply(within)
        mail_reply = await channel.command(mail, within)
        if mail_reply.code != 250:
            return mail_reply, [], None
        rcpt_replies = [await channel.command(line, within) for _, line in rcpts]
        if not any(r.code in (250, 251) for r in rcpt_replies):
            return mail_reply, rcpt_replies, None
        return mail_reply, rcpt_replies, await channel.command(b"DATA\r\n", within)

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
            reply = await conn.channel.command(b"NOOP\r\n", self.account.timeouts.command)
            steps.append(("noop", f"ok ({reply.code})"))
        except (OSError, TimeoutError) as exc:
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
            await self._closed_now(conn)


async def _greeted(client: aiosmtplib.SMTP, connect_s: float,
                   transcript: Transcript | None) -> None:
    """Connect and read the greeting, noting it (or the refusal) in the transcript."""
    await _noted(transcript, client.connect(timeout=connect_s))
