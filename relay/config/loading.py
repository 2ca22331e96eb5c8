"""Loading the configuration: YAML file, environment, secrets, and pydantic's errors as
one line per problem that starts with the key path
(``accounts.gmail.tls: must be one of starttls, implicit, none``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from relay.config.schema import Config
from relay.errors import ConfigError


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
    except RecursionError:
        raise ConfigError(["(top level): nested too deeply"]) from None


def load_config(path: str | os.PathLike[str] | None, *, secrets: bool = True) -> Config:
    """Read and validate a YAML file; None means the built-in defaults (an empty file is
    refused)."""
    if path is None:
        return Config()
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    data = parse_yaml(raw, str(path))
    if data is None:
        # A file named but empty (or only comments) is a mistake, most often a truncated
        # write: applied, it would be the defaults, every account removed.
        raise ConfigError([f"{path}: config file is empty (write {{}} for the defaults)"])
    return parse_config(data, secrets=secrets)


def parse_yaml(raw: bytes, name: str) -> object:
    """The YAML document in ``raw``; ConfigError naming ``name`` and where, never quoting
    the file (it may hold passwords)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"{name}:{line}:{column}: not UTF-8: byte 0x{raw[exc.start]:02x}"
                           f" at offset {exc.start} (save the file as UTF-8)"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{name}: invalid YAML: nested too deeply"]) from None
