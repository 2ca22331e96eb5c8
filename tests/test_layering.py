"""The package's layers import only downwards (../shared/STYLE.md), checked with ast.

Each module's layer comes from its subpackage (the longest matching prefix below), so a
new module inherits the rules of the folder it is put in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
# Lower number = lower layer. A module may import its own layer or lower ones.
VOCABULARY, CORE, EDGE, ORCHESTRATION, ENTRY = range(5)
LAYER = {
    "relay.errors": VOCABULARY, "relay.printable": VOCABULARY, "relay.runner": VOCABULARY,
    "relay.queue": VOCABULARY, "relay.delivery.transport": VOCABULARY,
    "relay.smtp": CORE, "relay.config": CORE, "relay.delivery": CORE,
    "relay.ingest": EDGE, "relay.queue.sqlite": EDGE, "relay.queue.postgres": EDGE,
    "relay.delivery.smtp": EDGE,
    "relay.delivery.maildir": EDGE, "relay.observe": EDGE,
    "relay.app": ORCHESTRATION, "relay.delivery.scheduler": ORCHESTRATION,
    "relay.delivery.health": ORCHESTRATION, "relay.delivery.worker": ORCHESTRATION,
    "relay.delivery.host": ORCHESTRATION, "relay.delivery.backoff": ORCHESTRATION,
    "relay.delivery.slowdown": ORCHESTRATION, "relay.delivery.member": ORCHESTRATION,
    "relay.delivery.account": ORCHESTRATION, "relay.delivery.pacing": ORCHESTRATION,
    "relay.delivery.recording": ORCHESTRATION,
    "relay.cli": ENTRY, "relay.bench": ENTRY, "relay.supervisors": ENTRY,
    "relay.__main__": ENTRY, "relay": ENTRY,
}
# Each edge is one of these parts; edges do not import each other, except the shared ones.
EDGES = ("relay.ingest", "relay.queue.sqlite", "relay.queue.postgres", "relay.delivery.smtp",
         "relay.delivery.maildir", "relay.observe")
SHARED_EDGES = ("relay.observe", "relay.ingest.auth")
# Libraries that only their edge may import.
OWNED = {"aiosmtpd": ("relay.ingest", "relay.bench"),
         "aiosmtplib": ("relay.delivery.smtp", "relay.bench"),
         "aiosqlite": ("relay.queue.sqlite",), "sqlite3": ("relay.queue.sqlite",),
         "psycopg": ("relay.queue.postgres",), "psycopg_pool": ("relay.queue.postgres",),
         "aiohttp": ("relay.observe.http", "relay.observe.webhooks", "relay.app",
                     "relay.delivery.smtp.tokens"),
         "prometheus_client": ("relay.observe", "relay.app")}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _longest(name: str, prefixes: object) -> str | None:
    found = [p for p in prefixes if _within(name, p)]  # type: ignore[attr-defined]
    return max(found, key=len) if found else None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _modules() if _longest(m, LAYER) is None]
    assert missing == [], "add new packages to LAYER"


def test_every_subpackage_says_what_lives_there() -> None:
    bare = [m for m, p in _modules().items() if p.name == "__init__.py" and not
            ast.get_docstring(ast.parse(p.read_text()))]
    assert bare == []


def test_imports_point_down_and_libraries_stay_in_their_edge() -> None:
    modules = _modules()
    problems = []
    for module, path in modules.items():
        level = LAYER[_longest(module, LAYER) or ""]
        edge = _longest(module, EDGES)
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "relay":
                if name not in modules:  # `from relay.x import Name`: judge relay.x
                    name = name.rpartition(".")[0]
                key = _longest(name, LAYER)
                if key is None or key == "relay":
                    continue  # relay's own __init__ (the version) is importable from anywhere
                if LAYER[key] > level:
                    problems.append(f"{module} (layer {level}) imports {name} ({LAYER[key]})")
                target_edge = _longest(name, EDGES)
                if (edge and target_edge and target_edge != edge
                        and _longest(name, SHARED_EDGES) is None):
                    problems.append(f"edge {module} imports edge {name}")
            elif top in OWNED and not any(_within(module, p) for p in OWNED[top]):
                problems.append(f"{module} imports {top}, which belongs to {OWNED[top]}")
    assert problems == []


def test_only_the_wiring_names_the_sqlite_store() -> None:
    """Everything else holds a relay.queue.store.QueueStore, so a second store can replace it."""
    wiring = {"relay.app", "relay.cli.common", "relay.bench.relayproc",
              "relay.supervisors.multiprocess"}
    for store in ("relay.queue.sqlite", "relay.queue.postgres"):
        naming = {module for module, path in _modules().items()
                  if not _within(module, store)
                  and any(_within(name, store) for name in _imports(path))}
        assert naming <= wiring, store


def test_policy_takes_plain_values_not_config_models() -> None:
    """Config is translated once at the edge: the pure core never sees a pydantic model."""
    pure = ("relay.smtp", "relay.queue", "relay.delivery")
    wiring = ("relay.queue.sqlite", "relay.delivery.smtp", "relay.delivery.scheduler",
              "relay.delivery.worker", "relay.delivery.health", "relay.delivery.maildir")
    reading = sorted(module for module, path in _modules().items()
                     if any(_within(module, p) for p in pure)
                     and not any(_within(module, w) for w in wiring)
                     and any(_within(name, "relay.config.schema") for name in _imports(path)))
    assert reading == []


def test_serve_does_not_import_the_benchmark() -> None:
    """`relay serve` loads the CLI and the app, never relay.bench (sinks, Postfix, loadgen)."""
    code = (
        "import sys\n"
        "from relay.cli.commands import build_parser\n"
        "import relay.app\n"
        "args = build_parser().parse_args(['serve'])\n"
        "assert args.func.__name__ == 'cmd_serve'\n"
        "print(sorted(m for m in sys.modules if m.startswith('relay.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    loaded = done.stdout.split("'")
    assert "relay.app" in loaded and "relay.cli.commands" in loaded
    assert [m for m in loaded if m.startswith("relay.bench")] == []
