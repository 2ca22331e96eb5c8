"""Running relay in production (issue 20): the install name, operator commands without the
service's secrets, config from the environment, queue backup and check."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay.cli.commands import main

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


# -- operator commands without the service's secrets ----------------------------------

SECRET_CONFIG = """\
queue: {{path: {queue}}}
routing: {{default_account: gmail}}
accounts:
  gmail:
    host: smtp.example.com
    username: app@example.com
    password_env: RELAY_TEST_GMAIL_PASSWORD
  ses:
    host: email-smtp.example.com
    username: AKIA
    password_file: {missing}
"""


def _secret_config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(SECRET_CONFIG.format(queue=tmp_path / "q.sqlite3",
                                         missing=tmp_path / "root-only.secret"))
    return path


def _make_queue(path: Path) -> None:
    import asyncio

    from relay.queue.sqlite.store import SQLiteStore

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())


def test_operator_commands_run_without_the_services_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin's shell has no GMAIL password and cannot read the root-only secret file:
    `queue list`, `status` and `check-config` still work; check-config names what it
    could not resolve and still passes."""
    monkeypatch.delenv("RELAY_TEST_GMAIL_PASSWORD", raising=False)
    config = _secret_config(tmp_path)
    _make_queue(tmp_path / "q.sqlite3")
    for argv in (["queue", "list"], ["status"]):
        assert main([*argv, "-c", str(config)]) == 0, capsys.readouterr().err
        assert "config error" not in capsys.readouterr().err
    assert main(["check-config", "-c", str(config)]) == 0
    err = capsys.readouterr().err
    assert "accounts.gmail.password_env: environment variable RELAY_TEST_GMAIL_PASSWORD" in err
    assert f"accounts.ses.password_file: cannot read {tmp_path / 'root-only.secret'}" in err


def test_serve_and_accounts_test_still_need_the_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAY_TEST_GMAIL_PASSWORD", raising=False)
    config = _secret_config(tmp_path)
    for argv in (["serve"], ["accounts", "test", "gmail"]):
        assert main([*argv, "-c", str(config)]) == 2
        err = capsys.readouterr().err
        assert ("config error: accounts.gmail.password_env: environment variable"
                " RELAY_TEST_GMAIL_PASSWORD is not set") in err
