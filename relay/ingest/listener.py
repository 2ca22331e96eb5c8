"""The SMTP listener (aiosmtpd): the server class with relay's session limits, DATA
reader and replies, and start_listener. What each command does is the handler's
(relay.ingest.handler). relay.ingest is the only package (besides relay.bench) that
imports aiosmtpd.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import logging
import re
import socket
import ssl
import time
import warnings
from typing import Any

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from relay.config.schema import Config, effective_hostname
from relay.errors import ConfigError
from relay.ingest.addresses import parse_path
from relay.ingest.handler import (
    _CONTROL,
    _SIMPLE_PATH,
    IngestHandler,
    RelayEnvelope,
    _b64,
    _hook_names,
    _peer,
    _Session,
)
from relay.ingest.throttle import FailureThrottle
from relay.observe.logs import event
from relay.observe.metrics import Metrics
from relay.smtp import replies
from relay.smtp.data import DataReader, DataState
from relay.smtp.wire import address_literal

log = logging.getLogger("relay.smtpd")

# RFC 3463 enhanced codes for aiosmtpd's own replies, which mostly lack them.
_ENHANCED_BY_CODE = {
    421: "4.3.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0", 500: "5.5.2", 501: "5.5.4",
    502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 550: "5.0.0", 552: "5.3.4",
    553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_REWORDED = {
    "552 Error: message size exceeds fixed maximum message size":
        str(replies.TOO_BIG),
    "552 Error: Too much mail data": str(replies.TOO_BIG),
    "500 Line too long (see RFC5321 4.5.3.1.6)":
        "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6: at most 1000 octets)",
}
_TOO_BIG = str(replies.TOO_BIG)
# Request methods a browser may send: a web page must not be able to talk SMTP to us.
_HTTP_VERBS = ("GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "DELETE", "PATCH")
_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\b")


def with_enhanced_code(status: str) -> str:
    """Add an RFC 3463 code to a 4xx/5xx reply that has none (one place for all of them)."""
    if status in _REWORDED:
        return _REWORDED[status]
    code, sep, text = status.partition(" ")
    if not code.isdigit() or int(code) < 400 or _ENHANCED_RE.match(text):
        return status
    enhanced = _ENHANCED_BY_CODE.get(int(code), f"{code[0]}.0.0")
    return f"{code} {enhanced} {text.removeprefix('Error: ')}" if sep else status


# StreamReader.read(n) hands over at most n buffered bytes; this is "all of them".
_EVERYTHING = 1 << 40


class ChunkedDataSMTP(SMTP):
    """aiosmtpd's server with its DATA command reading whole chunks (see smtpdata)."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's checks before the 354, unchanged.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = DataReader(size_limit=self.data_size_limit, line_limit=self.line_length_limit)
        try:
            while not reader.feed(await self._reader.read(_EVERYTHING) or self._lost()):
                pass
        except asyncio.CancelledError:  # the connection went (aiosmtpd: eof_received)
            self._writer.close()
            raise
        if reader.rest and not self._reader.at_eof():
            # The client's next commands, read with the data: back to the (now empty)
            # stream, in order, for the command loop.
            self._reader.feed_data(reader.rest)
        if reader.state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif reader.state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        if reader.state is not DataState.NOMINAL:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = reader.content()
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _lost(self) -> bytes:
        """(end of stream inside DATA) end the session as aiosmtpd does when cancelled."""
        raise asyncio.CancelledError


class RelaySMTP(ChunkedDataSMTP):
    """aiosmtpd's server, hardened: access control at connect, session and error limits,
    enhanced status codes, no cross-protocol requests, a session gauge."""

    def __init__(self, handler: IngestHandler, limits: SessionLimits, **kwargs: Any) -> None:
        if kwargs.get("auth_required") and not kwargs.get("auth_require_tls"):
            with warnings.catch_warnings():
                # aiosmtpd warns when AUTH is allowed without TLS; relay allows that only
                # on loopback (config refuses it elsewhere).
                warnings.simplefilter("ignore", UserWarning)
                super().__init__(handler, **kwargs)
        else:
            super().__init__(handler, **kwargs)
        self._handler = handler
        self._limits = limits
        self._client: str | None = None
        self._released = False
        self._bad_path: replies.Reply | None = None  # inside MAIL or RCPT: its syntax reply
        self._refusal: str | None = None
        self._bad_commands = 0
        self._continued: list[str] = []
        for verb in _HTTP_VERBS:
            self._smtp_methods[verb] = self._cross_protocol

    def _create_envelope(self) -> Envelope:
        return RelayEnvelope()

    # AUTH: aiosmtpd's PLAIN and LOGIN call the authenticator synchronously on the loop;
    # these parse the same way and verify in a worker thread (IngestHandler.verify_login).

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            blob = _b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        assert isinstance(blob, bytes)
        try:  # RFC 4616: authzid NUL authcid NUL passwd
            _authzid, login, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False)
        return await self._verify(LoginPassword(login, password))

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            login = _b64(args[1])
            if login is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._verify(LoginPassword(login, password))

    async def _verify(self, login: LoginPassword) -> AuthResult:
        throttle, client = self._limits.auth_throttle, self._client
        if client is not None and throttle.locked(client, time.monotonic()):
            return await self._auth_locked_out()
        assert self.session is not None
        result = await self._handler.verify_login(self.session, login)
        if not result.success and client is not None and throttle.failed(
                client, time.monotonic()):
            event(log, logging.WARNING, "auth_locked", client=_peer(self.session),
                  failures=throttle.limit, lockout=f"{throttle.lockout:g}s")
            return await self._auth_locked_out()
        return result

    async def _auth_locked_out(self) -> AuthResult:
        """Postfix anvil's answer to a client over its login-failure rate: 421, close."""
        self._limits.metrics.rejected.labels("auth_locked").inc()
        await self.push("421 4.7.0 Too many failed logins from your address, try again later")
        self._close()
        return AuthResult(success=False)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> bytes | Any:
        """aiosmtpd's, but an over-long reply line is the client's mistake: RFC 4954's
        500 5.5.6 (a bad command), not an exception and a 451."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        line = await self._read_line()
        if line is None:
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        decoded = _b64(blob)
        if decoded is None:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING
        return decoded

    async def _read_line(self) -> bytes | None:
        """One line; None (its bytes dropped up to its end) if longer than the limit."""
        try:
            return await self._reader.readuntil()
        except asyncio.IncompleteReadError as error:  # the client went: what it sent
            return error.partial
        except asyncio.LimitOverrunError as error:
            await self._reader.readexactly(error.consumed)
        while True:
            try:
                await self._reader.readuntil()
                return None
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError as error:
                await self._reader.readexactly(error.consumed)

    def __dir__(self) -> list[str]:
        # aiosmtpd builds its command and AUTH tables from dir(self) on every connection.
        return _hook_names(type(self), ("smtp_", "auth_"))

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL/RCPT path with email's RFC 5322 header parser
        # (about 50 us), which also takes what RFC 5321 does not ('<a b@x>', '<a@x');
        # the common simple form is matched directly.
        match = _SIMPLE_PATH.match(arg) if arg else None
        limit = self.local_part_limit  # 0: no limit
        if (match and (not limit or len(match.group(1).rpartition("@")[0]) <= limit)
                and match.group(2)[:1] in ("", " ")):
            return match.group(1), match.group(2).lstrip()
        if not arg:
            return "", ""
        if self._handler.config.listen.strict_addresses:
            parsed = parse_path(arg)
            if parsed is None or (limit and len(parsed[0].rpartition("@")[0]) > limit):
                return None, None
            return parsed
        try:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
        except Exception:
            # The email parser crashes on some fragments ('<', '"', 'x@', '0@[' raise
            # IndexError, AttributeError...): that is a malformed address, not an
            # internal error.
            return None, None
        return result

    # aiosmtpd answers a path it cannot parse with this, for MAIL and RCPT alike; relay
    # answers RFC 5321's 501 with the RFC 3463 code for the sender or the recipient.
    _MALFORMED = "553 5.1.3 Error: malformed address"

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._bad_path = replies.BAD_SENDER_SYNTAX
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._bad_path = None

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._bad_path = replies.BAD_RECIPIENT_SYNTAX
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._bad_path = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # aiosmtpd calls this again after the STARTTLS handshake, for the same
            # session: it was counted (and checked) when the TCP connection came.
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else None
        self._refusal = self._limits.open_session(self._client)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._released:  # aiosmtpd calls this itself after a failed TLS handshake
            self._released = True
            self._limits.close_session(self._client)
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            await self.push(self._refusal)
            self._close()
            return
        await super()._handle_client()

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, bytes):
            await super().push(status)
            return
        if status == self._MALFORMED and self._bad_path is not None:
            status = self._handler.reject("bad_address", self._bad_path)
        # aiosmtpd echoes client text (an unknown command) into some replies; a CR or LF
        # in it would break the reply's framing, so control characters never go out.
        status = with_enhanced_code(_CONTROL.sub("?", status))
        if len(status) > 3 and status[3] == "-":
            self._continued.append(status)  # a multi-line reply goes out in one write
            return
        if self._continued:
            status = "\r\n".join([*self._continued, status])
            self._continued.clear()
        if status == _TOO_BIG:  # aiosmtpd's own size refusals (SIZE=, DATA), reworded
            self._limits.metrics.rejected.labels("too_big").inc()
        await super().push(status)
        # Syntax errors and failed logins both count: no unlimited password guessing.
        if status[:3] in ("500", "501", "502", "503", "504", "535", "555"):
            self._bad_commands += 1
            if self._bad_commands >= self._limits.max_bad_commands:
                await super().push("421 4.7.0 Too many errors, closing connection")
                self._close()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes idle sessions silently; RFC 5321 4.2.2 wants a 421 first.
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(b"421 4.4.2 Idle timeout, closing connection\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's TLS handshake failed (not TLS, or it refused our certificate):
            # its problem, not an internal error. aiosmtpd closes the connection.
            event(log, logging.WARNING, "rejected", reason="TLS handshake failed",
                  client=_peer(self.session) if self.session else None)
            return "421 4.7.0 TLS handshake failed"
        status: str = await super().handle_exception(error)
        return status

    async def _cross_protocol(self, arg: str | None) -> None:
        """An HTTP request line: drop the connection without a word (no SMTP from browsers)."""
        self._limits.metrics.rejected.labels("cross_protocol").inc()
        event(log, logging.WARNING, "rejected", reason="HTTP request on the SMTP port",
              client=_peer(self.session) if self.session else None)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SessionLimits:
    """Listener-wide state shared by all sessions: counts and access rules."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sessions = 0
        self.per_client: dict[str | None, int] = {}
        auth = config.listen.auth
        self.auth_throttle = FailureThrottle(auth.max_failures, auth.failure_window,
                                             auth.lockout)
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take new limits (SIGHUP); sessions already open keep theirs."""
        self.max_sessions = config.listen.max_connections
        self.max_per_client = config.listen.max_connections_per_client
        self.max_bad_commands = config.listen.max_bad_commands
        self.networks = config.listen.networks()
        auth = config.listen.auth
        self.auth_throttle.configure(auth.max_failures, auth.failure_window, auth.lockout)

    def open_session(self, host: str | None) -> str | None:
        """Count a new connection (always: close_session uncounts it); the refusal, if any."""
        self.sessions += 1
        self.per_client[host] = self.per_client.get(host, 0) + 1
        self.metrics.sessions_active.inc()
        if not self.allowed(host):
            self.metrics.rejected.labels("access_denied").inc()
            return "554 5.7.1 Access denied: your address is not allowed to relay"
        if self.sessions > self.max_sessions:
            self.metrics.rejected.labels("too_many_connections").inc()
            return "421 4.7.0 Too many connections, try again later"
        # A Unix socket (host None) has no client address to tell clients apart.
        if host is not None and self.per_client[host] > self.max_per_client:
            self.metrics.rejected.labels("too_many_client_connections").inc()
            return "421 4.7.0 Too many connections from your address, try again later"
        return None

    def close_session(self, host: str | None) -> None:
        self.sessions -= 1
        left = self.per_client.get(host, 0) - 1
        if left > 0:
            self.per_client[host] = left
        else:  # forget the address: the table holds only clients connected now
            self.per_client.pop(host, None)
        self.metrics.sessions_active.dec()

    def allowed(self, host: str | None) -> bool:
        if host is None:  # a Unix socket: local by definition
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def listener_tls_context(config: Config) -> ssl.SSLContext | None:
    """The listener's STARTTLS context; ConfigError naming the keys if the files do not
    load (also run by `relay check-config`)."""
    tls = config.listen.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError([f"listen.tls.cert: cannot load {tls.cert} with key {tls.key}:"
                           f" {reason}"]) from None
    return context


async def start_listener(
    config: Config, handler: IngestHandler, limits: SessionLimits
) -> asyncio.Server:
    """Bind listen.host:listen.port in the running loop (port 0: any free port)."""
    # Once, not a getfqdn() per connection; with no FQDN, the bound address as a literal.
    hostname = effective_hostname(config, socket.getfqdn())
    banner: list[str] = [hostname] if hostname else []
    loop = asyncio.get_running_loop()
    tls_context = listener_tls_context(config)

    def factory() -> RelaySMTP:
        listen = handler.config.listen  # read per session: a reload applies to new ones
        auth = handler.auth
        return RelaySMTP(
            handler,
            limits,
            data_size_limit=listen.max_message_size,
            enable_SMTPUTF8=True,
            hostname=banner[0],
            ident="relay",
            timeout=listen.timeout,
            tls_context=tls_context,
            require_starttls=bool(listen.tls and listen.tls.required),
            auth_required=auth.required,
            # With TLS configured, AUTH waits for STARTTLS; without it (loopback only, see
            # config) plain AUTH is allowed.
            auth_require_tls=tls_context is not None,
            loop=loop,
        )

    server = await loop.create_server(factory, host=config.listen.host, port=config.listen.port)
    if not banner:  # (set before the loop can accept a connection)
        banner.append(address_literal(str(server.sockets[0].getsockname()[0])))
    return server


# aiosmtpd calls inspect.signature(handle_EHLO) for every session to pick the hook's
# calling convention; computed once here, inspect reads it back from __signature__.
IngestHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    IngestHandler.handle_EHLO
)
