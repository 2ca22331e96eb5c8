"""Reporting the configuration: the effective config `relay check-config` prints (secrets
masked, durations as text) and the warnings it gives.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from collections.abc import Collection
from pathlib import Path
from typing import Any

from relay.config.durations import format_duration
from relay.config.schema import MASK, Config, effective_hostname, is_loopback, url_host
from relay.config.sizes import format_size
from relay.queue.urls import mask_url


def queue_name(config: Config) -> str:
    """The queue as logs and the CLI name it (a URL's password masked)."""
    return mask_url(config.queue.url) if config.queue.url is not None else str(config.queue.path)


def config_warnings(config: Config, from_environment: Collection[str] = ()) -> list[str]:
    """Things that work but that an operator should know about. ``from_environment``: the
    keys a variable set (``${VAR}`` or ``RELAY_``), which are not literals in the file."""
    warnings = []
    for name, acc in config.accounts.items():
        if acc.transport != "smtp":
            continue
        if acc.password and f"accounts.{name}.password" not in from_environment:
            warnings.append(
                f"accounts.{name}.password: a literal password in the config file;"
                " prefer password_env or password_file"
            )
        if acc.tls == "none" and acc.username and not is_loopback(acc.host or ""):
            what = "access token" if acc.auth is not None else "password"
            warnings.append(
                f"accounts.{name}.tls: none sends the {what} unencrypted to {acc.host}"
            )
        if not acc.tls_verify:
            warnings.append(f"accounts.{name}.tls_verify: false; certificates are not checked")
        if acc.password_file:
            warnings += _readable_by_others(f"accounts.{name}.password_file", acc.password_file)
        for key in ("client_secret_file", "refresh_token_file"):
            path = getattr(acc.auth, key, None)
            if path is not None:
                warnings += _readable_by_others(f"accounts.{name}.auth.{key}", path)
        if (acc.password or acc.password_env or acc.password_file) and not acc.username:
            warnings.append(f"accounts.{name}: a password without a username is not used")
    return warnings + _listener_warnings(config) + _webhook_warnings(config) + _ack_warnings(
        config)


def _ack_warnings(config: Config) -> list[str]:
    """A member's ``ack`` is not its group's: say so where they differ."""
    warnings = []
    for group, spec in config.routing.groups.items():
        for name in spec.accounts:
            own = config.accounts[name].ack if name in config.accounts else None
            if own is not None and own != config.ack_for(group):
                warnings.append(
                    f"accounts.{name}.ack: {own} applies to mail routed to {name} itself;"
                    f" mail for group {group} is answered {config.ack_for(group)}"
                    f" (set routing.groups.{group}.ack)")
    return warnings


def _listener_warnings(config: Config) -> list[str]:
    warnings = []
    for user, spec in config.listen.auth.users.items():
        if spec.password_file:
            warnings += _readable_by_others(
                f"listen.auth.users.{user}.password_file", spec.password_file
            )
    if config.sendmail.password_file:  # for the group of users that may send, not all
        warnings += _readable_by_others("sendmail.password_file",
                                        config.sendmail.password_file)
    return warnings


def _webhook_warnings(config: Config) -> list[str]:
    warnings = []
    for i, hook in enumerate(config.events.webhooks):
        host = urllib.parse.urlsplit(hook.url).hostname or ""
        if hook.url.lower().startswith("http:") and not is_loopback(host):
            warnings.append(f"events.webhooks.{i}.url: plain http to {url_host(hook.url)};"
                            " events (addresses, replies) cross the network unencrypted")
        if hook.secret_file:
            warnings += _readable_by_others(f"events.webhooks.{i}.secret_file",
                                            hook.secret_file)
    return warnings


def unresolved_secrets(config: Config) -> list[str]:
    """Secrets this environment could not resolve: fine for the operator commands (they
    never read them), fatal for `relay serve` and `relay accounts test`, which do. The
    PostgreSQL queue's password (``queue.``) is the exception: every command that opens
    the queue reads it."""
    found: list[tuple[str, str | None, Path | None]] = [
        ("queue", config.queue.password_env, config.queue.password_file)]
    found += [
        (f"accounts.{name}", acc.password_env, acc.password_file)
        for name, acc in config.accounts.items() if acc.transport == "smtp"
    ]
    found += [(f"listen.auth.users.{user}", spec.password_env, spec.password_file)
              for user, spec in config.listen.auth.users.items()]
    problems = []
    for key, env, path in found:
        problems += _unresolved(f"{key}.password", env, path)
    for name, acc in config.accounts.items():
        if acc.transport == "smtp" and acc.auth is not None:
            key = f"accounts.{name}.auth"
            problems += _unresolved(f"{key}.client_secret", acc.auth.client_secret_env,
                                    acc.auth.client_secret_file)
            problems += _unresolved(f"{key}.refresh_token", acc.auth.refresh_token_env,
                                    acc.auth.refresh_token_file)
    for i, hook in enumerate(config.events.webhooks):
        problems += _unresolved(f"events.webhooks.{i}.secret", hook.secret_env,
                                hook.secret_file)
    return problems


def _unresolved(key: str, env: str | None, path: Path | None) -> list[str]:
    """``key``_env or ``key``_file, if this environment cannot resolve it."""
    if env and env not in os.environ:
        return [f"{key}_env: environment variable {env} is not set here"]
    if path and not os.access(path, os.R_OK):
        return [f"{key}_file: cannot read {path} here"]
    return []


def _readable_by_others(key: str, path: Path) -> list[str]:
    """World-readable only: group-readable is how Kubernetes mounts secrets for the pod's
    fsGroup (and how systemd credentials are shared), not a mistake to warn about."""
    if path.exists() and path.stat().st_mode & stat.S_IROTH:
        return [f"{key}: {path} is readable by every user (chmod 600 or 640 it)"]
    return []


LOCAL_LITERAL = "(an address literal of each connection's local address)"


def effective_config(config: Config, fqdn: str = "") -> dict[str, Any]:
    """The config as a plain mapping with defaults filled in and secrets masked.

    ``fqdn`` (socket.getfqdn()) fills in the default hostname and EHLO names.
    """
    data = config.model_dump(mode="json")
    _mask_secrets(data)
    hostname = effective_hostname(config, fqdn) or LOCAL_LITERAL
    data["hostname"] = hostname
    data["queue"]["min_free"] = format_size(config.queue_min_free)  # the reserve in force
    for name, acc in data["accounts"].items():
        # The merged policy the account runs with, not the keys its block happens to set.
        acc["retry"] = config.retry_for(name).model_dump(mode="json")
        if config.accounts[name].transport == "smtp":
            acc["port"] = config.accounts[name].effective_port
            acc["ehlo_name"] = acc.get("ehlo_name") or hostname
        else:
            for key in list(acc):
                if key not in ("transport", "path", "retry", "rate_limit", "pool", "timeouts"):
                    del acc[key]
    _durations_as_text(data)
    return data


# Keys whose values are secrets (or, as a password hash, let one be guessed offline);
# password_env and password_file only say where a secret is, and are shown.
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|token|hash|api_key|private_key)$")

_URL_KEY = re.compile(r"(^|_)url$")


def _mask_secrets(node: Any) -> None:
    """Replace every set secret-like value, at any depth, by MASK; and in every URL
    (webhook url, auth.token_url, queue.url) a password or a secret query value."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and _SECRET_KEY.search(key) and value:
                node[key] = MASK
            elif isinstance(key, str) and _URL_KEY.search(key) and isinstance(value, str):
                node[key] = mask_url(value)
            else:
                _mask_secrets(value)
    elif isinstance(node, list):
        for item in node:
            _mask_secrets(item)


def _durations_as_text(node: Any) -> None:
    duration_keys = {"initial_delay", "max_delay", "max_age", "idle_timeout", "timeout",
                     "drain_delay", "grace", "token_command_timeout", "token_command_ttl",
                     "refresh_margin", "sync_timeout",
                     "connect", "command", "data", "initial", "max",
                     "window", "retry_initial", "retry_max"}
    if isinstance(node, dict):
        for key, value in node.items():
            if key in duration_keys and isinstance(value, int | float):
                node[key] = format_duration(float(value))
            else:
                _durations_as_text(value)
    elif isinstance(node, list):  # events.webhooks
        for item in node:
            _durations_as_text(item)
