"""Log lines: JSON with the keys docs/logging.md promises, logging.file and logrotate.

The events table of docs/logging.md is read as data: each event's logger and fields are
checked against what a real message's life logs, and against every ``event(...)`` call
in relay/ (read with ast), so neither the code nor the document can drift alone.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.observe.logs import JsonFormatter, event, setup_logging
from tests.conftest import StartRelay, message, relay_config, send, upstream_account
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "logging.md"
BASE_KEYS = {"ts", "level", "logger", "event", "queue_id"}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COUNTS = {"size", "nrcpt", "attempt", "failed_recipients", "count", "failed"}  # JSON numbers


def documented_events() -> dict[str, dict[str, Any]]:
    """The rows of the Events table: name -> levels, logger, queue_id, fields."""
    events: dict[str, dict[str, Any]] = {}
    in_table = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_table = line == "## Events"
            continue
        row = re.match(r"^\|\s*`(\w+)`\s*\|", line)
        if in_table and row:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            events[row.group(1)] = {
                "levels": {x.strip() for x in cells[1].split(",")},
                "logger": cells[2].strip("`"),
                "queue_id": cells[3],
                "fields": set(re.findall(r"`(\w+)`", cells[4])),
            }
    return events


def emitted_events() -> dict[str, set[str]]:
    """Every event name passed to relay.logs.event(...) in relay/, with its field names."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "relay").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "event" and len(node.args) >= 3):
                continue
            name = node.args[2]
            # A literal, or `"a" if cond else "b"` (account_auth_failed / account_backoff).
            choices = [name.body, name.orelse] if isinstance(name, ast.IfExp) else [name]
            assert all(isinstance(c, ast.Constant) and isinstance(c.value, str)
                       for c in choices), f"{path.name}:{node.lineno}: event name not literal"
            for choice in choices:
                assert isinstance(choice, ast.Constant) and isinstance(choice.value, str)
                found.setdefault(choice.value, set()).update(
                    k.arg for k in node.keywords if k.arg is not None)
    return found


def test_every_event_in_the_source_is_documented_with_its_fields() -> None:
    emitted, documented = emitted_events(), documented_events()
    assert {"received", "delivered", "deferred", "failed", "account_auth_failed",
            "account_backoff", "started"} <= set(emitted)  # the walk found the calls
    assert sorted(set(emitted) - set(documented)) == [], "logged but not in docs/logging.md"
    assert sorted(set(documented) - set(emitted)) == [], "documented but never logged"
    for name, fields in emitted.items():
        assert fields == documented[name]["fields"], name


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the `relay` loggers write at info, formatted by relay's JsonFormatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("relay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def check_line(line: dict[str, Any], documented: dict[str, dict[str, Any]]) -> None:
    """A JSON line carries the base keys and exactly its event's documented fields."""
    doc = documented[line["event"]]
    assert TS.match(line["ts"]), line
    assert line["level"] in doc["levels"] and line["logger"] == doc["logger"], line
    assert set(line) - BASE_KEYS <= doc["fields"], line
    for key in set(line) & COUNTS:
        assert isinstance(line[key], int), (key, line)


async def test_a_messages_life_in_json_carries_the_documented_keys(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, json_lines: io.StringIO,
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
    upstream.fail_data(451, "4.3.0 try again later")  # the first attempt is deferred
    code, reply = await send(app.smtp_port, message("life"),
                             recipients=["to@example.com", "gone@example.com"])
    assert code == 250
    queue_id = reply.split()[-1]
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()

    documented = documented_events()
    lines = [json.loads(text) for text in json_lines.getvalue().splitlines()]
    for line in lines:
        check_line(line, documented)
    life = [x for x in lines if x.get("queue_id") == queue_id]
    # Which recipient failed, and why, is on a line of its own (the 451 at DATA left
    # the first attempt's RCPT replies moot, so the 550 comes at the second).
    assert [x["event"] for x in life] == ["received", "deferred", "delivered",
                                          "recipients_failed"]
    received, deferred, delivered, failed_now = life
    assert failed_now["attempt"] == 2 and failed_now["to"] == "<gone@example.com>"
    assert failed_now["reason"] == "<gone@example.com>: 550 5.1.1 no such user"
    assert received == {
        "ts": received["ts"], "level": "info", "logger": "relay.smtpd", "event": "received",
        "queue_id": queue_id, "client": received["client"], "sender": "<app@example.com>",
        "size": len(message("life")), "nrcpt": 2, "account": "up", "priority": "normal"}
    assert re.match(r"^127\.0\.0\.1:\d+$", received["client"])
    assert deferred["attempt"] == 1 and "451" in deferred["reason"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", deferred["next_attempt"])
    # Every field of `delivered`, the optional failed_recipients too, is present (but
    # `worker`: only with several workers, tests/test_workers.py).
    assert set(delivered) - BASE_KEYS == documented["delivered"]["fields"] - {"worker"}
    assert (delivered["attempt"], delivered["failed_recipients"]) == (2, 1)
    assert delivered["relay"] == f"{upstream.host}:{upstream.port}"
    assert float(delivered["delay"]) > 0
    started = next(x for x in lines if x.get("event") == "started")
    assert started["listen"] == f"127.0.0.1:{app.smtp_port}" and "queue_id" not in started


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root, aiosmtpd = logging.getLogger(), logging.getLogger("mail.log")
    handlers, level, mail_level = list(root.handlers), root.level, aiosmtpd.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    aiosmtpd.setLevel(mail_level)


def test_logging_file_is_reopened_after_logrotate_moves_it(
    tmp_path: Path, restore_root_logging: None,
) -> None:
    path = tmp_path / "relay.log"
    setup_logging("info", "json", path)
    log = logging.getLogger("relay.delivery")
    event(log, logging.INFO, "delivered", "ID1", account="a")
    os.rename(path, tmp_path / "relay.log.1")  # what logrotate does (without copytruncate)
    event(log, logging.INFO, "delivered", "ID2", account="a")
    path.unlink()  # and a file removed outright is made again too
    event(log, logging.INFO, "delivered", "ID3", account="a")

    def ids(p: Path) -> list[str]:
        return [json.loads(x)["queue_id"] for x in p.read_text(encoding="utf-8").splitlines()]

    assert ids(tmp_path / "relay.log.1") == ["ID1"]
    assert ids(path) == ["ID3"]


def open_fds_on(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_setting_up_logging_again_closes_the_old_file(
    tmp_path: Path, restore_root_logging: None,
) -> None:
    """As SIGHUP does: the previous log file is closed, not left open for each reload."""
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    setup_logging("info", "text", first)
    handler = logging.getLogger().handlers[-1]  # held, so only close() can free its file
    assert open_fds_on(first) == 1
    setup_logging("info", "text", second)
    assert handler not in logging.getLogger().handlers
    event(logging.getLogger("relay"), logging.INFO, "reloaded")
    assert (open_fds_on(first), open_fds_on(second)) == (0, 1)
    assert first.read_text() == "" and "reloaded" in second.read_text()


def test_an_unwritable_logging_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None,
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({"logging": {"file": str(tmp_path / "no-dir" / "x.log")},
                                      "queue": {"path": str(tmp_path / "queue.sqlite3")}}))
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"config error: logging.file: cannot open {tmp_path / 'no-dir' / 'x.log'}:"
        " No such file or directory\n")
    assert not (tmp_path / "queue.sqlite3").exists()  # it stopped before opening anything


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]


async def wait_for_line(path: Path, wanted: dict[str, str], timeout: float = 15.0
                        ) -> dict[str, Any]:
    """The first JSON line in ``path`` that has ``wanted``'s keys and values."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for line in await asyncio.to_thread(read_lines, path):
            if wanted.items() <= line.items():
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no line with {wanted} in {path}")


@pytest.mark.slow
async def test_serve_writes_json_to_logging_file_and_nothing_to_stderr(tmp_path: Path) -> None:
    log_file = tmp_path / "relay.log"
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "logging": {"format": "json", "file": str(log_file)},
        "accounts": {"outbox": {"transport": "maildir", "path": str(tmp_path / "box")}},
    }))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        started = await wait_for_line(log_file, {"event": "started"})
        port = int(started["listen"].rsplit(":", 1)[1])  # port 0: the log says which
        code, reply = await send(port, message("to the file"))
        assert code == 250
        delivered = await wait_for_line(log_file, {"event": "delivered",
                                                   "queue_id": reply.split()[-1]})
        assert delivered["relay"] == f"maildir:{tmp_path / 'box'}"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, out, err) == (0, b"", b"")
    await wait_for_line(log_file, {"event": "stopped"}, timeout=1)
