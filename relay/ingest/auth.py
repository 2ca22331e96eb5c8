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

from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from relay.config.schema import ListenAuthConfig, ListenUserConfig

# OWASP's minimum argon2id parameters (19 MiB, 2 passes): about 20 ms a verification.
# The listener runs verifications in a worker thread, never on the event loop.
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
    """Checks listener logins; ``check`` blocks for an argon2 verification (use a thread)."""

    def __init__(self, config: ListenAuthConfig) -> None:
        self.required = config.required
        self._users = {name: _User(spec) for name, spec in config.users.items()}
        # A failure for an unknown user, or for a password_env/file user (compared in
        # microseconds), costs one verification against this decoy, made with the
        # parameters of the costliest configured hash: failure timing does not tell
        # which user names exist.
        self._decoy_hasher, self._decoy = _decoy([u.hash for u in self._users.values()
                                                  if u.hash])

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    @property
    def decoy_parameters(self) -> Parameters:
        return extract_parameters(self._decoy)

    def check(self, username: str, password: bytes) -> bool:
        user = self._users.get(username)
        if user is not None and user.verify(password):
            return True
        if user is None or user.hash is None:
            with contextlib.suppress(VerificationError):
                self._decoy_hasher.verify(self._decoy, password)
        return False

    def may_use(self, username: str | None, account: str) -> bool:
        """Whether an authenticated user may send through that account."""
        if username is None:
            return not self.required
        user = self._users.get(username)
        return user is not None and (user.accounts is None or account in user.accounts)


_DECOYS: dict[tuple[object, ...], str] = {}


def _decoy(hashes: list[str]) -> tuple[PasswordHasher, str]:
    """A hasher and a hash of no one's password, with the costliest of these hashes'
    parameters (relay's own without any)."""
    candidates = []
    for known in hashes:
        with contextlib.suppress(InvalidHashError):
            candidates.append(extract_parameters(known))
    hasher = _HASHER
    if candidates:
        params = max(candidates, key=lambda p: (p.memory_cost * p.time_cost, p.parallelism))
        hasher = PasswordHasher.from_parameters(params)
    # One hashing per parameter set, not one per start of a listener or reload.
    key = (hasher.type, hasher.time_cost, hasher.memory_cost, hasher.parallelism,
           hasher.hash_len, hasher.salt_len)
    if key not in _DECOYS:
        _DECOYS[key] = hasher.hash("relay: not a user")
    return hasher, _DECOYS[key]
