"""Listener AUTH: who may submit mail, and which accounts each user may choose.

Passwords come from an environment variable, a file, or an argon2 hash (argon2-cffi);
they are resolved once at start and never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from relay.config import ListenAuthConfig, ListenUserConfig

# OWASP's minimum argon2id parameters (19 MiB, 2 passes): about 20 ms a verification.
# aiosmtpd calls the authenticator synchronously, so each failed login blocks the event
# loop that long; successful logins are remembered (below) and cost nothing after the first.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)


def hash_password(password: str) -> str:
    """An argon2id hash for listen.auth.users.NAME.password_hash."""
    return _HASHER.hash(password)


class _User:
    def __init__(self, spec: ListenUserConfig) -> None:
        self.hash = spec.password_hash
        self.secret: bytes | None = None
        if spec.password_env:
            self.secret = os.environ[spec.password_env].encode()
        elif spec.password_file:
            self.secret = spec.password_file.read_text(encoding="utf-8").strip().encode()
        self.accounts = frozenset(spec.accounts) if spec.accounts is not None else None
        # Keyed digest of the last password that verified: an app that logs in on every
        # connection pays for argon2 once, not per message.
        self._key = secrets.token_bytes(32)
        self._verified: bytes | None = None

    def verify(self, password: bytes) -> bool:
        digest = hmac.new(self._key, password, hashlib.sha256).digest()
        if self._verified is not None and hmac.compare_digest(self._verified, digest):
            return True
        if self.secret is not None:
            ok = hmac.compare_digest(self.secret, password)
        else:
            assert self.hash is not None
            try:
                ok = _HASHER.verify(self.hash, password)
            except (VerificationError, InvalidHashError):
                ok = False
        if ok:
            self._verified = digest
        return ok


class ListenerAuth:
    def __init__(self, config: ListenAuthConfig) -> None:
        self.required = config.required
        self._users = {name: _User(spec) for name, spec in config.users.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, username: str, password: bytes) -> bool:
        user = self._users.get(username)
        if user is not None and user.verify(password):
            return True
        # Every failure costs one argon2 verification, whoever the user and wherever the
        # password comes from: failure timing does not tell which user names exist.
        if user is None or user.hash is None:
            _burn_a_verification(password)
        return False

    def may_use(self, username: str | None, account: str) -> bool:
        """Whether an authenticated user may send through that account."""
        if username is None:
            return not self.required
        user = self._users.get(username)
        return user is not None and (user.accounts is None or account in user.accounts)


_dummy_hash: str | None = None


def _burn_a_verification(password: bytes) -> None:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _HASHER.hash("relay: not a real user")
    with contextlib.suppress(VerificationError):
        _HASHER.verify(_dummy_hash, password)
