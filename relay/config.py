"""The configuration file: parsed once, validated whole, frozen.

Validation is pydantic's; this module turns its errors into one line per problem that
starts with the key path (``accounts.gmail.tls: must be one of starttls, implicit, none``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from relay.durations import format_duration, parse_duration
from relay.errors import ConfigError

Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[int, Field(ge=0, le=65535)]
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MASK = "********"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        if self.password_hash and not self.password_hash.startswith("$argon2"):
            raise ValueError("password_hash: must be an argon2 hash (see `relay hash-password`)")
        if not (info.context or {}).get("secrets", True):
            return self
        if self.password_env and self.password_env not in os.environ:
            raise ValueError(f"password_env: environment variable {self.password_env} is not set")
        if self.password_file and not self.password_file.is_file():
            raise ValueError(f"password_file: cannot read {self.password_file}")
        return self


class ListenAuthConfig(_Frozen):
    required: bool = False
    users: dict[str, ListenUserConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _users_if_required(self) -> ListenAuthConfig:
        if self.required and not self.users:
            raise ValueError("users: auth.required needs at least one user")
        return self


class ListenTLSConfig(_Frozen):
    cert: Path
    key: Path
    # True: refuse MAIL before STARTTLS (RFC 3207). AUTH always waits for TLS when TLS is on.
    required: bool = False

    @model_validator(mode="after")
    def _files(self) -> ListenTLSConfig:
        for key in ("cert", "key"):
            if not getattr(self, key).is_file():
                raise ValueError(f"{key}: no such file {getattr(self, key)}")
        return self


LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


class ListenConfig(_Frozen):
    host: str = "127.0.0.1"
    port: Port = 2525
    max_message_size: int = Field(default=26_214_400, ge=1024)  # 25 MiB, Gmail's limit
    max_recipients: int = Field(default=100, ge=1)  # RFC 5321 4.5.3.1.8: at least 100
    max_connections: int = Field(default=200, ge=1)
    timeout: Duration = 300.0  # RFC 5321 4.5.3.2.7: server timeout of 5 minutes
    # After this many rejected commands in one session: 421 and close.
    max_bad_commands: int = Field(default=10, ge=1)
    # reject (default, like Postfix smtpd_forbid_bare_newline): 550 5.5.2 for a bare LF or
    # CR in DATA; normalize: accept and turn them into CRLF.
    bare_newlines: Literal["reject", "normalize"] = "reject"
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
        if not _is_loopback(self.host):
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


class MetricsConfig(_Frozen):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9025


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # None: stderr (systemd's journal, docker logs). A file is reopened when logrotate
    # moves it (logging.handlers.WatchedFileHandler).
    file: Path | None = None


class RetryConfig(_Frozen):
    initial_delay: Duration = 30.0
    max_delay: Duration = 1800.0
    max_age: Duration = 172_800.0
    jitter: float = Field(default=0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay: must be at least initial_delay")
        return self


class AuthBackoffConfig(_Frozen):
    """How long an account waits after the upstream refused its login (535).

    Its own floor, apart from retry delays: providers lock an account after a few failed
    logins, so a wrong password is tried once a minute at most, then less often.
    """

    initial: Duration = 60.0
    max: Duration = 1800.0

    @model_validator(mode="after")
    def _ordered(self) -> AuthBackoffConfig:
        if self.max < self.initial:
            raise ValueError("max: must be at least initial")
        return self


class PoolConfig(_Frozen):
    max_connections: int = Field(default=5, ge=1, le=100)
    max_messages_per_connection: int = Field(default=100, ge=1)
    idle_timeout: Duration = 300.0


class RateLimitConfig(_Frozen):
    per_second: int | None = Field(default=None, ge=1)
    per_minute: int | None = Field(default=None, ge=1)
    per_hour: int | None = Field(default=None, ge=1)
    per_day: int | None = Field(default=None, ge=1)
    on_limit: Literal["defer", "reject"] = "defer"

    def windows(self) -> list[tuple[float, int]]:
        """(window length in seconds, limit) for each limit that is set."""
        pairs = [
            (1.0, self.per_second),
            (60.0, self.per_minute),
            (3600.0, self.per_hour),
            (86400.0, self.per_day),
        ]
        return [(w, n) for w, n in pairs if n is not None]


class TimeoutsConfig(_Frozen):
    connect: Duration = 10.0
    command: Duration = 60.0
    # RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot; giving up
    # sooner and retrying is how duplicates are made.
    data: Duration = 600.0


class AccountConfig(_Frozen):
    transport: Literal["smtp", "maildir"] = "smtp"
    # smtp
    host: str | None = None
    port: Port | None = None
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    tls_verify: bool = True
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    password: str | None = Field(default=None, repr=False)
    # auto: the strongest mechanism both sides offer (cram-md5, plain, login); one per login.
    auth_mechanism: Literal["auto", "cram-md5", "plain", "login"] = "auto"
    auth_backoff: AuthBackoffConfig | None = None  # None: the top-level auth_backoff
    pool: PoolConfig = PoolConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    retry: RetryConfig | None = None  # None: the top-level retry block
    timeouts: TimeoutsConfig = TimeoutsConfig()
    # maildir
    path: Path | None = None

    _secret: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> AccountConfig:
        if self.transport == "maildir":
            if self.path is None:
                raise ValueError("path: required for a maildir account")
            return self
        if not self.host:
            raise ValueError("host: required for an smtp account")
        sources = [k for k in ("password_env", "password_file", "password") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError(f"{sources[1]}: give only one of {', '.join(sources)}")
        if self.username and not sources:
            raise ValueError("username: needs password_env, password_file or password")
        if (info.context or {}).get("secrets", True):
            self._secret = self._read_secret()
        return self

    def _read_secret(self) -> str | None:
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(
                    f"password_env: environment variable {self.password_env} is not set"
                )
            return value
        if self.password_file:
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
        return self.password

    @property
    def secret(self) -> str | None:
        """The resolved password; never logged or printed."""
        return self._secret

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.tls]


class BouncesConfig(_Frozen):
    # RFC 3464 delivery status notifications to the envelope sender on permanent failure.
    enabled: bool = False


class RoutingConfig(_Frozen):
    default_account: str = "outbox"


def _default_accounts() -> dict[str, AccountConfig]:
    return {"outbox": AccountConfig(transport="maildir", path=Path("relay-data/outbox"))}


class Config(_Frozen):
    listen: ListenConfig = ListenConfig()
    queue: QueueConfig = QueueConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    retry: RetryConfig = RetryConfig()
    auth_backoff: AuthBackoffConfig = AuthBackoffConfig()
    accounts: dict[str, AccountConfig] = Field(default_factory=_default_accounts)
    routing: RoutingConfig = RoutingConfig()
    bounces: BouncesConfig = BouncesConfig()

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
                if name not in self.accounts:
                    raise ValueError(
                        f"listen.auth.users.{user}.accounts: no account named {name!r}"
                    )
        if self.routing.default_account not in self.accounts:
            raise ValueError(
                f"routing.default_account: no account named {self.routing.default_account!r}"
                f" (accounts: {', '.join(sorted(self.accounts))})"
            )
        return self

    def auth_backoff_for(self, account: str) -> AuthBackoffConfig:
        """The account's own auth_backoff, or the top-level one."""
        return self.accounts[account].auth_backoff or self.auth_backoff

    def retry_for(self, account: str) -> RetryConfig:
        """The top-level retry block with the account's own keys laid over it."""
        own = self.accounts[account].retry
        if own is None:
            return self.retry
        return RetryConfig.model_validate(
            {**self.retry.model_dump(), **own.model_dump(include=own.model_fields_set)}
        )


def _describe(error: Any) -> str:
    kind, msg, ctx = error["type"], error["msg"], error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys to values"
    if kind in ("string_type",):
        return "must be a string"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    return str(msg).removeprefix("Value error, ")


def problem_line(error: Any) -> str:
    """One pydantic error as 'key.path: reason'."""
    path = ".".join(str(part) for part in error["loc"])
    text = _describe(error)
    # A model validator reports 'key: reason' about a key below its own path.
    head, sep, rest = text.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head):
        path = f"{path}.{head}" if path else head
        text = rest
    return f"{path}: {text}" if path else text


def parse_config(data: object, *, secrets: bool = True) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem.

    secrets=False skips reading passwords (commands that never connect upstream).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of keys to values"])
    try:
        return Config.model_validate(data, context={"secrets": secrets})
    except ValidationError as exc:
        raise ConfigError([problem_line(e) for e in exc.errors()]) from None


def load_config(path: str | os.PathLike[str] | None, *, secrets: bool = True) -> Config:
    """Read and validate a YAML file; None means the built-in defaults."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    return parse_config(data, secrets=secrets)


def config_warnings(config: Config) -> list[str]:
    """Things that work but that an operator should know about."""
    warnings = []
    for name, acc in config.accounts.items():
        if acc.transport != "smtp":
            continue
        if acc.password:
            warnings.append(
                f"accounts.{name}.password: a literal password in the config file;"
                " prefer password_env or password_file"
            )
        if acc.tls == "none" and acc.username and not _is_loopback(acc.host or ""):
            warnings.append(
                f"accounts.{name}.tls: none sends the password unencrypted to {acc.host}"
            )
        if not acc.tls_verify:
            warnings.append(f"accounts.{name}.tls_verify: false; certificates are not checked")
        if acc.password_file:
            warnings += _readable_by_others(f"accounts.{name}.password_file", acc.password_file)
        if (acc.password or acc.password_env or acc.password_file) and not acc.username:
            warnings.append(f"accounts.{name}: a password without a username is not used")
    for user, spec in config.listen.auth.users.items():
        if spec.password_file:
            warnings += _readable_by_others(
                f"listen.auth.users.{user}.password_file", spec.password_file
            )
    return warnings


def _readable_by_others(key: str, path: Path) -> list[str]:
    if path.exists() and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return [f"{key}: {path} is readable by other users (chmod 600 it)"]
    return []


def effective_config(config: Config) -> dict[str, Any]:
    """The config as a plain mapping with defaults filled in and secrets masked."""
    data = config.model_dump(mode="json")
    for name, acc in data["accounts"].items():
        if acc.get("password"):
            acc["password"] = MASK
        if config.accounts[name].transport == "smtp":
            acc["port"] = config.accounts[name].effective_port
        else:
            for key in list(acc):
                if key not in ("transport", "path", "retry", "rate_limit", "pool", "timeouts"):
                    del acc[key]
    _durations_as_text(data)
    return data


def _durations_as_text(node: Any) -> None:
    duration_keys = {"initial_delay", "max_delay", "max_age", "idle_timeout", "timeout",
                     "connect", "command", "data", "initial", "max"}
    if isinstance(node, dict):
        for key, value in node.items():
            if key in duration_keys and isinstance(value, int | float):
                node[key] = format_duration(float(value))
            else:
                _durations_as_text(value)
