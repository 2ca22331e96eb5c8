"""Log and terminal injection (issue 11 point 15): client- and upstream-supplied text
never reaches a log line or the terminal raw. A real listener, a real upstream, the
real `relay queue` commands on the queue file."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli.commands import main
from relay.ingest.auth import hash_password
from relay.observe.logs import build_handler
from relay.printable import escape, field_value
from tests.conftest import StartRelay, message, relay_config, upstream_account
from tests.smtpclient import RawSMTP
from tests.upstream import FakeUpstream

# Tabs, not spaces: a value without a space was written bare.
FORGED = "x\n2026-11-30T12:00:00\tINFO\trelay.delivery:\t0123ABCD:\tdelivered\taccount=up"
# ESC sequences that recolour the terminal and set its title, a bidi override, C1 CSI.
NASTY = "\x1b[31mred\x1b]0;pwned\x07\u202egnp.exe\x9b2J"


def _captured(fmt: str) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = build_handler(fmt)
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("relay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    yield from _captured("text")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    yield from _captured("json")


def _auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_a_user_name_cannot_forge_a_log_line(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    text_log: io.StringIO, json_log: io.StringIO,
) -> None:
    users = {"app": {"password_hash": hash_password("right")}}
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen={"auth": {"users": users}})
    app = await start_relay(config)
    client = await RawSMTP.connect(app.smtp_port)
    await client.reply()
    await client.cmd("EHLO client.example")
    assert (await client.cmd(_auth_plain(FORGED + NASTY, "wrong"))).startswith("535")
    await client.close()

    (line,) = [x for x in text_log.getvalue().splitlines() if "auth_failed" in x]
    assert text_log.getvalue().count("delivered") == 1  # inside the quoted user only
    assert "\t" not in line and "\x1b" not in line and "\u202e" not in line
    assert 'user="x\\n2026-11-30T12:00:00\\tINFO\\trelay.delivery:\\t0123ABCD:' in line
    (record,) = [json.loads(x) for x in json_log.getvalue().splitlines()
                 if "auth_failed" in x]
    assert record["user"] == (FORGED + NASTY)[:64]
    assert all(c.isascii() and c.isprintable() for c in json_log.getvalue().rstrip("\n")
               .replace("\n", ""))


def test_text_lines_that_are_not_events_are_escaped_too(text_log: io.StringIO) -> None:
    logging.getLogger("relay").warning("config: %s", "a\nforged line" + NASTY)
    (line,) = text_log.getvalue().splitlines()
    assert "a\\nforged line\\u001b[31m" in line and "\x07" not in line


def test_the_escape_is_unambiguous_and_keeps_text() -> None:
    assert escape("caf\u00e9 <a@example.com>") == "caf\u00e9 <a@example.com>"
    assert escape("\r\n\t\x00\x7f\x85\u2028") == "\\r\\n\\t\\u0000\\u007f\\u0085\\u2028"
    assert field_value("ok") == "ok"
    assert field_value("") == '""'
    assert field_value('a"b\\') == '"a\\"b\\\\"'
    assert json.loads(field_value("250 2.0.0 ok\nx")) == "250 2.0.0 ok\nx"


async def test_queue_list_and_show_escape_headers_and_upstream_replies(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          retry={"initial_delay": "1h", "max_delay": "1h", "max_age": "2d",
                                 "jitter": 0})
    upstream.fail_data(451, "4.3.0 busy " + NASTY)
    app = await start_relay(config)
    client = await RawSMTP.connect(app.smtp_port)
    await client.reply()
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.com>")
    await client.cmd("DATA")
    await client.send_raw(message("hi", headers={"X-Note": NASTY}) + b".\r\n")
    reply = await client.reply()
    assert reply.startswith("250")
    queue_id = reply.split()[-1]
    await client.close()
    await app.scheduler.run_until_idle()  # one attempt, deferred for an hour

    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps({"queue": {"path": str(config.queue.path)}}))
    for argv in (["queue", "list"], ["queue", "show", queue_id]):
        capsys.readouterr()
        assert await asyncio.to_thread(main, [*argv, "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "\\u001b[31mred" in out, out  # shown, escaped
        assert not any(ch in out for ch in "\x1b\x07\x9b\u202e\r\t"), out
    assert "X-Note: \\u001b[31mred" in out
