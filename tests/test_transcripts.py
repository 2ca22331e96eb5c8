"""Transcripts (issue 16.4): `relay queue show ID --transcript` shows each attempt's SMTP
conversation with the real upstream, AUTH masked and no message body, stored per attempt
and bounded."""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.delivery.transport import Transcript
from relay.queue.sqlite.schema import SCHEMA_VERSION
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import (
    AttemptResult,
    ExportedMessage,
    MessageState,
    NewMessage,
    Priority,
    Recipient,
)
from tests.conftest import (
    MakeStore,
    PrivateCA,
    StartRelay,
    message,
    relay_config,
    send,
    upstream_account,
)
from tests.test_queue_cli import Relay, write_config
from tests.upstream import FakeUpstream

SECRET_BODY = "the body stays out of transcripts"


async def _delivered_twice(tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
                           capsys: pytest.CaptureFixture[str], mechanism: str
                           ) -> tuple[Relay, str]:
    """A message deferred once (451 to DATA), then delivered: two attempts."""
    path = write_config(tmp_path, {"up": upstream_account(upstream, tmp_path,
                                                          auth_mechanism=mechanism)})
    cli = Relay(path, capsys)
    app = await start_relay(cli.config)
    upstream.fail_data(451, "4.3.0 try again later")
    code, text = await send(app.smtp_port, message("t", body=SECRET_BODY + "\r\n"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    return cli, queue_id


@pytest.mark.parametrize("mechanism", ["plain", "login"])
async def test_show_transcript_gives_each_attempts_conversation_with_auth_masked(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str], mechanism: str,
) -> None:
    cli, queue_id = await _delivered_twice(tmp_path, upstream, start_relay, capsys, mechanism)
    shown = await cli("queue", "show", queue_id, "--transcript")
    assert shown.code == 0, shown.err
    text = shown.out
    first, second = text.split("attempts:\n", 1)[1].split("\n  2")[0:2]
    # The first attempt opened the connection: greeting, EHLO, AUTH, the envelope, DATA.
    for expected in ("-- new connection to 127.0.0.1:", "S: 220 ", "C: EHLO ",
                     "S: 250-", f"C: AUTH {mechanism.upper()} ***", "S: 235 ",
                     "C: MAIL FROM:<app@example.com>", "C: RCPT TO:<to@example.com>",
                     "C: DATA", "S: 354 ", "-- message body, ", "C: .",
                     "S: 451 4.3.0 try again later"):
        assert expected in first, (expected, first)
    assert "S: 250 " in second and "C: MAIL FROM:<app@example.com>" in second
    # Never the SASL payload, never the body.
    password = base64.b64encode(upstream.password.encode()).decode()
    plain = base64.b64encode(f"\0{upstream.username}\0{upstream.password}".encode()).decode()
    for secret in (password, plain, upstream.password, SECRET_BODY):
        assert secret not in text
    if mechanism == "login":
        assert "C: ***" in first and "S: 334 ***" in first
    with sqlite3.connect(cli.queue) as db:
        stored = "\n".join(r[0] for r in db.execute("SELECT transcript FROM attempts"))
    assert stored and password not in stored and plain not in stored and SECRET_BODY not in stored


async def test_show_without_transcript_is_unchanged_and_json_carries_it_on_request(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli, queue_id = await _delivered_twice(tmp_path, upstream, start_relay, capsys, "plain")
    plain = await cli("queue", "show", queue_id)
    assert "C: MAIL" not in plain.out
    data = await cli.json("queue", "show", queue_id)
    assert all("transcript" not in a for a in data["attempt_log"])
    data = await cli.json("queue", "show", queue_id, "--transcript")
    assert [a["outcome"] for a in data["attempt_log"]] == ["deferred", "delivered"]
    assert "C: DATA" in data["attempt_log"][1]["transcript"]


def test_a_transcript_keeps_its_head_and_tail_within_bounds() -> None:
    transcript = Transcript()
    for n in range(1000):
        transcript.client(f"RCPT TO:<r{n}@example.com>" + "x" * 1000)
    transcript.server(250, "2.0.0 Ok: queued\nsecond line")
    lines = transcript.lines()
    assert len(lines) == Transcript.HEAD + 1 + Transcript.TAIL
    assert lines[0].startswith("C: RCPT TO:<r0@") and len(lines[0]) == Transcript.MAX_LINE
    assert lines[Transcript.HEAD] == "-- 882 lines not kept"
    assert lines[-2:] == ("S: 250-2.0.0 Ok: queued", "S: 250 second line")
    escaped = Transcript()
    escaped.server(250, "ok\x1b[31m")
    assert escaped.lines() == ("S: 250 ok\\u001b[31m",)


async def test_transcripts_go_with_their_message(tmp_path: Path, upstream: FakeUpstream,
                                                 start_relay: StartRelay,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cli, queue_id = await _delivered_twice(tmp_path, upstream, start_relay, capsys, "plain")
    store = SQLiteStore(cli.queue, lock=False)
    await store.open()
    try:
        await store.prune(2e10, keep_delivered_s=1.0)
        assert await store.get(queue_id) is None
        assert await store._fetch("SELECT count(*) FROM attempts") == [(0,)]
    finally:
        await store.close()


async def test_a_starttls_upstream_shows_starttls_and_the_second_ehlo(
    tmp_path: Path, private_ca: PrivateCA, start_relay: StartRelay,
) -> None:
    async with FakeUpstream(tls_context=private_ca.server_context) as up:
        account = upstream_account(up, tmp_path, tls="starttls",
                                   tls_ca_file=str(private_ca.ca_cert))
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        code, text = await send(app.smtp_port, message("tls"))
        assert code == 250
        await up.wait_for_messages(1)
        await app.scheduler.run_until_idle()
        record = await app.store.get(text.rsplit(" ", 1)[1])
        assert record is not None
        [attempt] = record.attempts_log
        lines = list(attempt["transcript"])  # type: ignore[call-overload]
        starttls = lines.index("C: STARTTLS")
        assert lines[starttls + 1].startswith("S: 220")
        assert [i for i, line in enumerate(lines) if line.startswith("C: EHLO")][1] > starttls
        assert "C: AUTH PLAIN ***" in lines and lines[-1].startswith("S: 250")


async def test_a_schema_4_queue_is_migrated_with_its_attempts_kept(tmp_path: Path) -> None:
    """A file from before transcripts, dedup keys and the outbox (schema 4): opened, it
    gets them, and its old attempts show without a transcript."""
    path = tmp_path / "q.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.executescript(
            "DROP TABLE dedup; DROP TABLE events; ALTER TABLE attempts DROP COLUMN transcript;"
            "INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
            " created_at, next_attempt_at, updated_at) VALUES ('OLD', 'deferred', 'a', 3,"
            " 's@example.com', '[[\"r@example.com\", \"pending\", \"\"]]', 1, 1, 1, 1);"
            "INSERT INTO attempts VALUES ('OLD', 'a', 1, 'deferred', '451 later');"
            "PRAGMA user_version = 4;")
    store = SQLiteStore(path, migrate=True)
    await store.open()
    try:
        old = await store.get("OLD")
        assert old is not None
        assert old.attempts_log == [{"at": 1, "account": "a", "outcome": "deferred",
                                     "reply": "451 later", "transcript": []}]
        assert await store._fetch("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert await store._fetch("SELECT count(*) FROM dedup") == [(0,)]
        assert await store.next_event_at() is None
    finally:
        await store.close()


async def test_a_transcript_is_stored_shown_and_exported_with_its_attempt(
    make_store: MakeStore,
) -> None:
    """Store level (both stores): finish stores each attempt's lines, get() gives them
    back as lines ([] for an attempt without one), and export/import carries them."""
    store = make_store()
    await store.open()
    try:
        now = time.time()
        await store.enqueue(NewMessage("T1", "a@example.com", ("b@example.com",), "up",
                                       Priority.NORMAL, b"x\r\n", now, now))
        (claimed,) = await store.claim_due("up", now, 1, lease_s=60)
        lines = ("C: EHLO relay", "S: 250 ok", "C: AUTH PLAIN ***", "S: 451 4.3.0 later")
        assert await store.finish(AttemptResult(
            "T1", "up", MessageState.DEFERRED, [Recipient("b@example.com")], 1, now + 60,
            "451 4.3.0 later", now, "deferred", "451 4.3.0 later", claimed.claim, lines))
        (again,) = await store.claim_due("up", now + 60, 1, lease_s=60)
        assert await store.finish(AttemptResult(
            "T1", "up", MessageState.DEFERRED, [Recipient("b@example.com")], 2, now + 120,
            "421 gone", now + 60, "deferred", "421 gone", again.claim))
        record = await store.get("T1")
        assert record is not None
        assert [a["transcript"] for a in record.attempts_log] == [list(lines), []]
        exported = [m async for m in store.export_messages()]
        assert [a.transcript for a in exported[0].attempts_log] == [lines, ()]
        await store.delete_messages(states=[str(s) for s in MessageState])

        async def items() -> AsyncIterator[ExportedMessage]:
            for m in exported:
                yield m

        assert await store.import_messages(items(), merge=False) == (1, 0)
        assert [m async for m in store.export_messages()] == exported
    finally:
        await store.close()
