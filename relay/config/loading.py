"""Loading the configuration: YAML file, environment, secrets, and pydantic's errors as
one line per problem that starts with the key path
(``accounts.gmail.tls: must be one of starttls, implicit, none``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import (
    ValidationError,
)

from relay.config.environ import Sources, apply_overrides, file_sources, substitute
from relay.config.schema import Config
from relay.errors import ConfigError

# pydantic's error types in plain words (its own texts name Python classes).
_PLAIN = {
    "missing": "required", "extra_forbidden": "unknown key",
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "string_type": "must be a string",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a number",
    "path_type": "must be a file path (a string)",
    "list_type": "must be a list", "tuple_type": "must be a list",
}


def _describe(error: Any) -> str:
    kind, msg, ctx = error["type"], error["msg"], error.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt')}"
    # Anything else in pydantic's words, without the Python class names they may carry.
    return re.sub(r"\s*(for )?<class '[^']*'>", "", str(msg)).removeprefix("Value error, ")


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that keeps keys as written: config keys are names, and YAML 1.1
    would make an account called `no` the boolean false, or `1` a number."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # merge keys (<<) first; keys written here override
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key: Any = key_node.value
            else:
                key = self.construct_object(key_node, deep=deep)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _ConfigLoader.construct_mapping)


def _duplicate_key(node: yaml.Node, path: str = "") -> str | None:
    """The first key written twice in one mapping, as 'key.path (lines A and B)'.
    YAML would silently keep the last one."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{path}.{i}" if path else str(i))
            if found:
                return found
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            where = f"{path}.{key}" if path else key
            if key in lines:
                return f"{where}: written twice (lines {lines[key]} and {line}); remove one"
            lines[key] = line
            found = _duplicate_key(value_node, where)
            if found:
                return found
    return None


def _load_yaml(text: str, name: str) -> object:
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicate = _duplicate_key(node)
        if duplicate:
            raise ConfigError([f"{name}: {duplicate}"])
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
    loaded = load_config_report(path, secrets=secrets, environ=environ)
    return loaded.config, loaded.sources


class LoadedConfig(NamedTuple):
    """What `relay check-config` reports besides the config itself."""

    config: Config
    sources: Sources  # key -> where its value came from
    from_environment: frozenset[str]  # keys whose value a variable gave (not the file's text)
    unresolved: list[str]  # secret keys whose ${VAR} is not set here (secrets=False only)


def load_config_report(
    path: str | os.PathLike[str] | None, *, secrets: bool = True,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """The config with where each value came from (keys not listed are defaults)."""
    env = os.environ if environ is None else environ
    data = {} if path is None else _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of keys to values"])
    sources = file_sources(data, str(path)) if path is not None else {}
    data, substituted, unresolved = substitute(data, env, secrets=secrets)
    for key, how in substituted.items():
        sources[key] = f"{path} {how}" if how.startswith("via ") else f"{path} ({how})"
    data, overridden = apply_overrides(data, env, set(Config.model_fields))
    sources = {k: v for k, v in sources.items()
               if not any(k == o or k.startswith(o + ".") for o in overridden)}
    sources.update(overridden)
    # A variable gave the value (or will, where serve runs): not a literal in the file.
    from_environment = frozenset(
        [k for k, how in substituted.items() if how.startswith("via ")], ) | frozenset(
        overridden) | frozenset(note.partition(": ")[0] for note in unresolved)
    try:
        config = parse_config(data, secrets=secrets)
    except ConfigError as exc:
        raise ConfigError([_name_variable(p, overridden) for p in exc.problems]) from None
    return LoadedConfig(config, sources, from_environment, unresolved)


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
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    data = parse_yaml(raw, str(path))
    if data is None:
        # A file named but empty (or only comments) is a mistake, most often a truncated
        # write: applied, it would be the defaults, every account removed.
        raise ConfigError([f"{path}: config file is empty (write {{}} for the defaults)"])
    return data


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
        return _load_yaml(text, name)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{name}: invalid YAML: nested too deeply"]) from None
