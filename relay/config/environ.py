"""Configuration from the environment, for containers and twelve-factor deployments.

Two mechanisms, applied to the parsed YAML before validation, in this order:

1. ``${VAR}`` and ``${VAR:-default}`` in YAML string values (never in keys) are replaced by
   the variable's value; ``$${`` is a literal ``${``. An unset variable without a default
   is an error that names the key. The result stays a string (pydantic turns "587" into
   a port), so a substitution cannot change the shape of the document.
2. ``RELAY_<KEY>__<KEY>...`` overrides one key (``RELAY_LISTEN__HOST=0.0.0.0``,
   ``RELAY_ACCOUNTS__GMAIL__RATE_LIMIT__PER_DAY=500``): ``__`` separates keys because keys
   contain ``_``. The value is read as a YAML scalar or flow list (``[10.0.0.0/8]``).
   An override wins over the file. Variables whose first key is not a top-level section
   (``RELAY_CONFIG``) are not overrides.

Pure: the environment comes in as a mapping. Each function also reports where every value
it set came from, which `relay check-config` prints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from relay.errors import ConfigError

PREFIX = "RELAY_"
SEPARATOR = "__"
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")

Sources = dict[str, str]


def substitute(data: Any, environ: Mapping[str, str]) -> tuple[Any, Sources]:
    """``data`` with every ``${VAR}`` in a string value replaced; the keys it touched, each
    with the variables used."""
    sources: Sources = {}
    problems: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        used: list[str] = []

        def replace(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$${":
                return "${"
            name, default = match.group(1), match.group(2)
            if name is None:
                problems.append(f"{path}: malformed reference {text!r}"
                                " (use ${VAR} or ${VAR:-default})")
                return text
            used.append(name)
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    problems.append(f"{path}: environment variable {name} is not set"
                                    " (give a default with ${" + name + ":-value})")
                    return text
                return default
            return value

        result = _REFERENCE.sub(replace, node)
        if used:
            sources[path] = "${" + "}, ${".join(used) + "}"
        return result

    result = walk(data, "")
    if problems:
        raise ConfigError(problems)
    return result, sources


def overrides(environ: Mapping[str, str], sections: set[str]) -> list[tuple[str, list[str], str]]:
    """The ``RELAY_`` overrides in ``environ``: (variable, key path, raw value), sorted."""
    found = []
    for var, value in sorted(environ.items()):
        if not var.startswith(PREFIX):
            continue
        keys = [part.lower() for part in var[len(PREFIX):].split(SEPARATOR)]
        if keys[0] not in sections:
            if len(keys) > 1:  # meant as an override: a typo must not pass silently
                raise ConfigError([f"{var}: no config section {keys[0]!r}"
                                   f" (sections: {', '.join(sorted(sections))})"])
            continue
        if any(not key for key in keys):
            raise ConfigError([f"{var}: empty key between '{SEPARATOR}' separators"])
        found.append((var, keys, value))
    return found


def apply_overrides(data: dict[str, Any], environ: Mapping[str, str],
                    sections: set[str]) -> tuple[dict[str, Any], Sources]:
    """``data`` with each ``RELAY_`` override set; the keys set, each with its variable."""
    sources: Sources = {}
    for var, keys, raw in overrides(environ, sections):
        node = data
        for i, key in enumerate(keys[:-1]):
            key = _existing(node, key)
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"{var}: {'.'.join(keys[:i + 1])} is not a mapping"])
            node = child
        last = _existing(node, keys[-1])
        node[last] = _scalar(raw)
        sources[".".join([*keys[:-1], last])] = var
    return data, sources


def _existing(node: dict[str, Any], key: str) -> str:
    """The file's spelling of ``key`` (account and user names may have capitals)."""
    for existing in node:
        if isinstance(existing, str) and existing.lower() == key:
            return existing
    return key


def _scalar(raw: str) -> Any:
    """A number, boolean or flow list as YAML reads it; anything else (``::``, text with
    ``: `` in it) as the string it is, since one variable sets one key."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) or value is None else value


def file_sources(data: Any, origin: str, path: str = "") -> Sources:
    """Every leaf key in ``data``, attributed to ``origin`` (the config file)."""
    if isinstance(data, dict) and data:
        found: Sources = {}
        for key, value in data.items():
            found.update(file_sources(value, origin, f"{path}.{key}" if path else str(key)))
        return found
    return {path: origin} if path else {}
