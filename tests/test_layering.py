"""The package's layers import only downwards (../shared/STYLE.md), checked with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS = {
    "vocabulary": (0, {"message", "errors", "replies", "transport", "durations", "runner",
                    "printable"}),
    "core": (1, {"config", "headers", "routing", "priority", "ratelimit", "retry", "outcome",
                 "bounce", "queueops", "smtpwire", "smtpdata", "addresses", "refusals",
                 "throttle"}),
    "edges": (2, {"ingest", "store", "upstream", "maildir", "metrics", "http", "logs", "auth"}),
    "orchestration": (3, {"app", "scheduler", "health"}),
    "entry": (4, {"cli", "cli_queue", "cli_status", "cli_progress", "bench", "benchsink",
                  "loadgen", "__main__", "__init__"}),
}
LEVEL = {module: level for level, modules in LAYERS.values() for module in modules}
# Libraries that only their edge may import.
OWNED = {"aiosmtpd": {"ingest", "bench", "benchsink", "loadgen"},
         "aiosmtplib": {"upstream", "bench", "benchsink", "loadgen"},
         "aiosqlite": {"store"}, "sqlite3": {"store"},
         "aiohttp": {"http", "app"}, "prometheus_client": {"metrics", "http", "app"}}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(LEVEL) == set(), "add new modules to LAYERS"


def test_imports_point_down_and_libraries_stay_in_their_edge() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        module = path.stem
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "relay" and "." in name:
                target = name.split(".")[1]
                if target in LEVEL and LEVEL[target] > LEVEL[module]:
                    problems.append(f"{module} (layer {LEVEL[module]}) imports {target}")
                if LEVEL[module] == 2 and LEVEL.get(target) == 2 and target not in (
                        "logs", "metrics", "auth") and module != target:
                    problems.append(f"edge {module} imports edge {target}")
            elif top in OWNED and module not in OWNED[top]:
                problems.append(f"{module} imports {top}, which belongs to {OWNED[top]}")
    assert problems == []
