"""The configuration's schema: pydantic models, validated whole, frozen.

Loading a file and turning pydantic's errors into one line per problem is
relay.config.loading's; what `relay check-config` prints and warns is relay.config.report's.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.config.durations import format_duration, parse_duration
from relay.config.presets import apply_preset
from relay.config.sizes import parse_size
from relay.delivery.rules import RoutingTable, Rule

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _from_text(value: object, kind: type) -> object:
    """A number or switch given as text, as ``${VAR:-587}`` leaves it (relay.config.environ
    substitutes text into values): the text's value. Numbers and switches are otherwise
    strict, so YAML's `yes` or `true` never becomes 1."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind is int and _INTEGER.fullmatch(text):
        return int(text)
    if kind is float and _DECIMAL.fullmatch(text):
        return float(text)
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return value


# Whole numbers, fractions and switches: strict (no bool for a number, no `yes` for 1),
# but text from an environment variable counts.
WholeNumber = Annotated[int, BeforeValidator(lambda v: _from_text(v, int)), Field(strict=True)]
Fraction = Annotated[float, BeforeValidator(lambda v: _from_text(v, float)),
                     Field(strict=True)]
Switch = Annotated[bool, BeforeValidator(lambda v: _from_text(v, bool)), Field(strict=True)]


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0 (0 would mean no wait at all)")
    return seconds


# A delay or timeout where 0 would spin (retry, login backoff) or drop every client.
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
MIN_FREE_FLOOR = 64 * 1024**2  # the default reserve, at least; SQLite's WAL alone grew ~4 MB
Port = Annotated[WholeNumber, Field(ge=0, le=65535)]
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MASK = "********"
# RFC 5321 4.1.2 Domain (at least two labels: Postfix's reject_non_fqdn_helo_hostname and
# many providers refuse a bare name), or an address literal such as [192.0.2.1].
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FQDN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+\.?$")
_ADDRESS_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")


def _hostname(value: object) -> object:
    if value is None or not isinstance(value, str):
        return value
    if _ADDRESS_LITERAL.match(value):
        try:
            ipaddress.ip_address(value[1:-1].removeprefix("IPv6:"))
        except ValueError:
            raise ValueError(f"{value!r} is not a valid address literal") from None
        return value
    if not _FQDN.match(value):
        raise ValueError(
            f"{value!r} is not a fully qualified domain name (it needs a dot) or an"
            " address literal like [192.0.2.1]"
        )
    return value.rstrip(".")


Hostname = Annotated[str, BeforeValidator(_hostname)]
MAX_WORKERS = 64  # more processes than this on one SQLite file only queue on its lock


def parse_workers(value: object) -> object:
    """``auto`` or a whole number from 1 to MAX_WORKERS (a YAML number or its string)."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not 'auto' or a number of worker processes")
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(
            f"{value} workers: use 1 to {MAX_WORKERS} (or auto: one per usable CPU); more"
            " processes on one queue file only wait for each other's commits"
        )
    return value


Workers = Annotated[int | Literal["auto"], BeforeValidator(parse_workers)]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """The number of worker processes ``workers`` asks for on this machine."""
    return min(usable_cpus(), MAX_WORKERS) if workers == "auto" else int(workers)


def default_hostname(fqdn: str) -> str | None:
    """The machine's FQDN if it is one (has a dot); None: use an address literal."""
    try:
        return str(_hostname(fqdn))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_host(a: str, b: str) -> bool:
    """Could two listeners on these hosts collide on one port? (A wildcard overlaps all.)"""
    wildcard = ("0.0.0.0", "::", "")
    return a == b or a in wildcard or b in wildcard


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenUserConfig(_Frozen):
    """A client allowed to AUTH to the listener; the password is never stored in clear."""

    password_env: str | None = None
    password_file: Path | None = None
    # An argon2 hash (argon2-cffi), as printed by `relay hash-password`.
    password_hash: str | None = None
    # X-Account values this user may choose; None: any account.
    accounts: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> ListenUserConfig:
        sources = [k for k in ("password_env", "password_file", "password_hash")
                   if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError("password_hash: give exactly one of password_env, password_file,"
                             " password_hash")
        secrets = (info.context or {}).get("secrets", True)
        # Without secrets, an unset ${VAR} is left as written (relay.config.environ).
        unresolved = not secrets and "${" in (self.password_hash or "")
        if self.password_hash and not unresolved and not self.password_hash.startswith(
                "$argon2"):
            raise ValueError("password_hash: must be an argon2 hash (see `relay hash-password`)")
        if not secrets:
            return self
        if self.password_env and self.password_env not in os.environ:
            raise ValueError(f"password_env: environment variable {self.password_env} is not set")
        if self.password_file and not self.password_file.is_file():
            raise ValueError(f"password_file: cannot read {self.password_file}")
        return self


class ListenAuthConfig(_Frozen):
    required: Switch = False
    users: dict[str, ListenUserConfig] = Field(default_factory=dict)
    # Failed logins for one user name from one client within failure_window before that
    # user's AUTH from that client gets 421 4.7.0 for lockout (like Postfix's anvil);
    # max_failures_per_client counts every user name from the client (all of loopback
    # is one client).
    max_failures: WholeNumber = Field(default=10, ge=1)
    max_failures_per_client: WholeNumber = Field(default=50, ge=1)
    failure_window: Duration = 600.0
    lockout: Duration = 600.0

    @model_validator(mode="after")
    def _users_if_required(self) -> ListenAuthConfig:
        if self.required and not self.users:
            raise ValueError("users: auth.required needs at least one user")
        if self.max_failures_per_client < self.max_failures:
            raise ValueError("max_failures_per_client: must be at least max_failures"
                             f" ({self.max_failures})")
        return self


class ListenTLSConfig(_Frozen):
    cert: Path
    key: Path
    # True: refuse MAIL before STARTTLS (RFC 3207). AUTH always waits for TLS when TLS is on.
    required: Switch = False

    @model_validator(mode="after")
    def _files(self) -> ListenTLSConfig:
        for key in ("cert", "key"):
            if not getattr(self, key).is_file():
                raise ValueError(f"{key}: no such file {getattr(self, key)}")
        return self


LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
Ack = Literal["after_commit", "after_upstream"]
# RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to DATA, but most
# applications give up far sooner: a minute at most, so that they do not retry meanwhile.
MAX_SYNC_TIMEOUT_S = 60.0


def _sync_timeout(seconds: float) -> float:
    if not 0 < seconds <= MAX_SYNC_TIMEOUT_S:
        raise ValueError("must be more than 0 and at most 1m (clients give up waiting"
                         " for the reply to DATA)")
    return seconds


SyncTimeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_sync_timeout)]


class ListenConfig(_Frozen):
    host: str = "127.0.0.1"
    port: Port = 2525
    max_message_size: WholeNumber = Field(default=26_214_400, ge=1024)  # 25 MiB, Gmail's limit
    # The header section (Postfix's header_size_limit, 102,400 bytes): refused beyond it.
    max_header_size: WholeNumber = Field(default=102_400, ge=1024)
    max_recipients: WholeNumber = Field(default=100, ge=1)  # RFC 5321 4.5.3.1.8: at least 100
    max_connections: WholeNumber = Field(default=200, ge=1)
    # Concurrent sessions from one client address (Postfix: smtpd_client_connection_count
    # _limit, 50): one busy or hostile client cannot take every slot.
    max_connections_per_client: WholeNumber = Field(default=20, ge=1)
    timeout: PositiveDuration = 300.0  # RFC 5321 4.5.3.2.7: server timeout of 5 minutes
    # After this many rejected commands in one session: 421 and close.
    max_bad_commands: WholeNumber = Field(default=10, ge=1)
    # reject (default, like Postfix smtpd_forbid_bare_newline): 550 5.5.2 for a bare LF or
    # CR in DATA; normalize: accept and turn them into CRLF.
    bare_newlines: Literal["reject", "normalize"] = "reject"
    # true: MAIL FROM/RCPT TO paths must follow RFC 5321 4.1.2 (501 otherwise); false:
    # aiosmtpd's lenient RFC 5322 parser, like Postfix's strict_rfc821_envelopes = no.
    strict_addresses: Switch = True
    # after_commit: 250 once the message is on disk. after_upstream: then try the upstream
    # for up to sync_timeout first, so that its permanent refusal reaches the client.
    ack: Ack = "after_commit"
    sync_timeout: SyncTimeout = 2.0
    # Clients allowed to connect (CIDR); None means loopback only.
    allowed_networks: list[str] | None = None
    auth: ListenAuthConfig = ListenAuthConfig()
    tls: ListenTLSConfig | None = None

    @model_validator(mode="after")
    def _safe_exposure(self) -> ListenConfig:
        for cidr in self.allowed_networks or []:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"allowed_networks: {cidr!r} is not a CIDR network") from None
        if not is_loopback(self.host):
            if not self.auth.required and self.allowed_networks is None:
                raise ValueError(
                    f"host: {self.host} is not a loopback address; set auth.required: true"
                    " or an explicit allowed_networks, or relay would be an open relay"
                )
            if self.auth.users and self.tls is None:
                raise ValueError(
                    "tls: listener AUTH on a non-loopback address needs tls (cert and key),"
                    " or passwords would cross the network in clear"
                )
        return self

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        cidrs = self.allowed_networks if self.allowed_networks is not None else LOOPBACK_NETWORKS
        return [ipaddress.ip_network(c, strict=False) for c in cidrs]


class QueueConfig(_Frozen):
    path: Path = Path("relay-data/queue.sqlite3")
    # group: one sync for all messages committed together (default); per-message: one
    # sync per message, kept so the benchmark can show what group commit buys.
    commit: Literal["group", "per-message"] = "group"
    # Delivered messages (their envelope and attempts; the body is gone already) stay
    # this long for `relay queue show`, then are pruned, a small batch at a time.
    keep_delivered: Duration = 7 * 86400.0
    # Like Postfix's queue_minfree: below this much free space on the queue's file system
    # DATA answers 452 4.3.1 and /readyz fails, so claims and outcomes, which must write
    # to deliver, still find room. None: max(64MiB, 2 x listen.max_message_size).
    min_free: Size | None = None
    # A PostgreSQL queue shared by relays on several hosts (docs/scaling.md), instead of
    # the SQLite file at ``path``: postgresql://user@host:port/db, or any libpq
    # connection string (service=..., a passfile, PGPASSFILE work as with psql).
    url: str | None = None
    password_env: str | None = None  # the database password, kept out of the URL
    password_file: Path | None = None
    # The relay answers 250 only once a commit is durable, so it refuses a server whose
    # synchronous_commit is off or local unless this is set (accepting that a server crash
    # may lose mail already answered 250).
    allow_unsafe_commit: Switch = False
    # How long a new connection or one statement may take before DATA answers 451 4.3.0
    # and /readyz fails: the database being away must never hang a client.
    connect_timeout: PositiveDuration = 5.0
    statement_timeout: PositiveDuration = 10.0
    # A relay whose heartbeat row is this old is gone: its claims go back to the queue.
    # Shorter: a killed relay's mail moves on sooner; a relay cut off from the database
    # longer than this may see its sends repeated by another relay.
    heartbeat_ttl: PositiveDuration = 30.0

    _secret: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_store(self, info: ValidationInfo) -> QueueConfig:
        if self.url is None:
            for key in ("password_env", "password_file"):
                if getattr(self, key):
                    raise ValueError(f"{key}: only for a PostgreSQL queue (queue.url)")
            return self
        if "path" in self.model_fields_set:
            raise ValueError("url: give either queue.path (SQLite) or queue.url (PostgreSQL),"
                             " not both")
        if not self.url.strip():
            raise ValueError("url: empty")
        if "://" in self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url: must start with postgresql:// (or be a libpq"
                             " connection string such as 'service=relay')")
        if self.password_env and self.password_file:
            raise ValueError("password_file: give only one of password_env, password_file")
        if (info.context or {}).get("secrets", True):
            self._secret = self._read_secret()
        return self

    def _read_secret(self) -> str | None:
        return _secret_from("password", self.password_env, self.password_file)

    @property
    def secret(self) -> str | None:
        """The database password from password_env/password_file; never logged."""
        return self._secret


class MetricsConfig(_Frozen):
    enabled: Switch = True
    host: str = "127.0.0.1"
    port: Port = 9025


class ShutdownConfig(_Frozen):
    """What SIGTERM does, in the order an orchestrator needs (docs/kubernetes.md)."""

    # /readyz fails at once, but the listener keeps accepting this long, so that a load
    # balancer or Kubernetes Service stops sending here before connections are refused.
    drain_delay: Duration = 0.0
    # Then the listener stops and in-flight sends get this long to finish; the rest go
    # back to the queue (nothing is lost either way, only sent later).
    grace: Duration = 5.0


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # None: stderr (systemd's journal, docker logs). A file is reopened when logrotate
    # moves it (logging.handlers.WatchedFileHandler).
    file: Path | None = None


class RetryConfig(_Frozen):
    initial_delay: PositiveDuration = 30.0
    max_delay: Duration = 1800.0
    max_age: Duration = 172_800.0
    jitter: Fraction = Field(default=0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay: must be at least initial_delay")
        return self


class RetryOverride(_Frozen):
    """An account's retry block: only the keys it sets, laid over the top-level block.

    No cross-key checks here: a block alone is not a policy, so the order of delays is
    checked on the merged one (``Config.retry_for``), the policy that actually runs.
    """

    initial_delay: PositiveDuration | None = None
    max_delay: Duration | None = None
    max_age: Duration | None = None
    jitter: Fraction | None = Field(default=None, ge=0, le=1)

    def keys(self) -> dict[str, float]:
        """The keys this block sets, and their values."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AuthBackoffConfig(_Frozen):
    """How long an account waits after the upstream refused its login (535).

    Its own floor, apart from retry delays: providers lock an account after a few failed
    logins, so a wrong password is tried once a minute at most, then less often.
    """

    initial: PositiveDuration = 60.0
    max: Duration = 1800.0

    @model_validator(mode="after")
    def _ordered(self) -> AuthBackoffConfig:
        if self.max < self.initial:
            raise ValueError("max: must be at least initial")
        return self


class PoolConfig(_Frozen):
    max_connections: WholeNumber = Field(default=5, ge=1, le=100)
    max_messages_per_connection: WholeNumber = Field(default=100, ge=1)
    idle_timeout: Duration = 300.0


# Each limit key and its window. Every window slides (any span of that length, as the
# limiter counts): per_day is already a rolling 24 hours; per_rolling_day says so by name,
# as Gmail and SES count, and is what the presets set.
WINDOW_SECONDS = {"per_second": 1.0, "per_minute": 60.0, "per_hour": 3600.0,
                  "per_day": 86400.0, "per_rolling_day": 86400.0}


def _percent(value: object) -> object:
    """``10%`` or a fraction (0.1): the fraction."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        if not _DECIMAL.fullmatch(number):
            raise ValueError(f"{value!r} is not a percentage like 10%")
        return float(number) / 100
    return _from_text(value, float)


class RateLimitConfig(_Frozen):
    per_second: WholeNumber | None = Field(default=None, ge=1)
    per_minute: WholeNumber | None = Field(default=None, ge=1)
    per_hour: WholeNumber | None = Field(default=None, ge=1)
    per_day: WholeNumber | None = Field(default=None, ge=1)
    per_rolling_day: WholeNumber | None = Field(default=None, ge=1)
    on_limit: Literal["defer", "reject"] = "defer"
    # This share of every window is kept for high-priority mail: normal and low mail may
    # use only the rest (docs/routing.md). 0: none kept.
    reserve_for_high: Annotated[float, BeforeValidator(_percent), Field(strict=True, ge=0,
                                                                        lt=1)] = 0.0

    @model_validator(mode="after")
    def _reserve_needs_a_window(self) -> RateLimitConfig:
        if self.reserve_for_high and not self.named_windows():
            raise ValueError("reserve_for_high: keeps a share of each rate-limit window, but"
                             " none is set (per_second, per_minute, per_hour, per_day or"
                             " per_rolling_day)")
        return self

    def named_windows(self) -> list[tuple[str, float, int]]:
        """(key, window length in seconds, limit) for each limit that is set."""
        return [(key, span, getattr(self, key)) for key, span in WINDOW_SECONDS.items()
                if getattr(self, key) is not None]

    def windows(self) -> list[tuple[float, int]]:
        """(window length in seconds, limit) for each limit that is set."""
        return [(w, n) for _, w, n in self.named_windows()]


_MAILBOX = re.compile(r"^[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9.-]{1,253}$")


class RewriteConfig(_Frozen):
    """Sender rewriting for upstreams that refuse a From other than their user
    (relay.delivery.rewrite); opt-in, and it breaks an application's DKIM signature."""

    envelope_from: str | None = None  # MAIL FROM for every message (bounces keep <>)
    header_from: Literal["keep", "replace"] = "keep"  # replace: From gets envelope_from
    reply_to: Literal["original"] | None = None  # original: the From before, as Reply-To

    @model_validator(mode="after")
    def _consistent(self) -> RewriteConfig:
        if self.envelope_from is not None and not _MAILBOX.match(self.envelope_from):
            raise ValueError(f"envelope_from: {self.envelope_from!r} is not an address like"
                             " noreply@example.com")
        if self.header_from == "replace" and self.envelope_from is None:
            raise ValueError("header_from: replace needs envelope_from, the address to put"
                             " in From")
        if self.reply_to == "original" and self.header_from != "replace":
            raise ValueError("reply_to: original needs header_from: replace (From is"
                             " unchanged otherwise)")
        return self


class TimeoutsConfig(_Frozen):
    connect: PositiveDuration = 10.0
    command: PositiveDuration = 60.0
    # RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot; giving up
    # sooner and retrying is how duplicates are made.
    data: PositiveDuration = 600.0


def _secret_from(key: str, env: str | None, path: Path | None) -> str | None:
    """A secret from ``{key}_env`` or ``{key}_file`` (stripped), None if neither is set."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ValueError(f"{key}_env: environment variable {env} is not set")
        return value
    if path:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{key}_file: cannot read {path}: {exc.strerror}") from None
    return None


# Microsoft identity platform v2.0 token endpoint, by directory (tenant) id or name.
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
# Client credentials for SMTP AUTH in Exchange Online: the app's permissions on Exchange.
MICROSOFT_SMTP_SCOPE = "https://outlook.office365.com/.default"


def _token_url(value: str | None) -> str | None:
    """https only, so that client secrets and tokens are never sent in clear; http:// is
    allowed to a loopback address (a local token helper, tests)."""
    if value is None:
        return value
    url = urlsplit(value)
    if url.scheme == "https" and url.hostname:
        return value
    if url.scheme == "http" and url.hostname and is_loopback(url.hostname):
        return value
    raise ValueError(f"{value!r} is not an https:// URL (http:// only to a loopback address)")


class OAuthConfig(_Frozen):
    """An account's OAuth2 login (SASL XOAUTH2): where relay gets its access tokens.

    Either ``token_command`` (a program printing a token, like msmtp's passwordeval), or a
    token endpoint: Google's refresh-token flow (``grant: refresh_token``) or Microsoft's
    client-credentials flow (``grant: client_credentials``).
    """

    mechanism: Literal["xoauth2"]
    # A string: split like a shell would (shlex) and run without a shell, unless it uses
    # shell syntax (a pipe, $VAR, ~...): then `/bin/sh -c`. A list: run as it is.
    token_command: str | list[str] | None = None
    token_command_timeout: PositiveDuration = 10.0
    # How long a command's token is reused before the command runs again (it says no
    # expiry; a refused token runs it again at once anyway).
    token_command_ttl: Duration = 300.0
    grant: Literal["refresh_token", "client_credentials"] = "refresh_token"
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    refresh_token_env: str | None = None
    refresh_token_file: Path | None = None
    token_url: Annotated[str | None, AfterValidator(_token_url)] = None
    tenant: str | None = None  # Microsoft: the directory; token_url is derived from it
    scope: str | None = None  # client_credentials: Exchange Online's .default
    # Fetch a new token this long before the old one expires (expires_in), at most half
    # its lifetime, so a send never logs in with a token that runs out meanwhile.
    refresh_margin: Duration = 300.0
    timeout: PositiveDuration = 30.0  # the token endpoint's whole request

    _client_secret: str | None = PrivateAttr(default=None)
    _refresh_token: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> OAuthConfig:
        endpoint = [k for k in ("client_id", "client_secret_env", "client_secret_file",
                                "refresh_token_env", "refresh_token_file", "token_url",
                                "tenant", "scope") if getattr(self, k)]
        if self.token_command is not None:
            if endpoint:
                raise ValueError(f"{endpoint[0]}: give either token_command or a token"
                                 " endpoint (client_id, token_url...), not both")
            if not self.token_command or not all(self.token_command):
                raise ValueError("token_command: must not be empty")
            if isinstance(self.token_command, str):  # as relay.delivery.oauth runs it
                try:
                    shlex.split(self.token_command)
                except ValueError as exc:
                    raise ValueError(f"token_command: cannot be parsed as a command line"
                                     f" ({exc}: an unclosed quote?)") from None
            return self
        if not self.client_id:
            raise ValueError("client_id: required (or give token_command)")
        if self.token_url and self.tenant:
            raise ValueError("tenant: give either tenant or token_url, not both")
        if not (self.token_url or self.tenant):
            raise ValueError("token_url: required (or tenant, for Microsoft)")
        for key in ("client_secret", "refresh_token"):
            if getattr(self, f"{key}_env") and getattr(self, f"{key}_file"):
                raise ValueError(f"{key}_file: give only one of {key}_env, {key}_file")
        self._check_grant()
        if (info.context or {}).get("secrets", True):
            self.load_secrets()
        return self

    def load_secrets(self) -> None:
        """Read the client secret and refresh token (ValueError naming the key)."""
        self._client_secret = _secret_from("client_secret", self.client_secret_env,
                                           self.client_secret_file)
        self._refresh_token = _secret_from("refresh_token", self.refresh_token_env,
                                           self.refresh_token_file)

    def _check_grant(self) -> None:
        """The keys each grant needs, and none it would ignore."""
        has_secret = bool(self.client_secret_env or self.client_secret_file)
        has_refresh = bool(self.refresh_token_env or self.refresh_token_file)
        if self.grant == "refresh_token":
            if not has_refresh:
                raise ValueError("refresh_token_env: grant refresh_token needs"
                                 " refresh_token_env or refresh_token_file")
            if self.scope:
                raise ValueError("scope: only for grant client_credentials (a refresh"
                                 " token keeps the scopes it was granted)")
        else:
            if not has_secret:
                raise ValueError("client_secret_env: grant client_credentials needs"
                                 " client_secret_env or client_secret_file")
            if has_refresh:
                raise ValueError("refresh_token_env: not used by grant client_credentials")

    @property
    def endpoint(self) -> str | None:
        """The token endpoint's URL (None with token_command)."""
        if self.tenant:
            return MICROSOFT_TOKEN_URL.format(tenant=self.tenant)
        return self.token_url

    @property
    def effective_scope(self) -> str | None:
        if self.grant == "client_credentials":
            return self.scope or MICROSOFT_SMTP_SCOPE
        return None

    @property
    def client_secret(self) -> str | None:
        """Never logged or printed."""
        return self._client_secret

    @property
    def refresh_token(self) -> str | None:
        """Never logged or printed."""
        return self._refresh_token


class AccountConfig(_Frozen):
    transport: Literal["smtp", "maildir"] = "smtp"
    # Fills host, port, tls and the provider's published limits (relay.config.presets).
    preset: Literal["gmail", "google-workspace", "ses-sandbox", "sendgrid-free",
                    "mailgun-free", "m365"] | None = None
    # smtp
    host: str | None = None
    port: Port | None = None
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    tls_verify: Switch = True
    # A private CA's certificate(s), PEM, trusted for this account beside the system's.
    tls_ca_file: Path | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    password: str | None = Field(default=None, repr=False)
    # auto: the strongest mechanism both sides offer (cram-md5, plain, login); one per login.
    auth_mechanism: Literal["auto", "cram-md5", "plain", "login"] = "auto"
    # OAuth2 instead of a password: SASL XOAUTH2 with tokens from a command or endpoint.
    auth: OAuthConfig | None = None
    auth_backoff: AuthBackoffConfig | None = None  # None: the top-level auth_backoff
    pool: PoolConfig = PoolConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    retry: RetryOverride | None = None  # None: the top-level retry block
    timeouts: TimeoutsConfig = TimeoutsConfig()
    # The EHLO name for this account; None: the top-level hostname.
    ehlo_name: Hostname | None = None
    # None: listen.ack. after_upstream: this account's messages are tried before the 250.
    ack: Ack | None = None
    rewrite: RewriteConfig | None = None  # None: the sender and From go as they came
    # maildir
    path: Path | None = None

    _secret: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        return apply_preset(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> AccountConfig:
        if self.transport == "maildir":
            if self.preset is not None:
                raise ValueError("preset: a provider preset is for smtp accounts")
            if self.path is None:
                raise ValueError("path: required for a maildir account")
            return self
        if not self.host:
            hint = " (ses-sandbox: email-smtp.REGION.amazonaws.com)" if self.preset else ""
            raise ValueError(f"host: required for an smtp account{hint}")
        if self.tls_ca_file is not None:
            if self.tls == "none" or not self.tls_verify:
                raise ValueError("tls_ca_file: certificates are not checked with"
                                 f" {'tls: none' if self.tls == 'none' else 'tls_verify: false'}")
            if not self.tls_ca_file.is_file():
                raise ValueError(f"tls_ca_file: no such file {self.tls_ca_file}")
        sources = [k for k in ("password_env", "password_file", "password") if getattr(self, k)]
        if self.auth is not None:
            self._check_oauth(sources)
            return self
        if len(sources) > 1:
            raise ValueError(f"{sources[1]}: give only one of {', '.join(sources)}")
        if self.username and not sources:
            raise ValueError("username: needs password_env, password_file or password")
        if (info.context or {}).get("secrets", True):
            self._secret = self._read_secret()
        return self

    def load_secrets(self) -> None:
        """Read this account's secrets into a config loaded without them: `relay accounts
        test` needs the tested account's, not every webhook's or listener user's.
        ValueError names the key under the account (``auth.`` for XOAUTH2's)."""
        if self.transport != "smtp":
            return
        if self.auth is None:
            self._secret = self._read_secret()
            return
        try:
            self.auth.load_secrets()
        except ValueError as exc:
            raise ValueError(f"auth.{exc}") from None

    def _check_oauth(self, sources: list[str]) -> None:
        """With auth (XOAUTH2): a username for the SASL string, and no password."""
        if sources:
            raise ValueError(f"{sources[0]}: not used with auth (XOAUTH2 logs in with a"
                             " token, not a password)")
        if not self.username:
            raise ValueError("username: auth xoauth2 needs the mailbox's address as username")
        if self.auth_mechanism != "auto":
            raise ValueError("auth_mechanism: not used with auth (the mechanism is"
                             " auth.mechanism)")

    def _read_secret(self) -> str | None:
        secret = _secret_from("password", self.password_env, self.password_file)
        return self.password if secret is None else secret

    @property
    def secret(self) -> str | None:
        """The resolved password; never logged or printed."""
        return self._secret

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.tls]


class BouncesConfig(_Frozen):
    # RFC 3464 delivery status notifications to the envelope sender on permanent failure.
    enabled: Switch = False


def _globs(value: object) -> object:
    """One pattern or a list of them: always a list."""
    return [value] if isinstance(value, str) else value


Globs = Annotated[list[str], BeforeValidator(_globs), Field(min_length=1)]


class HeaderMatchConfig(_Frozen):
    """A header by name (case-insensitive) whose value matches a glob."""

    name: str = Field(min_length=1)
    value: str = "*"  # "*": the header is present, whatever its value


class RoutingRuleConfig(_Frozen):
    """One routing rule (docs/routing.md): every condition it sets must hold; each
    condition takes one glob or a list (any of them), matched without regard to case."""

    name: str | None = None  # shown by `relay route` and in the log; default "rule N"
    # Envelope sender: an address glob (billing@example.com, *@example.com) or "@domain"
    # (a glob on its domain: @example.com, @*.example.com).
    sender: Globs | None = None
    from_domain: Globs | None = None  # the domain of the From header's address
    recipient_domain: Globs | None = None  # per recipient: a message may be split
    user: Globs | None = None  # the listener user the client logged in as
    header: HeaderMatchConfig | None = None
    account: str

    @field_validator("sender")
    @classmethod
    def _no_empty_sender(cls, value: list[str] | None) -> list[str] | None:
        """An empty glob would read as "the null sender", which no condition matches."""
        if value is not None and any(not p.strip() for p in value):
            raise ValueError("an empty pattern matches nothing: the null sender <> matches"
                             " no sender condition (leave sender out to match any)")
        return value

    @model_validator(mode="after")
    def _some_condition(self) -> RoutingRuleConfig:
        if not any(getattr(self, k) is not None for k in RULE_CONDITIONS):
            raise ValueError(
                f"account: a rule needs at least one of {', '.join(RULE_CONDITIONS)}"
                " (mail that matches nothing goes to routing.default_account)")
        return self


RULE_CONDITIONS = ("sender", "from_domain", "recipient_domain", "user", "header")


class GroupConfig(_Frozen):
    """Accounts that share a group's mail (docs/routing.md#groups): the account is
    decided at each attempt; an account-level failure moves the message to the next."""

    accounts: list[str] = Field(min_length=1)
    # failover: the first healthy account under its limits, in list order; weighted:
    # spread by weight among those.
    mode: Literal["failover", "weighted"] = "failover"
    weights: dict[str, Annotated[WholeNumber, Field(ge=1, le=1_000_000)]] | None = None
    # None: listen.ack. The members' own `ack` is for mail routed to them by name: a
    # group's message is answered before its member is chosen (at the attempt).
    ack: Ack | None = None

    @model_validator(mode="after")
    def _weights(self) -> GroupConfig:
        if len(set(self.accounts)) != len(self.accounts):
            raise ValueError("accounts: an account is listed twice")
        if self.mode == "failover":
            if self.weights is not None:
                raise ValueError("weights: only for mode: weighted")
            return self
        if self.weights is None or set(self.weights) != set(self.accounts):
            raise ValueError("weights: give each of " + ", ".join(self.accounts)
                             + " a weight (a whole number, at least 1), and no other")
        return self


class RoutingConfig(_Frozen):
    default_account: str = "outbox"
    # Tried in order after X-Account; the first whose conditions all hold names the
    # account. Recipients that match different rules are queued once per account.
    rules: list[RoutingRuleConfig] = Field(default_factory=list)
    # X-Account, rules and default_account may name a group instead of an account.
    groups: dict[str, GroupConfig] = Field(default_factory=dict)

    def table(self) -> RoutingTable:
        """The rules as the router's plain values (relay.delivery.rules)."""

        def globs(value: list[str] | None) -> tuple[str, ...] | None:
            return None if value is None else tuple(value)

        return RoutingTable(self.default_account, tuple(
            Rule(name=r.name or f"rule {i + 1}", account=r.account, sender=globs(r.sender),
                 from_domain=globs(r.from_domain),
                 recipient_domain=globs(r.recipient_domain), user=globs(r.user),
                 header=None if r.header is None else (r.header.name, r.header.value))
            for i, r in enumerate(self.rules)))


class DedupConfig(_Frozen):
    """Idempotent submission: a message whose Message-ID and envelope sender were accepted
    within ``window`` is answered with the first one's queue id and not queued again."""

    window: PositiveDuration = 86400.0


EventType = Literal["delivered", "deferred", "failed", "bounced"]
EVENT_TYPES: tuple[EventType, ...] = ("delivered", "deferred", "failed", "bounced")


def _http_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, not {parts.scheme or 'no'}"
                         " scheme")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 - urllib checks the port only when it is read
    except ValueError as exc:
        raise ValueError(f"has a bad port: {exc}") from None
    return url


def url_host(url: str) -> str:
    """host[:port] of a URL, without any user or password in it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


class WebhookConfig(_Frozen):
    """One receiver of delivery events: a signed JSON POST per event (docs/events.md)."""

    url: Annotated[str, AfterValidator(_http_url)]
    # Its label in metrics and logs (never the URL, which may carry credentials).
    # None: the URL's host[:port].
    name: Annotated[str, Field(pattern=ACCOUNT_NAME.pattern)] | None = None
    events: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES), min_length=1)
    secret_env: str | None = None
    secret_file: Path | None = None
    timeout: PositiveDuration = 10.0
    # After this long without a 2xx, an event is given up (logged and counted).
    max_age: PositiveDuration = 86400.0
    # Retries: exponential from retry_initial, at most retry_max apart.
    retry_initial: PositiveDuration = 5.0
    retry_max: PositiveDuration = 600.0

    _secret: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> WebhookConfig:
        sources = [k for k in ("secret_env", "secret_file") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError("secret_env: give exactly one of secret_env, secret_file (the"
                             " key events are signed with)")
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max: must be at least retry_initial")
        if not (info.context or {}).get("secrets", True):
            return self
        self._secret = _secret_from("secret", self.secret_env, self.secret_file) or ""
        if not self._secret:  # (an empty one signs nothing anyone could check)
            raise ValueError(
                f"secret_env: environment variable {self.secret_env} is not set"
                if self.secret_env else f"secret_file: {self.secret_file} is empty")
        return self

    @property
    def secret(self) -> str:
        """The signing key; never logged or printed."""
        return self._secret

    @property
    def label(self) -> str:
        return self.name or url_host(self.url)


class EventsConfig(_Frozen):
    webhooks: list[WebhookConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> EventsConfig:
        seen: set[str] = set()
        for i, hook in enumerate(self.webhooks):
            if hook.label in seen:
                raise ValueError(f"webhooks.{i}.name: {hook.label!r} is already the name of"
                                 " another webhook; give each a name of its own")
            seen.add(hook.label)
        return self


class SendmailConfig(_Frozen):
    """`relay sendmail` (docs/sendmail.md): addresses given without a domain, and its
    login to a listener that requires AUTH."""

    # The domain of a sender or recipient written without one (`root`, cron's default
    # MAILTO; the login name as the default sender), like Postfix's myorigin. None: the
    # top-level hostname, else the machine's name.
    domain: Hostname | None = None
    # Mail for a local user name goes to this address instead (nullmailer's adminaddr):
    # cron's and logwatch's reports to `root` reach a person. None: user@domain.
    admin_address: str | None = None
    # A listener that requires AUTH (listen.auth.required): the user sendmail logs in as,
    # and a file holding its password, readable by the users who run sendmail (a group).
    username: str | None = None
    password_file: Path | None = None
    # The user relay's listener runs as (a name or a uid), besides root, the caller and
    # the queue file's owner: sendmail hands nothing to a listener run by anyone else.
    # The default is the name of config/relay.service's user (DynamicUser's included).
    listener_user: str = "relay"

    @model_validator(mode="after")
    def _check(self) -> SendmailConfig:
        local, at, domain = (self.admin_address or "x@y").rpartition("@")
        if not (local and at and domain) or any(c.isspace() or c in "<>,;" for c in
                                                 self.admin_address or ""):
            raise ValueError("admin_address: must be one address, local-part@domain")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("password_file: give username and password_file together")
        return self


def _default_accounts() -> dict[str, AccountConfig]:
    return {"outbox": AccountConfig(transport="maildir", path=Path("relay-data/outbox"))}


class Config(_Frozen):
    # Like Postfix's myhostname: the EHLO name to upstreams and the listener's banner.
    # None: socket.getfqdn(), or an address literal where that has no dot.
    hostname: Hostname | None = None
    listen: ListenConfig = ListenConfig()
    queue: QueueConfig = QueueConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    retry: RetryConfig = RetryConfig()
    auth_backoff: AuthBackoffConfig = AuthBackoffConfig()
    accounts: dict[str, AccountConfig] = Field(default_factory=_default_accounts)
    routing: RoutingConfig = RoutingConfig()
    bounces: BouncesConfig = BouncesConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    dedup: DedupConfig | None = None  # None: off (every message is queued)
    events: EventsConfig = EventsConfig()
    sendmail: SendmailConfig = SendmailConfig()
    # Processes that each listen (SO_REUSEPORT) and deliver from the one queue; `relay
    # serve --workers` overrides it. 1: a single process, no supervisor.
    workers: Workers = "auto"

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.accounts:
            raise ValueError("accounts: at least one account is required")
        for name in self.accounts:
            if not ACCOUNT_NAME.match(name):
                raise ValueError(
                    f"accounts.{name}: account names use letters, digits, '_', '.', '-'"
                )
        for user, spec in self.listen.auth.users.items():
            for name in spec.accounts or []:
                if name not in self.destinations:
                    raise ValueError(
                        f"listen.auth.users.{user}.accounts: no account named {name!r}"
                    )
        for name in self.accounts:
            self._check_retry(name)
        if self.sendmail.username and self.sendmail.username not in self.listen.auth.users:
            raise ValueError(f"sendmail.username: no user named {self.sendmail.username!r}"
                             " in listen.auth.users")
        if (self.metrics.enabled and self.metrics.port and self.metrics.port == self.listen.port
                and _same_host(self.metrics.host, self.listen.host)):
            raise ValueError(f"metrics.port: {self.metrics.port} is also listen.port; give the"
                             " metrics endpoint a port of its own")
        self._check_routing()
        return self

    def _check_routing(self) -> None:
        self._check_groups()
        targets = self.destinations
        for i, rule in enumerate(self.routing.rules):
            if rule.account not in targets:
                raise ValueError(
                    f"routing.rules.{i}.account: no account or group named {rule.account!r}"
                    f" (accounts: {', '.join(sorted(self.accounts))})")
        if self.routing.default_account not in targets:
            raise ValueError(
                f"routing.default_account: no account named {self.routing.default_account!r}"
                f" (accounts: {', '.join(sorted(self.accounts))})"
            )

    @property
    def destinations(self) -> set[str]:
        """What X-Account, a rule or default_account may name: an account or a group."""
        return set(self.accounts) | set(self.routing.groups)

    def _check_groups(self) -> None:
        for name, group in self.routing.groups.items():
            key = f"routing.groups.{name}"
            if not ACCOUNT_NAME.match(name):
                raise ValueError(f"{key}: group names use letters, digits, '_', '.', '-'")
            if name in self.accounts:
                raise ValueError(f"{key}: an account has that name too; X-Account and rules"
                                 " could not tell them apart")
            for member in group.accounts:
                if member in self.routing.groups:
                    raise ValueError(f"{key}.accounts: {member!r} is a group; a group lists"
                                     " accounts only (no nesting, so no cycles)")
                if member not in self.accounts:
                    raise ValueError(f"{key}.accounts: no account named {member!r}")

    def _check_retry(self, account: str) -> None:
        """Refuse an account whose merged policy is out of order, naming where each part is set."""
        own = self.accounts[account].retry
        if own is None:
            return
        merged = self.retry_for(account)
        if merged.max_delay >= merged.initial_delay:
            return
        mine = own.keys()
        if "max_delay" in mine:
            key, rule = "max_delay", "must be at least initial_delay"
        else:
            key, rule = "initial_delay", "must be at most max_delay"

        def source(k: str) -> str:
            return f"accounts.{account}.retry" if k in mine else "top-level retry"

        raise ValueError(
            f"accounts.{account}.retry.{key}: {rule} in the merged policy, which has"
            f" initial_delay {format_duration(merged.initial_delay)} ({source('initial_delay')})"
            f" and max_delay {format_duration(merged.max_delay)} ({source('max_delay')})"
        )

    @property
    def queue_min_free(self) -> int:
        """Free bytes kept in reserve on the queue's file system (see QueueConfig.min_free)."""
        if self.queue.min_free is not None:
            return self.queue.min_free
        return max(MIN_FREE_FLOOR, 2 * self.listen.max_message_size)

    def ack_for(self, account: str) -> str:
        """When the listener answers a message for ``account`` (or group): its own ack,
        or listen's. A group's mail takes the group's, never a member's."""
        own = self.accounts.get(account) or self.routing.groups.get(account)
        return (own.ack if own is not None and own.ack else None) or self.listen.ack

    def sync_hold(self, account: str) -> float:
        """How long a new message for ``account`` is queued held for its session's
        immediate attempt (ack: after_upstream: listen.sync_timeout), else 0."""
        return self.listen.sync_timeout if self.ack_for(account) == "after_upstream" else 0.0

    def auth_backoff_for(self, account: str) -> AuthBackoffConfig:
        """The account's own auth_backoff, or the top-level one."""
        return self.accounts[account].auth_backoff or self.auth_backoff

    def retry_for(self, account: str) -> RetryConfig:
        """The policy an account runs with: the top-level block, the account's keys over it."""
        own = self.accounts[account].retry
        if own is None:
            return self.retry
        return self.retry.model_copy(update=own.keys())


def effective_hostname(config: Config, fqdn: str) -> str | None:
    """``hostname`` or the FQDN (pass socket.getfqdn()); None: an address literal."""
    return config.hostname or default_hostname(fqdn)
