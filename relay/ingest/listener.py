"""The SMTP listener (aiosmtpd): the server class with relay's session limits, DATA
reader and replies, and start_listener. What each command does is the handler's
(relay.ingest.handler). relay.ingest is the only package (besides relay.bench) that
imports aiosmtpd.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import base64
import binascii
import functools
import inspect
import ipaddress
import logging
import re
import socket
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable
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
    CONTROL,
    IngestHandler,
    RelayEnvelope,
    RelaySession,
    hook_names,
    peer_text,
)
from relay.ingest.throttle import LoginThrottle, client_key
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
_POSTMASTER = re.compile(r" *<(postmaster)>(?: (.*))?", re.IGNORECASE | re.DOTALL)
_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\b")


# RFC 5321 4.1.2 Path = "<" Mailbox ">": the plain dot-atom@domain form most clients send.
# Anything else (quoted local parts, address literals, odd spacing) takes aiosmtpd's parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)",
    re.DOTALL,
)


def _b64(text: str | bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


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


class _SessionReader(asyncio.StreamReader):
    """The session's input. Every chunk that arrives calls ``on_data`` (the idle timer
    counts reads, not commands); the end of input while a line is awaited ends the
    session as a cancel does (aiosmtpd's way), after every command before it is done."""

    on_data: Callable[[], None] | None = None

    def feed_data(self, data: Any) -> None:
        super().feed_data(data)
        if self.on_data is not None:
            self.on_data()

    def give_back(self, data: bytes) -> None:
        """Put bytes read too far back in front, even after the end of input (a client
        that sent its data and QUIT, then half-closed)."""
        # StreamReader's buffer (aiosmtpd's STARTTLS clears it the same way).
        self._buffer[:0] = data  # type: ignore[attr-defined]

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            return await super().readuntil(separator)
        except asyncio.IncompleteReadError:  # end of input: the client has no more
            raise asyncio.CancelledError from None


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
        if reader.rest:
            self._give_back(reader.rest)
        if reader.state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif reader.state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        if reader.state is not DataState.NOMINAL:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = reader.content()
        self.envelope.content = self.envelope.original_content = content
        # Shielded: a client that goes mid-commit does not cut the commit in half (the
        # write itself goes on in the store's thread): the message is stored and logged
        # as received, or refused, never stored without its log line.
        commit = asyncio.ensure_future(self._call_handler_hook("DATA"))
        self._committing = True
        try:
            status = await asyncio.shield(commit)
        except asyncio.CancelledError:
            commit.add_done_callback(_log_orphan_failure)
            raise
        finally:
            self._committing = False
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    _committing = False  # inside the DATA hook: the server is busy, not the client idle

    def _give_back(self, rest: bytes) -> None:
        """The client's next commands, read with the data: back to the (now empty)
        stream, in order, for the command loop (a stream past its end takes nothing:
        aiosmtpd's own reader loses them there too)."""
        if not self._reader.at_eof():
            self._reader.feed_data(rest)

    def _lost(self) -> bytes:
        """(end of stream inside DATA) end the session as aiosmtpd does when cancelled."""
        raise asyncio.CancelledError


def _log_orphan_failure(commit: asyncio.Future[Any]) -> None:
    """A commit that went on after its client left: an error is logged, not lost."""
    if not commit.cancelled() and commit.exception() is not None:
        log.error("commit failed after the client left", exc_info=commit.exception())


class _CommandTable(dict[str, Any]):
    """aiosmtpd's command table, where an unknown command finds relay's handler.

    aiosmtpd handles unknown commands itself: a WARNING on mail.log for each (a flood
    of them wrote 9 MB in 10 s) and a 502 after 5, before relay's max_bad_commands."""

    def __init__(self, methods: dict[str, Any],
                 unknown: Callable[[str, str | None], Awaitable[None]]) -> None:
        super().__init__(methods)
        self._unknown = unknown

    def get(self, command: str, default: Any = None) -> Any:
        method = super().get(command)
        return method if method is not None else functools.partial(self._unknown, command)


class RelaySMTP(ChunkedDataSMTP):
    """aiosmtpd's server, hardened: access control at connect, session and error limits,
    enhanced status codes, no cross-protocol requests, a session gauge."""

    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets, CRLF included (aiosmtpd
    # allows 1001). Also the input stream's line limit, far above any command's.
    line_length_limit = 1000

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
        self._client_key: str | None = None  # who the client counts as (client_key)
        self._released = False
        self._bad_path: replies.Reply | None = None  # inside MAIL or RCPT: its syntax reply
        self._refusal: str | None = None
        self._bad_commands = 0
        self._continued: list[str] = []
        # The input stream: aiosmtpd's, with reads resetting the idle timer and the end
        # of input ending the session only once the commands before it are answered.
        reader = _SessionReader(loop=self.loop, limit=self.line_length_limit)
        reader.on_data = self._reset_timeout
        asyncio.StreamReaderProtocol.__init__(
            self, reader, client_connected_cb=self._cb_client_connected, loop=self.loop)
        for verb in _HTTP_VERBS:
            self._smtp_methods[verb] = self._cross_protocol
        self._smtp_methods = _CommandTable(self._smtp_methods, self._unknown_command)

    def _create_envelope(self) -> Envelope:
        return RelayEnvelope()

    def _give_back(self, rest: bytes) -> None:
        assert isinstance(self._reader, _SessionReader)
        self._reader.give_back(rest)

    # AUTH: aiosmtpd's PLAIN and LOGIN call the authenticator synchronously on the loop;
    # these parse the same way and verify in a worker thread (IngestHandler.verify_login).

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            blob = _initial_response(args[1])
            if blob is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        assert isinstance(blob, bytes)
        if not blob:
            await self.push("501 5.5.2 Empty authentication response")
            return AuthResult(success=False)
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
            login = _initial_response(args[1])
            if login is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._verify(LoginPassword(login, password))

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """RFC 5321 3.5.3: relay cannot verify a mailbox but takes mail for any, so 252,
        whatever the argument's form (a user name or a mailbox; aiosmtpd wants a path
        and answers 502, a bad command, otherwise)."""
        if await self.check_auth_needed("VRFY"):
            return
        if not arg:
            await self.push("501 Syntax: VRFY <address>")
            return
        await self.push("252 2.1.5 Cannot VRFY user, but will accept message and attempt"
                        " delivery")

    async def _verify(self, login: LoginPassword) -> AuthResult:
        throttle, client = self._limits.auth_throttle, self._client_key
        user = login.login.decode("utf-8", "replace")
        if client is not None and throttle.locked(client, user, time.monotonic()):
            return await self._auth_locked_out()
        assert self.session is not None
        result = await self._handler.verify_login(self.session, login)
        if not result.success and client is not None:
            locked = throttle.failed(client, user, time.monotonic())
            if locked is not None:
                limit = throttle.client.limit if locked == "client" else throttle.user.limit
                event(log, logging.WARNING, "auth_locked", client=peer_text(self.session),
                      user=user[:64] if locked == "user" else None, failures=limit,
                      lockout=f"{throttle.lockout:g}s")
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
        return hook_names(type(self), ("smtp_", "auth_"))

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

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
        if self._bad_path is replies.BAD_RECIPIENT_SYNTAX:  # inside RCPT
            postmaster = _POSTMASTER.fullmatch(arg)
            if postmaster:  # RFC 5321 4.1.1.3: MUST be accepted, with no domain
                return postmaster.group(1), (postmaster.group(2) or "").lstrip(" ")
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
        self._client_key = client_key(self._client)
        self._refusal = self._limits.open_session(self._client)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # Once per session, whoever reports it first: asyncio (plain TCP, or TLS after
        # its handshake), the TLS layer (_TLSLayer, in any TLS state), or aiosmtpd itself
        # after a failed handshake.
        if self._released:
            return
        self._released = True
        self._limits.close_session(self._client)
        self._gone()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        """The client will send nothing more (a half-close, or TLS close_notify).

        aiosmtpd cancels the session here, even mid-commit: a message could be on disk
        with its 250 never written. Instead the input ends (_SessionReader): the commands
        already received are carried out and answered, then the session ends.

        A wait for the upstream (ack: after_upstream) ends here too: a client that closed
        its side usually closed the whole connection (TCP cannot tell), and its refusal
        must then bounce. One that only half-closed gets 250 and the bounce."""
        self._gone()
        if self._reader is not None:
            self._reader.feed_eof()
        # Keep the TCP connection open for the replies; TLS cannot stay half-open.
        return self.session is None or self.session.ssl is None

    def _gone(self) -> None:
        """Nobody may be left to read an answer (RelaySession.gone)."""
        if isinstance(self.session, RelaySession) and not self.session.gone.done():
            self.session.gone.set_result(None)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's, with a TLS layer that reports the end of the TCP connection in every
        TLS state, and a 503 inside TLS (aiosmtpd starts a second handshake and dies)."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        if not self.tls_context:  # as aiosmtpd answers a listener without TLS
            await self.push("454 TLS not available")
            return
        if self.transport is None or self.transport.is_closing():
            return  # the session already ended (a limit closed it): no handshake to start
        await self.push("220 Ready to start TLS")
        waiter = self.loop.create_future()
        self._tls_protocol = _TLSLayer(self.loop, self, self.tls_context, waiter,
                                       server_side=True, on_lost=self.connection_lost)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if self._released:  # the connection ended before the handshake did
            raise asyncio.CancelledError

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
        status = with_enhanced_code(CONTROL.sub("?", status))
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
        if self._committing:  # relay is busy with the message, not the client idle
            self._reset_timeout()
            return
        handshaking = self._tls_protocol is not None and self.session is not None and (
            self.session.ssl is None)
        # aiosmtpd closes idle sessions silently; RFC 5321 4.2.2 wants a 421 first (not
        # in the middle of a TLS handshake: plain text there is noise to the client).
        if self.transport is not None and not self.transport.is_closing() and not (
                handshaking):
            self._writer.write(b"421 4.4.2 Idle timeout, closing connection\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's TLS handshake failed (not TLS, or it refused our certificate):
            # its problem, not an internal error. aiosmtpd closes the connection.
            event(log, logging.WARNING, "rejected", reason="TLS handshake failed",
                  client=peer_text(self.session) if self.session else None)
            return "421 4.7.0 TLS handshake failed"
        status: str = await super().handle_exception(error)
        return status

    async def _unknown_command(self, command: str, arg: str | None) -> None:
        """A command relay does not know: a bad command like any other (max_bad_commands),
        answered without aiosmtpd's own limit of 5 and its WARNING line per command."""
        await self.push(f'500 Error: command "{command}" not recognized')

    async def _cross_protocol(self, arg: str | None) -> None:
        """An HTTP request line: drop the connection without a word (no SMTP from browsers)."""
        self._limits.metrics.rejected.labels("cross_protocol").inc()
        event(log, logging.WARNING, "rejected", reason="HTTP request on the SMTP port",
              client=peer_text(self.session) if self.session else None)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _TLSLayer(sslproto.SSLProtocol):
    """asyncio's TLS protocol, telling the session when the TCP connection under it ends.

    asyncio tells the session (the app protocol) only after a completed handshake; a
    client that sent STARTTLS and then nothing, or went mid-handshake, would keep its
    session slot forever."""

    def __init__(self, *args: Any, on_lost: Callable[[Any], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._on_lost(exc)


def _initial_response(text: str) -> bytes | None:
    """An AUTH initial response: base64, or "=" for an empty one (RFC 4954 4)."""
    return b"" if text == "=" else _b64(text)


class SessionLimits:
    """Listener-wide state shared by all sessions: counts and access rules."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sessions = 0
        self.per_client: dict[str | None, int] = {}
        auth = config.listen.auth
        self.auth_throttle = LoginThrottle(auth.max_failures, auth.max_failures_per_client,
                                           auth.failure_window, auth.lockout)
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take new limits (SIGHUP); sessions already open keep theirs."""
        self.max_sessions = config.listen.max_connections
        self.max_per_client = config.listen.max_connections_per_client
        self.max_bad_commands = config.listen.max_bad_commands
        self.networks = config.listen.networks()
        auth = config.listen.auth
        self.auth_throttle.configure(auth.max_failures, auth.max_failures_per_client,
                                     auth.failure_window, auth.lockout)

    def open_session(self, host: str | None) -> str | None:
        """Count a new connection (always: close_session uncounts it); the refusal, if any."""
        self.sessions += 1
        client = client_key(host)
        self.per_client[client] = self.per_client.get(client, 0) + 1
        self.metrics.sessions_active.inc()
        if not self.allowed(host):
            self.metrics.rejected.labels("access_denied").inc()
            return "554 5.7.1 Access denied: your address is not allowed to relay"
        if self.sessions > self.max_sessions:
            self.metrics.rejected.labels("too_many_connections").inc()
            return "421 4.7.0 Too many connections, try again later"
        # A Unix socket (host None) has no client address to tell clients apart.
        if client is not None and self.per_client[client] > self.max_per_client:
            self.metrics.rejected.labels("too_many_client_connections").inc()
            return "421 4.7.0 Too many connections from your address, try again later"
        return None

    def close_session(self, host: str | None) -> None:
        self.sessions -= 1
        client = client_key(host)
        left = self.per_client.get(client, 0) - 1
        if left > 0:
            self.per_client[client] = left
        else:  # forget the client: the table holds only clients connected now
            self.per_client.pop(client, None)
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
    config: Config, handler: IngestHandler, limits: SessionLimits, *, reuse_port: bool = False
) -> asyncio.Server:
    """Bind listen.host:listen.port in the running loop (port 0: any free port).

    ``reuse_port``: one of several worker processes on the same port (SO_REUSEPORT: the
    kernel spreads new connections over them).
    """
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

    server = await loop.create_server(factory, host=config.listen.host, port=config.listen.port,
                                      reuse_port=reuse_port or None)
    if not banner:  # (set before the loop can accept a connection)
        banner.append(address_literal(str(server.sockets[0].getsockname()[0])))
    return server


# aiosmtpd calls inspect.signature(handle_EHLO) for every session to pick the hook's
# calling convention; computed once here, inspect reads it back from __signature__.
IngestHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    IngestHandler.handle_EHLO
)
