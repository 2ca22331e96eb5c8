"""Running relay in production (issue 20): the install name, operator commands without the
service's secrets, config from the environment, queue backup and check."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_distribution_name_is_not_the_taken_pypi_name_and_docs_use_it() -> None:
    """`pip install relay` installs an SSH-tunnel project: ours must be named otherwise,
    keep the `relay` command, and the install docs must name what is really published."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = project["name"]
    assert name == "relay-smtp"
    assert project["scripts"] == {"relay": "relay.cli:main"}
    assert project["requires-python"] == ">=3.11"
    for doc in ("README.md", "docs/operations.md"):
        text = (ROOT / doc).read_text()
        assert f"pipx install {name}" in text, doc
        assert "pip install relay\n" not in text and "pipx install relay\n" not in text
    ops = (ROOT / "docs/operations.md").read_text()
    assert "3.11" in ops and "python -m build" in ops.replace("python3 -m build", "python -m build")
