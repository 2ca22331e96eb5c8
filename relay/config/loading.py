"""Loading the configuration: YAML file, environment, secrets, and pydantic's errors as
one line per problem that starts with the key path
(``accounts.gmail.tls: must be one of starttls, implicit, none``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from relay.config.environ import Sources, apply_overrides, file_sources, substitute
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


def load_config(path: str | os.PathLike[str] | None, *, secrets: bool = True,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file (None: the built-in defaults), with the environment's
    ``${VAR}`` substitutions and ``RELAY_`` overrides applied (relay.config.environ)."""
    return load_config_with_sources(path, secrets=secrets, environ=environ)[0]


def load_config_with_sources(
    path: str | os.PathLike[str] | None, *, secrets: bool = True,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, Sources]:
    """The config and, per key set by the file or the environment, where it came from
    (keys not listed are defaults)."""
    env = os.environ if environ is None else environ
    data = {} if path is None else _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of keys to values"])
    sources = file_sources(data, str(path)) if path is not None else {}
    data, substituted = substitute(data, env)
    for key, names in substituted.items():
        sources[key] = f"{path} via {names}"
    data, overridden = apply_overrides(data, env, set(Config.model_fields))
    sources = {k: v for k, v in sources.items()
               if not any(k == o or k.startswith(o + ".") for o in overridden)}
    sources.update(overridden)
    try:
        return parse_config(data, secrets=secrets), sources
    except ConfigError as exc:
        raise ConfigError([_name_variable(p, overridden) for p in exc.problems]) from None


def _name_variable(problem: str, overridden: Sources) -> str:
    """'listen.port: must be ...' gains '(set by RELAY_LISTEN__PORT)' when that is where
    the bad value came from."""
    key = problem.partition(": ")[0]
    for path, var in overridden.items():
        if key == path or key.startswith(path + "."):
            return f"{problem} (set by {var})"
    return problem


def _read_yaml(path: str | os.PathLike[str]) -> Any:
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
    return {} if data is None else data
