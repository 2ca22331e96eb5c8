"""Configuration from the environment, for containers and twelve-factor deployments.

Two mechanisms, applied to the parsed YAML before validation, in this order:

1. ``${VAR}`` and ``${VAR:-default}`` in YAML string values (never in keys) are replaced by
   the variable's value; ``$${`` is a literal ``${``. An unset variable without a default
   is an error that names the key, except in a secret key (``password``,
   ``password_file``, ``password_hash``) when secrets are not read: the operator commands
   run without the service's secrets, so the reference is left as written and named.
   The result stays a string (pydantic turns "587" into a port), so a substitution cannot
   change the shape of the document.
2. ``RELAY_<KEY>__<KEY>...`` overrides one key (``RELAY_LISTEN__HOST=0.0.0.0``,
   ``RELAY_ACCOUNTS__GMAIL__RATE_LIMIT__PER_DAY=500``): ``__`` separates keys because keys
   contain ``_``. The value is read as a YAML scalar or flow list (``[10.0.0.0/8]``).
   An override wins over the file. A key that holds a mapping (a whole section,
   ``RELAY_SHUTDOWN='{grace: 1s}'``, or an account) may be given as a YAML flow mapping:
   it is merged over the file's, key by key. Variables whose first key is not a top-level
   section (``RELAY_CONFIG``) are not overrides.

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
# Keys holding a secret or where one is: only `relay serve` and `accounts test` read them.
SECRET_KEYS = frozenset({"password", "password_file", "password_hash"})


def substitute(data: Any, environ: Mapping[str, str],
               *, secrets: bool = True) -> tuple[Any, Sources, list[str]]:
    """``data`` with every ``${VAR}`` in a string value replaced; the keys it touched, each
    with how ("via ${A}", "default of ${B}"); and, with secrets=False, the secret keys left
    unresolved because their variable is not set here."""
    sources: Sources = {}
    problems: list[str] = []
    unresolved: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        used: list[str] = []
        defaulted: list[str] = []
        lenient = not secrets and path.rpartition(".")[2] in SECRET_KEYS

        def replace(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$${":
                return "${"
            name, default = match.group(1), match.group(2)
            if name is None:
                problems.append(f"{path}: malformed reference {text!r}"
                                " (use ${VAR} or ${VAR:-default})")
                return text
            value = environ.get(name)
            if value is not None and not (value == "" and default is not None):
                used.append(name)
                return value
            if default is not None:
                defaulted.append(name)
                return default
            # Lenient: a secret the operator commands never read; named, not an error.
            found, hint = ((unresolved, " here") if lenient else
                           (problems, " (give a default with ${" + name + ":-value})"))
            found.append(f"{path}: environment variable {name} is not set{hint}")
            return text

        result = _REFERENCE.sub(replace, node)
        if used or defaulted:
            sources[path] = _how(used, defaulted)
        return result

    result = walk(data, "")
    if problems:
        raise ConfigError(problems)
    return result, sources, unresolved


def _how(used: list[str], defaulted: list[str]) -> str:
    """'via ${A}', 'default of ${B}' or both: whether a variable or the file's default
    gave the value."""
    how = ["via ${" + "}, ${".join(used) + "}"] if used else []
    if defaulted:
        how.append("default of ${" + "}, ${".join(defaulted) + "}")
    return ", ".join(how)


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
        where = ".".join([*keys[:-1], last])
        mapping = _mapping(raw) if len(keys) == 1 or isinstance(node.get(last), dict) else None
        if mapping is not None:
            current = node.get(last)
            node[last] = _merge(current if isinstance(current, dict) else {}, mapping)
            sources.update(file_sources(mapping, var, where))
            continue
        node[last] = _scalar(raw)
        sources[where] = var
    return data, sources


def _mapping(raw: str) -> dict[str, Any] | None:
    """``raw`` as a YAML mapping, if it is one (a section or account in one variable)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return None
    return value if isinstance(value, dict) and value else None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` key by key (mappings recursively; the file's spelling of
    a key kept)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(key, str) and _existing(merged, key.lower()) in merged:
            key = _existing(merged, key.lower())
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


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
