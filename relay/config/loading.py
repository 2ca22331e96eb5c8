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
