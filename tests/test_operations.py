"""Running relay in production (issue 20): the install name, operator commands without the
service's secrets, config from the environment, queue backup and check."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import stat
import tomllib
from pathlib import Path

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import load_config, load_config_with_sources
from relay.config.schema import Config
from relay.errors import ConfigError
from relay.queue.sqlite.schema import SCHEMA_VERSION
from tests.conftest import Launch, StartRelay, message, send, send_many, wait_until
from tests.relayproc import write_config
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent


def test_distribution_name_is_not_the_taken_pypi_name_and_docs_use_it() -> None:
    """`pip install relay` installs an SSH-tunnel project: ours must be named otherwise,
    keep the `relay` command, and the install docs must name what is really published."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = project["name"]
    assert name == "relay-smtp"
    assert project["scripts"] == {"relay": "relay.cli:main",  # and docs/sendmail.md's:
                                  "sendmail": "relay.cli.sendmail:main",
                                  "relay-sendmail": "relay.cli.sendmail:main"}
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


def test_check_config_names_an_unresolved_queue_password_and_serve_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The PostgreSQL queue's password_env/password_file is a secret like an account's:
    check-config names it as a note (saying who reads it) without connecting, serve
    refuses to start without it."""
    monkeypatch.delenv("RELAY_TEST_UNSET_QUEUE_PW", raising=False)
    unreadable = tmp_path / "missing" / "db.secret"
    for key, value, note in (
            ("password_env", "RELAY_TEST_UNSET_QUEUE_PW",
             "queue.password_env: environment variable RELAY_TEST_UNSET_QUEUE_PW is not"
             " set here"),
            ("password_file", str(unreadable), f"queue.password_file: cannot read {unreadable}"
                                               " here")):
        config = tmp_path / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "queue": {"url": "postgresql://relay@127.0.0.1:1/relay", key: value},
            "routing": {"default_account": "box"},
            "accounts": {"box": {"transport": "maildir", "path": str(tmp_path / "box")}}}))
        assert main(["check-config", "-c", str(config)]) == 0
        err = capsys.readouterr().err
        reads = "`relay serve` and the commands that open the queue read it"
        assert f"note: {note} ({reads})\n" in err, err
        assert main(["serve", "-c", str(config)]) == 2
        assert f"config error: queue.{key}: " in capsys.readouterr().err


SUBSTITUTED_SECRETS = """\
queue: {{path: {queue}}}
routing: {{default_account: gmail}}
listen:
  auth:
    users:
      app: {{password_hash: "${{APP_HASH}}"}}
      web: {{password_file: "${{WEB_PWFILE}}"}}
accounts:
  gmail:
    host: smtp.example.com
    username: app@example.com
    password: ${{SECRETPW}}
  ses:
    host: email-smtp.example.com
    username: AKIA
    password_file: ${{PWFILE}}
"""
UNSET_SECRETS = ("SECRETPW", "PWFILE", "APP_HASH", "WEB_PWFILE")


def test_unset_variables_in_secret_keys_do_not_stop_the_operator_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`password: ${SECRETPW}` with SECRETPW unset is like an unset password_env: queue
    and status work, check-config names it as a note (and does not call it a literal
    password), serve and accounts test refuse it."""
    for name in UNSET_SECRETS:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "relay.yaml"
    config.write_text(SUBSTITUTED_SECRETS.format(queue=tmp_path / "q.sqlite3"))
    _make_queue(tmp_path / "q.sqlite3")
    for argv in (["queue", "list"], ["status"]):
        assert main([*argv, "-c", str(config)]) == 0, capsys.readouterr().err
        assert "config error" not in capsys.readouterr().err
    assert main(["check-config", "-c", str(config)]) == 0
    err = capsys.readouterr().err
    for key, var in (("accounts.gmail.password", "SECRETPW"),
                     ("accounts.ses.password_file", "PWFILE"),
                     ("listen.auth.users.app.password_hash", "APP_HASH"),
                     ("listen.auth.users.web.password_file", "WEB_PWFILE")):
        assert f"note: {key}: environment variable {var} is not set here" in err, err
    assert "literal password" not in err
    assert "cannot read ${" not in err  # named once, by its variable
    for argv in (["serve"], ["accounts", "test", "gmail"]):
        assert main([*argv, "-c", str(config)]) == 2
        assert ("config error: accounts.gmail.password: environment variable SECRETPW"
                " is not set") in capsys.readouterr().err


def test_a_password_from_a_variable_is_not_called_a_literal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SECRETPW", "s3cret-from-env")
    monkeypatch.setenv("PWFILE", str(tmp_path / "ses.secret"))
    monkeypatch.setenv("APP_HASH", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA")
    monkeypatch.setenv("WEB_PWFILE", str(tmp_path / "web.secret"))
    (tmp_path / "ses.secret").write_text("x")
    (tmp_path / "web.secret").write_text("y")
    config = tmp_path / "relay.yaml"
    config.write_text(SUBSTITUTED_SECRETS.format(queue=tmp_path / "q.sqlite3"))
    assert main(["check-config", "-c", str(config)]) == 0
    captured = capsys.readouterr()
    assert "literal password" not in captured.err
    assert "s3cret-from-env" not in captured.out + captured.err
    assert f"#   accounts.gmail.password: {config} via ${{SECRETPW}}" in captured.out
    # Written in the file itself, it still is one.
    config.write_text(SUBSTITUTED_SECRETS.format(queue=tmp_path / "q.sqlite3")
                      .replace("${SECRETPW}", "hunter2"))
    assert main(["check-config", "-c", str(config)]) == 0
    assert "accounts.gmail.password: a literal password" in capsys.readouterr().err


# -- config from the environment -------------------------------------------------------

ENV_CONFIG = """\
queue: {path: "${QDIR:-/var/lib/relay}/queue.sqlite3"}
routing: {default_account: gmail}
accounts:
  gmail:
    host: ${SMTP_HOST}
    port: ${SMTP_PORT:-587}
    username: "$${literal}"
    password_env: RELAY_TEST_GMAIL_PASSWORD
"""


def test_env_substitution_and_relay_overrides_as_a_container_would_set_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """${VAR} and ${VAR:-default} fill values; RELAY_ overrides single keys and wins over
    the file; check-config says where each value came from."""
    path = tmp_path / "relay.yaml"
    path.write_text(ENV_CONFIG)
    env = {"SMTP_HOST": "smtp.example.net", "RELAY_CONFIG": "/ignored.yaml",
           "RELAY_LISTEN__HOST": "0.0.0.0",
           "RELAY_LISTEN__ALLOWED_NETWORKS": "[10.0.0.0/8, 192.168.0.0/16]",
           "RELAY_ACCOUNTS__GMAIL__PORT": "465", "RELAY_ACCOUNTS__GMAIL__TLS": "implicit"}
    config, sources = load_config_with_sources(path, secrets=False, environ=env)
    gmail = config.accounts["gmail"]
    assert gmail.host == "smtp.example.net"
    assert gmail.port == 465  # the override wins over ${SMTP_PORT:-587}
    assert gmail.username == "${literal}"
    assert str(config.queue.path) == "/var/lib/relay/queue.sqlite3"
    assert config.listen.host == "0.0.0.0"
    assert [str(n) for n in config.listen.allowed_networks] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert sources["accounts.gmail.host"] == f"{path} via ${{SMTP_HOST}}"
    assert sources["accounts.gmail.port"] == "RELAY_ACCOUNTS__GMAIL__PORT"
    assert sources["accounts.gmail.password_env"] == str(path)
    assert "listen.port" not in sources  # a default

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert main(["check-config", "-c", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "#   listen.host: RELAY_LISTEN__HOST" in printed
    assert f"#   accounts.gmail.host: {path} via ${{SMTP_HOST}}" in printed
    assert yaml.safe_load(printed)["accounts"]["gmail"]["port"] == 465


@pytest.mark.parametrize(("env", "problem"), [
    ({}, "accounts.gmail.host: environment variable SMTP_HOST is not set"
         " (give a default with ${SMTP_HOST:-value})"),
    ({"SMTP_HOST": "h", "RELAY_LISTEN__PORT": "smtp"},
     "listen.port: must be a whole number (set by RELAY_LISTEN__PORT)"),
    ({"SMTP_HOST": "h", "RELAY_LISTN__PORT": "25"},
     "RELAY_LISTN__PORT: no config section 'listn' (sections:"
     f" {', '.join(sorted(Config.model_fields))})"),
    ({"SMTP_HOST": "h", "RELAY_LISTEN__HOTS": "::"},
     "listen.hots: unknown key (set by RELAY_LISTEN__HOTS)"),
])
def test_env_errors_name_the_key_and_the_variable(
    env: dict[str, str], problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(ENV_CONFIG)
    with pytest.raises(ConfigError) as caught:
        load_config_with_sources(path, secrets=False, environ=env)
    assert caught.value.problems == [problem]


def test_sources_say_when_the_default_was_used(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text('shutdown: {drain_delay: "${DRAIN:-3s}", grace: "${GRACE:-9s}"}\n'
                    'listen: {host: "${HOST:-127.0.0.1}"}\n')
    config, sources = load_config_with_sources(path, secrets=False,
                                               environ={"GRACE": "2s", "HOST": ""})
    assert config.shutdown.drain_delay == 3 and config.shutdown.grace == 2
    assert sources["shutdown.drain_delay"] == f"{path} (default of ${{DRAIN}})"
    assert sources["shutdown.grace"] == f"{path} via ${{GRACE}}"
    assert sources["listen.host"] == f"{path} (default of ${{HOST}})"  # empty: the default


def test_a_whole_section_in_one_variable_is_merged_over_the_file(tmp_path: Path) -> None:
    """RELAY_SHUTDOWN='{grace: 1s}' sets shutdown.grace and keeps the file's drain_delay;
    a mapping for an account works the same way."""
    path = tmp_path / "relay.yaml"
    path.write_text(ENV_CONFIG + "shutdown: {drain_delay: 4s, grace: 20s}\n")
    env = {"SMTP_HOST": "h", "RELAY_SHUTDOWN": "{grace: 1s}",
           "RELAY_ACCOUNTS__GMAIL": "{port: 2525, tls: none}"}
    config, sources = load_config_with_sources(path, secrets=False, environ=env)
    assert (config.shutdown.grace, config.shutdown.drain_delay) == (1, 4)
    assert (config.accounts["gmail"].port, config.accounts["gmail"].tls) == (2525, "none")
    assert config.accounts["gmail"].host == "h"
    assert sources["shutdown.grace"] == "RELAY_SHUTDOWN"
    assert sources["shutdown.drain_delay"] == str(path)
    assert sources["accounts.gmail.port"] == "RELAY_ACCOUNTS__GMAIL"
    with pytest.raises(ConfigError) as caught:
        load_config_with_sources(path, secrets=False,
                                 environ={**env, "RELAY_SHUTDOWN": "{grace: soon}"})
    assert caught.value.problems[0].startswith("shutdown.grace: ")
    assert caught.value.problems[0].endswith("(set by RELAY_SHUTDOWN)")


def test_overrides_work_without_a_config_file() -> None:
    """Twelve-factor: no file at all, a few variables."""
    config = load_config(None, environ={"RELAY_LISTEN__PORT": "2526",
                                        "RELAY_QUEUE__PATH": "/data/q.sqlite3"})
    assert config.listen.port == 2526
    assert str(config.queue.path) == "/data/q.sqlite3"


# -- queue backup and check ------------------------------------------------------------


def _maildir_config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "accounts": {"outbox": {"transport": "maildir", "path": str(tmp_path / "box")}},
        "routing": {"default_account": "outbox"},
    }))
    return path


def _assert_one_snapshot(backup_path: Path, accepted_before: set[str]) -> None:
    with sqlite3.connect(backup_path) as db:
        ids = {r[0] for r in db.execute("SELECT id FROM messages")}
        unfinished = {r[0] for r in db.execute(
            "SELECT id FROM messages WHERE state NOT IN ('delivered', 'failed')")}
        bodies = {r[0] for r in db.execute("SELECT id FROM bodies")}
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert accepted_before <= ids
    # One snapshot: no unfinished message without its body, no body without its message.
    assert unfinished <= bodies <= ids
    assert not Path(f"{backup_path}-wal").exists()
    assert stat.S_IMODE(backup_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in backup_path.parent.iterdir()) == ["queue-1.sqlite3"]



async def test_backup_of_a_live_queue_is_consistent_and_checks_clean(
    tmp_path: Path, start_relay: StartRelay, capsys: pytest.CaptureFixture[str]
) -> None:
    """While clients keep sending, `relay queue backup` copies the queue as of one commit:
    every message it holds has its body, nothing accepted before it started is missing,
    and `relay queue check` passes on the copy (one file, private)."""
    config_path = _maildir_config(tmp_path)
    app = await start_relay(load_config(config_path))
    port = app.smtp_port
    before = await send_many(port, [message(f"before {i}") for i in range(20)])
    assert all(code == 250 for code, _ in before)
    accepted_before = {reply.split()[-1] for _, reply in before}
    sending = asyncio.create_task(
        send_many(port, [message(f"during {i}") for i in range(200)], sessions=4))
    backup_path = tmp_path / "backups" / "queue-1.sqlite3"
    backup_path.parent.mkdir()
    code = await asyncio.to_thread(main, ["queue", "backup", str(backup_path),
                                          "-c", str(config_path)])
    assert code == 0, capsys.readouterr().err
    assert all(c == 250 for c, _ in await sending)
    printed = capsys.readouterr().out
    assert f"{backup_path}: ok: schema {SCHEMA_VERSION}" in printed

    _assert_one_snapshot(backup_path, accepted_before)
    assert main(["queue", "check", str(backup_path)]) == 0
    # A backup never overwrites.
    assert main(["queue", "backup", str(backup_path), "-c", str(config_path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_check_reports_damage_foreign_files_and_newer_schemas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = _maildir_config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _make_queue(queue)
    assert main(["queue", "check", "-c", str(config_path)]) == 0
    printed = capsys.readouterr().out
    assert f"{queue}: ok: schema {SCHEMA_VERSION}, 0 messages, integrity ok" in printed

    newer = tmp_path / "newer.sqlite3"
    shutil.copy(queue, newer)
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    assert main(["queue", "check", str(newer)]) == 1
    printed = capsys.readouterr().out
    assert (f"queue schema 99 is newer than this relay (knows {SCHEMA_VERSION}): upgrade relay"
            in printed)

    foreign = tmp_path / "other.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    assert main(["queue", "check", str(foreign)]) == 1
    assert "not a relay queue file" in capsys.readouterr().out

    damaged = tmp_path / "damaged.sqlite3"
    data = bytearray(queue.read_bytes())
    page = 4096
    data[page * 3: page * 4] = b"\xff" * page  # a b-tree page overwritten
    damaged.write_bytes(bytes(data))
    assert main(["queue", "check", str(damaged)]) == 1
    assert "damaged or not SQLite: database disk image is malformed" in capsys.readouterr().out


async def test_serve_does_not_call_a_password_from_a_variable_a_literal(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relay serve` with `password: ${VAR}` warns of no literal password, at the start or
    at a reload; the same password written in the file is warned of at the reload."""
    monkeypatch.setenv("RELAY_TEST_UP_PASSWORD", upstream.password)
    path = write_config(tmp_path, upstream)
    data = yaml.safe_load(path.read_text())
    account = data["accounts"]["up"]
    del account["password_file"]
    account["password"] = "${RELAY_TEST_UP_PASSWORD}"
    path.write_text(yaml.safe_dump(data))
    relay = await launch(path)
    await relay.wait_started()
    assert (await send(relay.port, message("env password")))[0] == 250
    await upstream.wait_for_messages(1)  # the password from the variable works
    relay.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: "relay: reloaded" in relay.stderr, what="the reload")
    assert "literal password" not in relay.stderr
    account["password"] = upstream.password
    path.write_text(yaml.safe_dump(data))
    relay.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: "accounts.up.password: a literal password in the config file"
                     in relay.stderr, what="the warning at the second reload")
    assert relay.stderr.count("literal password") == 1
