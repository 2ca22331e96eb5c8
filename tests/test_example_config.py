"""The shipped configs load, and docs/configuration.md matches the config models key for key.

The model side is walked from ``Config.model_fields``; the document side is read from
headings that are a backticked key path (``## `listen` ``, ``### `accounts.<name>.pool` ``)
and the first, backticked cell of each table row under them.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from relay.config.durations import format_duration, parse_duration
from relay.config.loading import load_config
from relay.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "relay.example.yaml"
DOCKER = ROOT / "config" / "relay.docker.yaml"
REFERENCE = ROOT / "docs" / "configuration.md"
ANY = "*"  # one path segment standing for any account name

_HEADING = re.compile(r"^#{2,6}\s+`([^`]+)`\s*$")
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


# -- the models
def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, whether it is a mapping of names, or a list, of it)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            model, mapping = _model_in(arg)
            if model is not None:
                return model, mapping
        return None, False
    if origin is dict:
        model, _ = _model_in(typing.get_args(annotation)[1])
        return model, model is not None
    if origin is list:  # each item is documented as `key.<n>`
        model, _ = _model_in(typing.get_args(annotation)[0])
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def model_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, FieldInfo]:
    """Every key path the config accepts ('accounts.*.pool.max_connections') and its field."""
    found: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        found[path] = field
        inner, mapping = _model_in(field.annotation)
        if mapping:
            found[f"{path}.{ANY}"] = field
        if inner is not None:
            found.update(model_fields(inner, f"{path}.{ANY}." if mapping else f"{path}."))
    return found


def _is_duration(field: FieldInfo) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in field.metadata)


def rendered_default(field: FieldInfo) -> str | None:
    """The default as the reference writes it (None: a nested block or a default_factory)."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return None
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if _is_duration(field):
        return f"`{format_duration(float(value))}`"
    return f"`{value}`"


# -- the reference
def _normalise(path: str) -> str:
    return ".".join(ANY if part.startswith("<") else part for part in path.split("."))


def documented_keys() -> dict[str, list[str]]:
    """Key path -> the cells of its table row ([] for a key documented by a heading)."""
    keys: dict[str, list[str]] = {}
    section: str | None = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = _HEADING.match(line)
            section = _normalise(heading.group(1)) if heading else None
            if section is not None:
                keys.setdefault(section, [])
            continue
        row = _ROW.match(line)
        if row and section is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            keys[f"{section}.{row.group(1)}"] = cells
    return keys


def test_reference_documents_every_key_and_only_real_keys() -> None:
    documented = set(documented_keys())
    accepted = set(model_fields())
    # Sanity: the parser really found the sections and the account keys.
    assert {"listen.port", "accounts.*.timeouts.data", "routing.default_account"} <= documented
    assert sorted(documented - accepted) == [], "documented, but relay.config has no such key"
    assert sorted(accepted - documented) == [], "relay.config accepts it, the reference omits it"


def test_reference_defaults_match_the_models() -> None:
    documented = documented_keys()
    checked = 0
    for path, field in model_fields().items():
        expected = rendered_default(field)
        cells = documented[path]
        if expected is None or not cells:
            continue
        default_cell = cells[2]  # | Key | Type | Default | Meaning |
        assert default_cell.startswith(expected), f"{path}: default {default_cell!r}"
        checked += 1
    assert checked >= 40


# -- the shipped config files
def _password_envs(path: Path) -> set[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {a["password_env"] for a in data.get("accounts", {}).values() if "password_env" in a}


def _load_with_secrets(path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    for name in _password_envs(path):
        monkeypatch.setenv(name, "not-a-real-password")
    return load_config(path)


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _password_envs(EXAMPLE) == {"GMAIL_APP_PASSWORD"}
    config = _load_with_secrets(EXAMPLE, monkeypatch)
    gmail = config.accounts["gmail"]
    assert gmail.secret == "not-a-real-password"
    assert (gmail.host, gmail.effective_port, gmail.tls) == ("smtp.gmail.com", 587, "starttls")
    assert config.accounts["outbox"].transport == "maildir"
    assert config.routing.default_account in config.accounts
    assert config.listen.host == "127.0.0.1" and config.metrics.host == "127.0.0.1"


def test_example_config_needs_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header of the example says so; keep it true."""
    from relay.errors import ConfigError

    monkeypatch.delenv("GMAIL_APP_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE)
    assert caught.value.problems == [
        "accounts.gmail.password_env: environment variable GMAIL_APP_PASSWORD is not set"
    ]
    assert "GMAIL_APP_PASSWORD=x relay check-config" in EXAMPLE.read_text(encoding="utf-8")


def _present_paths(node: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            paths.add(path)
            if prefix == "" and key == "accounts":
                for account in value.values():
                    paths.add(f"accounts.{ANY}")
                    paths |= _present_paths(account, f"accounts.{ANY}.")
            else:
                paths |= _present_paths(value, f"{path}.")
    return paths


def test_example_config_shows_every_key() -> None:
    """Each key is set in the example, or shown in a comment (the exclusive password sources)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    present = _present_paths(yaml.safe_load(text))
    commented = set(re.findall(r"^\s*#[\s#]*([a-z_]+):", text, re.MULTILINE))

    def shown(path: str) -> bool:
        if path in present or path.rsplit(".", 1)[-1] in commented:
            return True
        # A mapping's entries ('listen.auth.users.*') may be shown in a comment under it.
        return path.endswith(f".{ANY}") and path.removesuffix(f".{ANY}") in present

    missing = [path for path in model_fields() if not shown(path)]
    assert missing == []
    assert {"password_file", "password"} <= commented


def test_docker_config_loads_and_fits_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _load_with_secrets(DOCKER, monkeypatch)
    volume = Path("/var/lib/relay")
    assert config.queue.path == volume / "queue.sqlite3"
    outbox = config.accounts[config.routing.default_account]
    assert outbox.transport == "maildir" and outbox.path == volume / "outbox"
    assert config.listen.host == "0.0.0.0"
    # Listening on every interface, so who may connect must be loopback and Docker's
    # default bridge only: not whole private ranges, where a LAN may keep its addresses.
    networks = [ipaddress.ip_network(n) for n in config.listen.allowed_networks or []]
    assert networks and all(n.is_loopback or n == ipaddress.ip_network("172.17.0.0/16")
                            for n in networks)
    assert config.metrics.host == "127.0.0.1", "/metrics inside the container only"
    assert config.metrics.enabled, "the image's HEALTHCHECK reads /healthz"

    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY config/relay.docker.yaml /etc/relay/relay.yaml" in dockerfile
    assert f"VOLUME {volume}" in dockerfile
    assert f"EXPOSE {config.listen.port} {config.metrics.port}" in dockerfile
    assert f"http://127.0.0.1:{config.metrics.port}/healthz" in dockerfile
    assert 'CMD ["relay", "serve", "--config", "/etc/relay/relay.yaml"]' in dockerfile
    # The build context must contain what the Dockerfile copies.
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for needed in ("pyproject.toml", "README.md", "relay/", "config/relay.docker.yaml"):
        assert f"!{needed}" in ignore


def test_ci_runs_the_readme_test_command() -> None:
    command = "pip install -e '.[test]' && pytest"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\n{command}\n" in readme
    assert ci.rstrip().splitlines()[-1] == command
