"""OAuth2 access tokens for SASL XOAUTH2 logins: the pure parts. No I/O.

What to POST to a token endpoint (RFC 6749 4.4 client credentials, 6 refreshing), how to
read its answer, when a token is due for renewal, and how a ``token_command`` is run.
The requests and processes themselves are relay.delivery.smtp.tokens'.

Nothing here puts a token or a secret into an error's text: those texts reach logs,
`relay accounts test` and `relay status`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from relay.printable import escape

# Characters that only mean something to a shell: with any of them, `/bin/sh -c` runs
# the command (a pipe to `jq`, `$HOME`, `~/bin/...`), otherwise it is split like a shell
# would (shlex) and run directly, so a path with no shell syntax needs no quoting rules.
_SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?\[\]{}~\n]")
# A description from the endpoint, kept short: it is for the operator, not a dump.
_DESCRIPTION_CHARS = 200


@dataclass(frozen=True)
class Token:
    """An access token and how long the issuer said it lasts (None: it did not say)."""

    value: str
    expires_in: float | None = None

    def __repr__(self) -> str:  # never the token itself, wherever a repr ends up
        return f"Token(expires_in={self.expires_in!r})"


class TokenError(Exception):
    """No token: ``reason`` is safe to show (no token, secret or command output);
    ``credentials`` when the issuer refused the credentials (not a passing fault)."""

    def __init__(self, reason: str, *, credentials: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.credentials = credentials


def token_form(grant: str, client_id: str, *, client_secret: str | None = None,
               refresh_token: str | None = None, scope: str | None = None) -> dict[str, str]:
    """The form fields of a token request: ``refresh_token`` (Google, RFC 6749 section 6)
    or ``client_credentials`` (Microsoft's app-only SMTP, RFC 6749 section 4.4)."""
    form = {"grant_type": grant, "client_id": client_id}
    if client_secret is not None:
        form["client_secret"] = client_secret
    if grant == "refresh_token":
        assert refresh_token is not None
        form["refresh_token"] = refresh_token
    if scope is not None:
        form["scope"] = scope
    return form


def parse_token_reply(status: int, body: bytes) -> Token:
    """The token in a token endpoint's answer, or TokenError saying why there is none.

    RFC 6749 5.2: an error is a JSON object with ``error`` (a code such as invalid_grant)
    and maybe ``error_description``; 400 and 401 mean the credentials were refused.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise TokenError(f"the token endpoint answered HTTP {status} without a JSON object",
                         credentials=status in (400, 401))
    if status != 200 or "error" in data:
        code = data.get("error")
        what = f"HTTP {status}" + (f" {escape(str(code))[:64]}" if code else "")
        description = data.get("error_description")
        if isinstance(description, str) and description:
            what += f" ({escape(description)[:_DESCRIPTION_CHARS]})"
        refused = status in (400, 401) or code in ("invalid_grant", "invalid_client",
                                                   "unauthorized_client")
        raise TokenError(f"the token endpoint answered {what}", credentials=refused)
    value = data.get("access_token")
    if not isinstance(value, str) or not value.strip():
        raise TokenError("the token endpoint's answer has no access_token")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():  # some issuers send text
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        expires_in = None
    return Token(value.strip(), float(expires_in) if expires_in is not None else None)


def renew_at(obtained_at: float, lifetime: float, margin: float) -> float:
    """When to stop using a token obtained at ``obtained_at`` that lasts ``lifetime``:
    ``margin`` before it expires, but at most half its life early, so a short-lived token
    is still used for a while rather than fetched for every login."""
    return obtained_at + max(0.0, lifetime - min(margin, lifetime / 2))


def command_argv(command: str | list[str]) -> list[str]:
    """The argv that runs a token_command: a list as it is; a string through
    ``/bin/sh -c`` if it has shell syntax (see _SHELL_SYNTAX), else split by shlex."""
    if isinstance(command, list):
        return list(command)
    if _SHELL_SYNTAX.search(command):
        return ["/bin/sh", "-c", command]
    try:
        return shlex.split(command)
    except ValueError:  # an unclosed quote: let the shell say what it makes of it
        return ["/bin/sh", "-c", command]


def command_token(stdout: bytes) -> Token:
    """The token a token_command printed: its first line, trimmed (a trailing newline
    is usual). The output itself never goes into the error: it may be a secret."""
    try:
        text = stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError("token_command printed something that is not UTF-8 text") from None
    lines = text.strip().splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise TokenError("token_command printed no token")
    if any(c.isspace() for c in value):
        raise TokenError("token_command printed a line with spaces in it, not a token"
                         " (its output is not shown: it may hold secrets)")
    return Token(value)
