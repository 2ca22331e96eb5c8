"""Where an XOAUTH2 account's access tokens come from: a token endpoint (aiohttp) or a
token_command (a child process), fetched once and reused until due for renewal.

One ``TokenSource`` per account and process. Fetches are serialised, so connections
opening at once share one fetch. Failures become TemporaryFailure about the account
(it backs off); their texts name the account and the cause, never a token, a secret or
what a command printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable

import aiohttp

from relay.config.schema import OAuthConfig
from relay.delivery.oauth import (
    Token,
    TokenError,
    command_argv,
    command_token,
    parse_token_reply,
    renew_at,
    token_form,
)
from relay.errors import TemporaryFailure, TokenRefused
from relay.printable import escape

# Cap on what is read of a command's output or an endpoint's answer: a token is a few KB.
_MAX_OUTPUT = 64 * 1024
_EXIT_POLL_S = 0.02  # a token_command that printed its line: how often to look for its exit


class TokenSource:
    """The account's current access token; a new one when it is due or was refused."""

    def __init__(self, account: str, auth: OAuthConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.account = account
        self.auth = auth
        self._clock = clock
        self._token: Token | None = None
        self._renew_at = 0.0  # monotonic
        self._lock = asyncio.Lock()
        self.fetches = 0  # tokens obtained (a command run or an endpoint request)
        self._failures = 0
        self._failure: TokenError | None = None

    async def token(self) -> str:
        """A token that is not due for renewal; fetched now if there is none."""
        failures = self._failures
        async with self._lock:
            if self._failures != failures and self._failure is not None:
                # The fetch this one waited for failed: one request per burst of logins.
                raise self._failed(self._failure)
            if self._token is None or self._clock() >= self._renew_at:
                self._token = None
                obtained_at = self._clock()
                try:
                    token = await self._fetch()
                except TokenError as exc:
                    self._failures += 1
                    self._failure = exc
                    raise self._failed(exc) from None
                self._failure = None
                self.fetches += 1
                lifetime = (token.expires_in if token.expires_in is not None
                            else self.auth.token_command_ttl)
                self._token = token
                self._renew_at = renew_at(obtained_at, lifetime, self.auth.refresh_margin)
            return self._token.value

    def _failed(self, exc: TokenError) -> TemporaryFailure:
        """The account cannot log in: it backs off (with the login floor when the issuer
        refused the credentials); the message was never offered (not an attempt)."""
        cls = TokenRefused if exc.credentials else TemporaryFailure
        return cls(f"XOAUTH2 token for account {self.account}: {exc.reason}",
                   account_reason="auth" if exc.credentials else None, account_wide=True,
                   offered=False)

    def refused(self, token: str) -> None:
        """The upstream refused ``token``: the next token() fetches another (unless one
        newer than it is already there)."""
        if self._token is not None and self._token.value == token:
            self._token = None

    async def _fetch(self) -> Token:
        if self.auth.token_command is not None:
            return await self._run_command(self.auth.token_command)
        return await self._request()

    async def _run_command(self, command: str | list[str]) -> Token:
        argv = command_argv(command)
        name = os.path.basename(argv[0]) if argv else "?"
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise TokenError(f"token_command cannot run {escape(name)}:"
                             f" {exc.strerror or type(exc).__name__}") from None
        timeout = self.auth.token_command_timeout
        try:
            async with asyncio.timeout(timeout):
                stdout = await _output(process)
        except TimeoutError:
            _kill(process)
            await process.wait()
            raise TokenError(f"token_command timed out after {timeout:g}s (killed)") from None
        except BaseException:
            _kill(process)
            raise
        finally:
            _close_pipes(process)
        if process.returncode != 0:
            raise TokenError(f"token_command exited with status {process.returncode} (its"
                             " output is not shown: it may hold secrets; run it by hand)")
        return command_token(stdout[:_MAX_OUTPUT])

    async def _request(self) -> Token:
        auth = self.auth
        url = auth.endpoint
        assert url is not None and auth.client_id is not None
        form = token_form(auth.grant, auth.client_id, client_secret=auth.client_secret,
                          refresh_token=auth.refresh_token, scope=auth.effective_scope)
        timeout = aiohttp.ClientTimeout(total=auth.timeout)
        try:
            # Certificates are verified (aiohttp's default); http:// only to loopback
            # (config.schema._token_url). No redirects: a form with secrets is not re-sent.
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    url, data=form, allow_redirects=False,
                    headers={"Accept": "application/json"}) as response:
                body = await response.content.read(_MAX_OUTPUT)
                status = response.status
        except TimeoutError:
            raise TokenError(f"the token endpoint did not answer within {auth.timeout:g}s"
                             ) from None
        except aiohttp.ClientError as exc:
            raise TokenError(f"cannot reach the token endpoint: {_client_error(exc)}") from None
        return parse_token_reply(status, body)


def _client_error(exc: aiohttp.ClientError) -> str:
    """aiohttp's error without the request (its text can carry the URL, never the form)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS failure (certificate not trusted?)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__


async def _output(process: asyncio.subprocess.Process) -> bytes:
    """The command's stdout once it has exited: up to end of file, or, once it exited,
    as soon as a complete line came (a background child it left may hold stdout open
    for ever: that is no timeout). Its exit is polled: asyncio's wait() also waits for
    the pipes to close."""
    assert process.stdout is not None
    out = bytearray()
    reading: asyncio.Future[bytes] | None = None
    try:
        while len(out) < _MAX_OUTPUT:
            line = b"\n" in out
            if line and process.returncode is not None:
                return bytes(out)
            reading = reading or asyncio.ensure_future(process.stdout.read(4096))
            await asyncio.wait([reading], timeout=_EXIT_POLL_S if line else None)
            if reading.done():
                chunk, reading = reading.result(), None
                if not chunk:
                    break  # end of file
                out += chunk
        await process.wait()
        return bytes(out)
    finally:
        if reading is not None and not reading.done():
            reading.cancel()


def _close_pipes(process: asyncio.subprocess.Process) -> None:
    """Our end of its pipes, now: a background child still holding them would otherwise
    keep them open past the event loop's end (asyncio's "Event loop is closed")."""
    transport = getattr(process, "_transport", None)  # asyncio's, not in its API
    if transport is not None and process.returncode is not None:
        transport.close()


def _kill(process: asyncio.subprocess.Process) -> None:
    """The command and what it started (its own session: start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
