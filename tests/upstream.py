"""A real SMTP server (aiosmtpd) that plays the upstream provider in tests.

``FakeUpstream`` listens on 127.0.0.1 (ephemeral port) inside the *current*
event loop -- no threads -- records every accepted message, counts
connections and AUTH attempts, and injects faults on request::

    async with FakeUpstream() as up:
        up.fail_data(451, "4.3.0 try later")
        ...  # point the relay at (up.host, up.port), user "user", password "secret"
        await up.wait_for_messages(1)
        assert up.messages[0].data == expected_bytes

Fault methods are plain (synchronous) methods and may be called before
``start()`` or while clients are connected; they take effect for the next
matching command.  Verbs are case-insensitive.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn, Self

from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

__all__ = ["FakeUpstream", "Received"]

# Verbs accepted by delay() / drop_connection_after().  "GREETING" is the
# moment right after accept(), before the banner; "DATA" is after the body's
# final dot has been received, before the final reply.
_COMMANDS: Final = ("HELO", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY")
VERBS: Final = frozenset({"GREETING", *_COMMANDS})


@dataclass(frozen=True)
class Received:
    """One message accepted by the upstream (250 after DATA)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # envelope.original_content: exact bytes after dot-unstuffing
    received_at: float  # time.monotonic()
    connection_id: int
    mail_options: tuple[str, ...] = ()  # e.g. ("SMTPUTF8", "BODY=8BITMIME")


@dataclass
class _Reply:
    code: int
    text: str
    remaining: int | None  # None = forever
    skip: int = 0  # let this many through first

    @property
    def line(self) -> str:
        """One reply line, or a multi-line reply (RFC 5321 4.2.1) when text has newlines."""
        lines = self.text.split("\n")
        return "\r\n".join(f"{self.code}-{t}" for t in lines[:-1]) + (
            "\r\n" if len(lines) > 1 else "") + f"{self.code} {lines[-1]}"

    def take(self) -> str | None:
        """Consume one use; return the reply line, or None when used up."""
        if self.skip > 0:
            self.skip -= 1
            return None
        if self.remaining is None:
            return self.line
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return self.line


def _verb(verb: str) -> str:
    v = verb.upper()
    if v not in VERBS:
        raise ValueError(f"unknown verb {verb!r}; expected one of {sorted(VERBS)}")
    return v


def _check_times(times: int) -> None:
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")


@dataclass
class _Faults:
    greeting: str | None = None
    data: collections.deque[str] = field(default_factory=collections.deque)
    message_attempts: dict[bytes, _Reply] = field(default_factory=dict)
    rcpt: dict[str, _Reply] = field(default_factory=dict)
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    drops_after_accept: int = 0  # DATA: record the message, then drop
    delays: dict[str, float] = field(default_factory=dict)
    delay_skips: dict[str, int] = field(default_factory=dict)  # undelayed ones first
    auth: bool = False
    # verb -> (reply, close after it): answered instead of running the command
    replies: dict[str, tuple[_Reply, bool]] = field(default_factory=dict)
    mail: _Reply | None = None
    # Postfix smtpd_client_connection_count_limit: 421 at the greeting beyond this many.
    connection_limit: int | None = None


class _UpstreamSMTP(SMTP):
    """aiosmtpd's SMTP protocol plus connection bookkeeping and fault hooks."""

    def __init__(self, upstream: FakeUpstream, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.upstream = upstream
        self.connection_id = 0
        self._counted = False
        # Every command is dispatched through this table (built from the
        # smtp_* methods in SMTP.__init__); wrap each entry to log the command
        # and apply delay/drop faults.  functools.wraps keeps the @syntax
        # attributes that HELP relies on.
        self._smtp_methods = {
            verb: self._wrap_command(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _wrap_command(
        self, verb: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)
        async def dispatch(arg: str | None) -> None:
            self.upstream.commands.append((self.connection_id, verb))
            self.upstream.command_times.append(time.monotonic())
            if verb != "DATA":  # DATA faults apply after the body (see _Handler)
                await self.apply_faults(verb)
            if await self.maybe_reply(verb):
                return
            await method(arg)

        return dispatch

    async def apply_faults(self, verb: str) -> None:
        """Drop the connection, or sleep, if a fault is armed for ``verb``."""
        self.maybe_drop(verb)
        await self.maybe_delay(verb)

    async def maybe_reply(self, verb: str) -> bool:
        """Answer ``verb`` with an armed reply (and close, if asked); True if it did."""
        armed = self.upstream.faults.replies.get(verb)
        line = armed[0].take() if armed else None
        if armed is None or line is None:
            return False
        await self.push(line)
        if armed[1]:
            assert self.transport is not None
            self.transport.close()  # (close, not abort: the reply goes out first)
            raise asyncio.CancelledError
        return True

    def maybe_drop(self, verb: str) -> None:
        drops = self.upstream.faults.drops
        if drops[verb] > 0:
            drops[verb] -= 1
            self.drop()

    async def maybe_delay(self, verb: str) -> None:
        faults = self.upstream.faults
        seconds = faults.delays.get(verb)
        if faults.delay_skips.get(verb, 0) > 0:
            faults.delay_skips[verb] -= 1
            return
        if seconds:
            await asyncio.sleep(seconds)

    def abort(self) -> None:
        """Close the socket now, discarding anything not yet sent."""
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()
        elif self.transport is not None:
            self.transport.close()

    def drop(self) -> NoReturn:
        """Close the socket without replying and end this session's task."""
        self.abort()
        # Unwinds _handle_client exactly like aiosmtpd's own "connection lost"
        # path (it catches CancelledError, closes the writer and re-raises).
        raise asyncio.CancelledError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:  # (would be called again after STARTTLS; we have none)
            self._counted = True
            self.connection_id = self.upstream._connection_made(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._counted:
                self._counted = False
                self.upstream._connection_lost(self)

    async def _handle_client(self) -> None:
        await self.apply_faults("GREETING")
        greeting = self.upstream.faults.greeting
        limit = self.upstream.faults.connection_limit
        if limit is not None and self.upstream.connections_open > limit:
            self.upstream.connections_refused += 1
            greeting = "421 4.7.0 upstream.test Error: too many connections from 127.0.0.1"
        if greeting is not None:
            await self.push(greeting)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine


class _Handler:
    """aiosmtpd handler hooks (kept separate so FakeUpstream has no handle_* names)."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def handle_EHLO(
        self,
        server: _UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.upstream.ehlo_names.append(hostname)
        if not self.upstream.eightbitmime:  # (aiosmtpd always offers it)
            responses.remove("250-8BITMIME")
        if self.upstream.pipelining:
            # aiosmtpd reads commands one line at a time, so it serves pipelined
            # clients correctly; it only does not say so.
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def auth_XOAUTH2(self, server: _UpstreamSMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail answers it: a refused token gets a 334 with a base64
        JSON error, the client's empty line, then 535 5.7.8 (aiosmtpd's)."""
        blob = args[1] if len(args) > 1 else None
        if blob is None:
            raw = await server.challenge_auth("", encode_to_b64=False)
            if raw is MISSING:
                return AuthResult(success=False)
            assert isinstance(raw, bytes)
        else:
            try:
                raw = base64.b64decode(blob, validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        user, token = self.upstream._xoauth2_parts(raw)
        self.upstream.xoauth2_logins.append((user, token))
        if self.upstream._token_valid(user, token):
            self.upstream.auth_successes += 1
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        self.upstream.auth_failures += 1
        error = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
        await server.challenge_auth(error)  # the client answers with an empty line
        return AuthResult(success=False, handled=False)

    async def handle_MAIL(
        self,
        server: _UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        rule = self.upstream.faults.mail
        if rule is not None:
            reply = rule.take()
            if reply is not None:
                return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: _UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        rule = self.upstream.faults.rcpt.get(address)
        if rule is not None:
            reply = rule.take()
            if reply is not None:
                return reply
        limit = self.upstream.recipient_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Error: too many recipients"  # Postfix's smtpd_recipient_limit
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: _UpstreamSMTP, session: Session, envelope: Envelope) -> str:
        # Called once the whole body has been read, before the final reply.
        faults = self.upstream.faults
        server.maybe_drop("DATA")
        reply = self._verdict(server, envelope)
        if reply.startswith("250") and faults.drops_after_accept > 0:
            faults.drops_after_accept -= 1
            server.drop()
        # The verdict (and recording) comes first, like a real server that
        # commits the message and is then slow to answer: a client that gives
        # up waiting has still delivered it.
        await server.maybe_delay("DATA")
        return reply

    def _verdict(self, server: _UpstreamSMTP, envelope: Envelope) -> str:
        """Reply for this transaction; records the message when accepting it."""
        faults = self.upstream.faults
        data = envelope.original_content
        assert data is not None and envelope.mail_from is not None
        for marker, rule in faults.message_attempts.items():
            if marker in data:
                reply = rule.take()
                if reply is not None:
                    return reply
        if faults.data:
            return faults.data.popleft()
        self.upstream._record(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data,
                received_at=time.monotonic(),
                connection_id=server.connection_id,
                mail_options=tuple(envelope.mail_options),
            )
        )
        return "250 2.0.0 OK queued"


class FakeUpstream:
    """A real SMTP server on 127.0.0.1 for the relay to deliver to."""

    host: Final = "127.0.0.1"

    def __init__(
        self,
        *,
        username: str | None = "user",
        password: str = "secret",
        hostname: str = "upstream.test",
        smtputf8: bool = True,
        pipelining: bool = True,
        eightbitmime: bool = True,
        recipient_limit: int | None = None,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        tls_context: ssl.SSLContext | None = None,
        xoauth2: bool = False,
    ) -> None:
        self.username = username
        # SASL XOAUTH2 offered beside the password mechanisms; accept_token() says
        # which bearer tokens are good, and until when.
        self.xoauth2 = xoauth2
        self.tokens: dict[str, float] = {}  # token -> time.monotonic() it expires
        self.xoauth2_logins: list[tuple[str, str]] = []  # (user, token) of each try
        self.tls_context = tls_context  # STARTTLS offered (and required) with this
        self.password = password
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        # Per transaction: further RCPTs get "452 4.5.3 Error: too many recipients".
        self.recipient_limit = recipient_limit
        self.data_size_limit = data_size_limit
        self.port = 0

        self.messages: list[Received] = []
        self.connections_opened = 0
        self.connection_times: list[float] = []  # time.monotonic() of each connection
        self.connections_open = 0
        self.connections_open_peak = 0  # the most open at once (pool.max_connections)
        self.auth_successes = 0
        self.auth_failures = 0
        self.connections_refused = 0  # by limit_connections()
        # Sessions logged in now, and the most at once, per login (a provider's limit of
        # concurrent connections per account).
        self.sessions_by_login: collections.Counter[str] = collections.Counter()
        self.sessions_by_login_peak: collections.Counter[str] = collections.Counter()
        self.commands: list[tuple[int, str]] = []  # (connection_id, VERB)
        self.command_times: list[float] = []  # time.monotonic() of each entry in commands
        self.ehlo_names: list[str] = []  # the name given in each EHLO, in order
        self.faults = _Faults()

        self._server: asyncio.Server | None = None
        self._handler = _Handler(self)
        self._sessions: set[_UpstreamSMTP] = set()
        # Set (and replaced) whenever messages/connections change; waiters
        # re-check their predicate on each change.
        self._changed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeUpstream already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and abort every client connection; waits until closed."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        tasks = [s.session_task for s in sessions if s.session_task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._wait_until(lambda: self.connections_open == 0, 5, "all connections closed")
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _make_protocol(self) -> _UpstreamSMTP:
        auth = self.username is not None
        with warnings.catch_warnings():
            # aiosmtpd warns (UserWarning) whenever AUTH is required without
            # TLS.  That is deliberate here -- a loopback test server speaking
            # plain TCP -- and the suite runs with filterwarnings=error.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return _UpstreamSMTP(
                self,
                self._handler,
                hostname=self.hostname,
                decode_data=False,
                enable_SMTPUTF8=self.smtputf8,
                data_size_limit=self.data_size_limit,
                auth_required=auth,
                # With no username, leave aiosmtpd's "AUTH needs TLS" default
                # on: since there is no TLS, AUTH is then neither advertised
                # in EHLO nor accepted (538).
                auth_require_tls=not auth,
                authenticator=self._authenticate,
                auth_exclude_mechanism=[] if self.xoauth2 else ["XOAUTH2"],
                tls_context=self.tls_context,
                require_starttls=self.tls_context is not None,
                loop=asyncio.get_running_loop(),
            )

    # -- observations --------------------------------------------------------

    def times_of(self, verb: str) -> list[float]:
        """When each ``verb`` command arrived (time.monotonic()), in order."""
        return [t for (_, v), t in zip(self.commands, self.command_times, strict=True)
                if v == verb.upper()]

    def recipients_received(self) -> list[str]:
        """Accepted recipients of all recorded messages, in order."""
        return [rcpt for msg in self.messages for rcpt in msg.rcpt_tos]

    # A timeout argument (rather than asking callers to wrap in asyncio.timeout)
    # lets the AssertionError say what was awaited and what state was reached.
    async def wait_for_messages(self, n: int, timeout: float = 10) -> None:
        """Wait until at least ``n`` messages have been accepted; AssertionError on timeout."""
        await self._wait_until(lambda: len(self.messages) >= n, timeout, f"at least {n} message(s)")

    async def wait_for_connections_open(self, n: int, timeout: float = 10) -> None:
        """Wait until exactly ``n`` client connections are open (server's view)."""
        await self._wait_until(
            lambda: self.connections_open == n, timeout, f"{n} open connection(s)"
        )

    async def _wait_until(self, predicate: Callable[[], bool], limit: float, what: str) -> None:
        try:
            async with asyncio.timeout(limit):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"FakeUpstream: timed out after {limit}s waiting for {what}; {self._summary()}"
            ) from None

    def _summary(self) -> str:
        recent = ", ".join(f"{cid}:{verb}" for cid, verb in self.commands[-15:])
        return (
            f"messages={len(self.messages)} recipients={self.recipients_received()} "
            f"connections_opened={self.connections_opened} "
            f"connections_open={self.connections_open} "
            f"auth_successes={self.auth_successes} auth_failures={self.auth_failures} "
            f"last commands=[{recent}]"
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _record(self, received: Received) -> None:
        self.messages.append(received)
        self._notify()

    def _connection_made(self, session: _UpstreamSMTP) -> int:
        self.connections_opened += 1
        self.connection_times.append(time.monotonic())
        self.connections_open += 1
        self.connections_open_peak = max(self.connections_open_peak, self.connections_open)
        self._sessions.add(session)
        self._notify()
        return self.connections_opened

    def _connection_lost(self, session: _UpstreamSMTP) -> None:
        login = getattr(session, "login", None)
        if login is not None:
            self.sessions_by_login[login] -= 1
        self.connections_open -= 1
        self._sessions.discard(session)
        self._notify()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            not self.faults.auth
            and self.username is not None
            and isinstance(auth_data, LoginPassword)
            and auth_data.login == self.username.encode()
            and auth_data.password == self.password.encode()
        )
        if ok:
            self.auth_successes += 1
            login = auth_data.login.decode()
            server.login = login  # type: ignore[attr-defined]
            self.sessions_by_login[login] += 1
            self.sessions_by_login_peak[login] = max(self.sessions_by_login_peak[login],
                                                     self.sessions_by_login[login])
            return AuthResult(success=True, auth_data=auth_data)
        self.auth_failures += 1
        # handled=False makes aiosmtpd send "535 5.7.8 Authentication
        # credentials invalid"; its default (handled=True) sends no reply.
        return AuthResult(success=False, handled=False)

    def accept_token(self, token: str, lifetime: float = 3600.0) -> None:
        """XOAUTH2 logins with ``token`` succeed for ``lifetime`` seconds from now."""
        self.tokens[token] = time.monotonic() + lifetime

    def revoke_tokens(self) -> None:
        """Every token accepted so far is refused from now on (a revoked grant)."""
        self.tokens.clear()

    @staticmethod
    def _xoauth2_parts(raw: bytes) -> tuple[str, str]:
        """(user, token) of 'user=U^Aauth=Bearer T^A^A'; empty strings where malformed."""
        fields = dict(f.partition("=")[::2] for f in raw.decode(errors="replace").split("\x01"))
        auth = fields.get("auth", "")
        return fields.get("user", ""), auth.removeprefix("Bearer ") if auth.startswith(
            "Bearer ") else ""

    def _token_valid(self, user: str, token: str) -> bool:
        expires = self.tokens.get(token)
        return (not self.faults.auth and user == self.username and expires is not None
                and time.monotonic() < expires)

    # -- fault injection -----------------------------------------------------

    def fail_data(self, code: int, text: str, times: int = 1) -> None:
        """The next ``times`` DATA transactions get ``code text``; nothing is recorded."""
        _check_times(times)
        self.faults.data.extend([f"{code} {text}"] * times)

    def fail_message_attempts(self, marker: bytes, code: int, text: str, times: int) -> None:
        """A DATA whose body contains ``marker`` gets ``code text`` for its first ``times`` tries.

        Counted per marker; afterwards such a message is accepted normally.
        """
        _check_times(times)
        self.faults.message_attempts[marker] = _Reply(code, text, times)

    def refuse_rcpt(self, address: str, code: int, text: str, times: int | None = None) -> None:
        """RCPT TO ``address`` (exact match) gets ``code text``; ``times=None`` means always."""
        if times is not None:
            _check_times(times)
        self.faults.rcpt[address] = _Reply(code, text, times)

    def reply_to(self, verb: str, code: int, text: str, times: int = 1, *,
                 close: bool = False, after: int = 0) -> None:
        """Answer the next ``times`` ``verb`` commands with ``code text`` instead of running
        them; ``close=True`` closes the connection after the reply (a 421 and hang-up),
        else it stays open (Exim's 421 "too many messages in this connection" at MAIL).

        "DATA" is the DATA command itself; see fail_data for the reply after the dot.
        ``after``: let that many ``verb`` commands run normally first.
        """
        _check_times(times)
        v = _verb(verb)
        if v == "GREETING":
            raise ValueError("use greeting() for the banner")
        self.faults.replies[v] = (_Reply(code, text, times, after), close)

    def greeting(self, code: int | None, text: str = "") -> None:
        """Send ``code text`` instead of the 220 banner and close; ``None`` restores normal."""
        self.faults.greeting = None if code is None else f"{code} {text}"

    def drop_connection_after(self, verb: str, times: int = 1, *, accepted: bool = False) -> None:
        """Abort the connection without replying after receiving ``verb``, ``times`` times.

        "DATA" means after the body's final dot; the message is not recorded,
        unless ``accepted=True``: then the next ``times`` messages that would
        be accepted are recorded and the connection dies before the 250 is
        sent (the "delivered, but the client never heard" case).
        "GREETING" means right after accept, before the banner.
        """
        _check_times(times)
        v = _verb(verb)
        if accepted:
            if v != "DATA":
                raise ValueError("accepted=True only makes sense for DATA")
            self.faults.drops_after_accept += times
        else:
            self.faults.drops[v] += times

    def delay(self, verb: str, seconds: float, *, after: int = 0) -> None:
        """Sleep ``seconds`` before replying to ``verb`` (0 removes the delay).

        "DATA" delays the final reply to the body, *after* the message has
        been recorded (if accepted); "GREETING" delays the banner.
        ``after``: let that many ``verb`` commands through undelayed first.
        """
        v = _verb(verb)
        self.faults.delay_skips[v] = after
        if seconds > 0:
            self.faults.delays[v] = seconds
        else:
            self.faults.delays.pop(v, None)

    def fail_mail(self, code: int, text: str, times: int | None = None) -> None:
        """MAIL FROM gets ``code text``; ``times=None`` means always (until cleared)."""
        if times is not None:
            _check_times(times)
        self.faults.mail = _Reply(code, text, times)

    def limit_connections(self, limit: int | None) -> None:
        """Beyond ``limit`` open connections, answer the greeting with 421 and close
        (Postfix's smtpd_client_connection_count_limit); None removes the limit."""
        self.faults.connection_limit = limit

    def fail_auth(self, enabled: bool = True) -> None:
        """While enabled, every AUTH answers 535 5.7.8."""
        self.faults.auth = enabled

    def clear_faults(self) -> None:
        self.faults = _Faults()

    async def say_unasked(self, line: str) -> None:
        """Send ``line`` to every open connection without being asked (a 421 before an
        idle close, as servers do); the connections stay open."""
        for session in list(self._sessions):
            await session.push(line)

    def close_idle_connections(self) -> None:
        """Close every open client connection from the server side (no reply sent).

        The server's counters update once the loop has processed the close;
        ``await wait_for_connections_open(0)`` to observe it.
        """
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
