"""Issue 14.5: `relay queue export` / `import` move a whole queue, and lose nothing."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.cli.commands import main
from relay.config.loading import load_config
from relay.errors import StoreError
from relay.queue.exchange import (
    SENDS_PER_LINE,
    End,
    ExportFormatError,
    ExportReader,
    message_line,
    parse_record,
)
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import (
    AttemptResult,
    ExportedAttempt,
    ExportedMessage,
    MessageState,
    NewMessage,
    Priority,
    Recipient,
    RecipientState,
)
from tests.conftest import StartRelay, message, send_many

S = MessageState
NOW = time.time()
# Times that JSON must carry to the last bit.
ODD = 1764547200.1234567


def _id(name: str) -> str:
    """A queue id in relay's own format (an import refuses any other), named for a test."""
    return name.encode().hex().upper().rjust(22, "0")


def _config(tmp_path: Path, name: str, *, spare: bool = True, spare_group: bool = False,
            webhooks: tuple[str, ...] = ()) -> Path:
    path = tmp_path / f"{name}.yaml"
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    accounts = {"outbox": {"transport": "maildir", "path": str(tmp_path / "box")}}
    if spare:
        accounts["spare"] = {"transport": "maildir", "path": str(tmp_path / "box2")}
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / f"{name}.sqlite3")},
        "accounts": accounts,
        "routing": {"default_account": "outbox", "groups": {
            "spare": {"accounts": ["outbox"], "mode": "failover"}} if spare_group else {}},
        "events": {"webhooks": [{"url": "http://127.0.0.1:9/events", "name": hook,
                                 "secret_file": str(secret)} for hook in webhooks]},
    }))
    return path


def _relay(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _new(mid: str, at: float, *, rcpts: tuple[str, ...] = ("to@example.com",),
         priority: Priority = Priority.NORMAL, account: str = "outbox",
         options: tuple[str, ...] = ()) -> NewMessage:
    return NewMessage(mid, "app@example.com", rcpts, account, priority,
                      message(mid) + bytes(range(256)), at, at, options)


async def _seed(path: Path) -> None:
    """A queue as a server leaves it: every state, a claim, a partial delivery, a move,
    attempts, priorities, mail options, a Deferred-Delivery time, sends, a pause."""
    store = SQLiteStore(path, lock=False, owner="gone-host:1:abc")
    await store.open()
    try:
        for m in (_new(_id("D"), NOW - 50, rcpts=("a@example.com", "b@example.org")),
                  _new(_id("SND"), NOW - 40), _new(_id("SND2"), NOW - 35), _new(_id("H"), NOW - 30),
                  _new(_id("OK"), NOW - 20, priority=Priority.LOW), _new(_id("F"), NOW - 10)):
            await store.enqueue(m)
        claimed = {m.id: m for m in await store.claim_due("outbox", NOW, 10, lease_s=300)}

        def result(mid: str, state: S, rcpts: list[Recipient], outcome: str, reply: str,
                   attempts: int = 1, due: float = NOW,
                   transcript: tuple[str, ...] = ()) -> AttemptResult:
            return AttemptResult(mid, "outbox", state, rcpts, attempts, due,
                                 "" if state is S.DELIVERED else reply, NOW - 1, outcome,
                                 reply, claimed[mid].claim,
                                 transcript or ("C: EHLO relay", f"S: {reply}"))

        await store.finish(result(_id("D"), S.DEFERRED, [
            Recipient("a@example.com", RecipientState.DELIVERED, "250 2.0.0 ok"),
            Recipient("b@example.org")], "partial", "451 4.3.0 busy", due=NOW + 600))
        await store.finish(result(_id("OK"), S.DELIVERED, [
            Recipient("to@example.com", RecipientState.DELIVERED, "250 ok")],
            "delivered", "250 2.0.0 ok"))
        await store.finish(result(_id("F"), S.FAILED, [
            Recipient("to@example.com", RecipientState.FAILED, "550 5.1.1 no")],
            "failed", "550 5.1.1 no", transcript=("> RCPT TO:<to@example.com>",
                                                  "< 550 5.1.1 no")))
        await store.finish(result(_id("H"), S.DEFERRED, [Recipient("to@example.com")],
                                  "deferred", "421 4.7.0 later"))
        await store.update_messages(states=["deferred"], to_state="held", now=NOW,
                                    ids=[_id("H")])
        # SND stays claimed; SND2 was tried once before its claim.
        await store.execute([("UPDATE messages SET attempts=2, last_error='451 x'"
                              " WHERE id=?", (_id("SND2"),))])
        await store.enqueue(_new(_id("Q"), ODD, priority=Priority.HIGH, options=("BODY=8BITMIME",)))
        await store.enqueue(_new(_id("LATER"), NOW - 5))
        await store.execute([("UPDATE messages SET next_attempt_at=? WHERE id=?",
                              (NOW + 7200.5, _id("LATER")))])  # a client's Deferred-Delivery
        await store.move_messages(to_account="spare", states=["queued"], now=NOW, by="t",
                                  ids=[_id("Q")])
        await store.set_paused("spare", True, ODD)
        await store.execute([("INSERT INTO sends (account, at) VALUES (?, ?)",
                              ("outbox", NOW - i * 0.001)) for i in range(2500)])
        # Dedup keys (one past its window: not exported) and webhook events, one claimed.
        await store.execute([("INSERT INTO dedup (key, message_id, expires_at) VALUES"
                              " (?, ?, ?)", (key, _id(mid), at)) for key, mid, at in (
                                 ("app:k1", "Q", NOW + 3600),
                                 ("app:k\u00e9", "D", NOW + 86400 + ODD % 1),
                                 ("app:old", "F", NOW - 1))])
        await store.execute([("INSERT INTO events (id, webhook, type, body, created_at,"
                              " next_attempt_at, attempts, owner, lease_until, last_error)"
                              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row) for row in (
                                 ("e1", "hook", "failed", '{"id": "e1"}', ODD, NOW + 60, 2,
                                  None, None, "HTTP 500"),
                                 ("e1", "audit", "failed", '{"id": "e1"}', ODD, NOW + 9e3,
                                  0, "gone-host:1:abc", NOW + 30, ""),
                                 ("e2", "hook", "delivered", '{"\u2603": 1}', NOW - 2,
                                  NOW - 2, 0, None, None, ""))])
    finally:
        await store.close()


def _dump(path: Path) -> dict[str, Any]:
    """Every row that matters, independent of the store's code."""
    db = sqlite3.connect(path)
    try:
        return {
            "messages": sorted(db.execute(
                "SELECT id, state, account, priority, sender, recipients, size, attempts,"
                " created_at, next_attempt_at, lease_until, owner, last_error, updated_at,"
                " mail_options FROM messages")),
            "order": [r[0] for r in db.execute("SELECT id FROM messages ORDER BY seq")],
            "bodies": sorted(db.execute("SELECT id, data FROM bodies")),
            "attempts": sorted(db.execute("SELECT * FROM attempts")),
            "sends": sorted(db.execute("SELECT account, at FROM sends")),
            "paused": sorted(db.execute("SELECT * FROM meta WHERE key LIKE 'paused:%'")),
            "counts": sorted(db.execute("SELECT * FROM counts WHERE n > 0")),
            "dedup": sorted(db.execute("SELECT * FROM dedup")),
            "events": sorted(db.execute(
                "SELECT id, webhook, type, body, created_at, next_attempt_at, attempts,"
                " owner, lease_until, last_error FROM events")),
        }
    finally:
        db.close()


def _released(before: dict[str, Any]) -> dict[str, Any]:
    """What an import holds of ``before``: its claims released, due as they were."""
    rows = []
    for row in before["messages"]:
        if row[1] == "sending":
            state = "deferred" if row[7] else "queued"
            row = (row[0], state, *row[2:10], None, None, *row[12:])
        rows.append(row)
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[(row[2], row[1])] = counts.get((row[2], row[1]), 0) + 1
    # A dedup key past its window stays behind; a claimed event comes out due at once.
    events = [row if row[7] is None else (*row[:5], "now", row[6], None, None, row[9])
              for row in before["events"]]
    return {**before, "messages": sorted(rows),
            "counts": sorted((a, s, n) for (a, s), n in counts.items()),
            "dedup": [row for row in before["dedup"] if row[2] > time.time()],
            "events": sorted(events, key=str)}


def _due_now(after: dict[str, Any], since: float) -> dict[str, Any]:
    """``after`` with the due time of the event that was claimed (due later than it was
    exported) as "now", once checked to lie between ``since`` and now."""
    events = []
    for row in after["events"]:
        if row[:2] == ("e1", "audit"):
            assert since <= row[5] <= time.time()
            row = (*row[:5], "now", *row[6:])
        events.append(row)
    return {**after, "events": sorted(events, key=str)}


async def test_round_trip_sqlite_file_sqlite_loses_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = _config(tmp_path, "src"), _config(tmp_path, "dst", webhooks=("hook",))
    await _seed(tmp_path / "src.sqlite3")
    before = _dump(tmp_path / "src.sqlite3")
    assert {r[1] for r in before["messages"]} == {str(s) for s in S}  # every state
    export = tmp_path / "queue.jsonl"
    started = time.time()
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "export", str(export),
                                             "-c", str(src))
    assert (code, err) == (0, ""), err
    sends = len(before["sends"])  # 2500, and one for each attempt
    assert out == (f"exported 8 messages (3 queued, 2 deferred, 1 held, 1 delivered, 1 failed),"
                   f" {sends} send times, 1 paused accounts, 2 dedup keys, 3 webhook events"
                   f" to {export}\n")
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(export),
                                             "-c", str(dst))
    assert (code, err) == (0, "note: webhook events wait for webhooks this config does not"
                              " have: audit (a relay gives them up unless they are added)\n")
    assert out == (f"imported 8 messages, {sends} send times, 1 paused accounts, 2 dedup keys,"
                   f" 3 webhook events from {export}\n")
    after = _dump(tmp_path / "dst.sqlite3")
    assert _due_now(after, started) == _released(before)
    assert len(after["dedup"]) == 2 and len(after["events"]) == 3
    assert any(a.count("\n") for a in (r[5] for r in after["attempts"]))  # transcripts too
    assert before["sends"] == after["sends"] and sends == 2504
    # And back again: a second round trip changes nothing more.
    again = tmp_path / "again.jsonl"
    assert await asyncio.to_thread(main, ["queue", "export", str(again), "-c", str(dst)]) == 0
    first, second = export.read_text().splitlines(), again.read_text().splitlines()
    assert first[1:] == second[1:]  # all but the header (its time)


async def test_round_trip_sqlite_file_postgresql_file_loses_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    """Moving a single-host install to PostgreSQL (issue 14) through the CLI: the
    PostgreSQL queue's export is line for line the SQLite queue's (but the header)."""
    src = _config(tmp_path, "src")
    dst = tmp_path / "pg.yaml"
    dst.write_text(src.read_text().replace(
        f"path: {tmp_path / 'src.sqlite3'}", f"url: {pg_url}"))
    assert load_config(dst).queue.url == pg_url
    await _seed(tmp_path / "src.sqlite3")
    export, again = tmp_path / "queue.jsonl", tmp_path / "again.jsonl"
    code, _, err = await asyncio.to_thread(_relay, capsys, "queue", "export", str(export),
                                           "-c", str(src))
    assert (code, err) == (0, ""), err
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(export),
                                             "-c", str(dst))
    # (the seed's events are for webhooks this test's config does not have)
    assert code == 0 and err.startswith("note: webhook events wait for webhooks"), err
    assert out.startswith("imported 8 messages, 2504 send times, 1 paused accounts"), out
    code, _, err = await asyncio.to_thread(_relay, capsys, "queue", "export", str(again),
                                           "-c", str(dst))
    assert (code, err) == (0, ""), err
    first, second = export.read_text().splitlines(), again.read_text().splitlines()
    assert '"postgres"' in second[0]
    assert first[1:] == second[1:]
    assert "C: EHLO relay" in export.read_text()  # transcripts went along


async def test_export_reads_one_snapshot_while_the_queue_changes(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = SQLiteStore(path, lock=False)
    await store.open()
    other = SQLiteStore(path, lock=False)
    await other.open()
    try:
        for i in range(5):
            await store.enqueue(_new(f"M{i}", NOW))
        seen = []
        async for m in store.export_messages(page=1):
            seen.append(m.id)
            if len(seen) == 1:  # meanwhile another process deletes, adds, delivers
                await other.delete_messages(states=["queued"], ids=["M3", "M4"])
                await other.enqueue(_new("NEW", NOW))
                assert {m.id for m in await other.list_messages()} == {"M0", "M1", "M2",
                                                                        "NEW"}
        assert seen == ["M0", "M1", "M2", "M3", "M4"]
    finally:
        await other.close()
        await store.close()


async def test_export_of_a_live_queue_is_complete_and_consistent(
        tmp_path: Path, start_relay: StartRelay, capsys: pytest.CaptureFixture[str]) -> None:
    """While clients keep sending and the relay delivers, an export holds every message
    accepted before it began, each with its body unless delivered, and its attempts."""
    config = _config(tmp_path, "live")
    app = await start_relay(load_config(config))
    before = await send_many(app.smtp_port, [message(f"before {i}") for i in range(20)])
    accepted = {reply.split()[-1] for code, reply in before if code == 250}
    sending = asyncio.create_task(
        send_many(app.smtp_port, [message(f"during {i}") for i in range(150)], sessions=4))
    export = tmp_path / "live.jsonl"
    code = await asyncio.to_thread(main, ["queue", "export", str(export), "-c", str(config)])
    assert code == 0, capsys.readouterr().err
    assert all(c == 250 for c, _ in await sending)
    reader = ExportReader(export.read_text().splitlines())
    list(reader.paused()), list(reader.sends())
    messages = list(reader.messages())
    reader.finish()
    assert accepted <= {m.id for m in messages}
    for m in messages:
        assert m.state is not S.SENDING
        assert (m.body is None) == (m.state is S.DELIVERED), m
        assert m.body is None or m.size == len(m.body)
        # Attempts from the same snapshot as their message: a delivered one has its record.
        assert [a.outcome for a in m.attempts_log] == (
            ["delivered"] if m.state is S.DELIVERED else []), m


async def test_import_into_a_queue_with_mail_needs_merge_and_skips_known_ids(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _config(tmp_path, "src")
    dst = _config(tmp_path, "dst", spare=False, webhooks=("hook", "audit"))
    await _seed(tmp_path / "src.sqlite3")
    export = tmp_path / "queue.jsonl"
    assert await asyncio.to_thread(main, ["queue", "export", str(export), "-c", str(src)]) == 0
    store = SQLiteStore(tmp_path / "dst.sqlite3", lock=False)
    await store.open()
    try:
        await store.enqueue(_new(_id("D"), NOW))  # the same id as one in the file
        await store.enqueue(_new(_id("MINE"), NOW))
        await store.execute([("INSERT INTO dedup (key, message_id, expires_at) VALUES"
                              " ('app:k1', ?, ?)", (_id("MINE"), NOW + 60))])
    finally:
        await store.close()
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(export),
                                             "-c", str(dst))
    assert (code, out) == (1, "")
    assert err == ("relay: the queue already holds 2 messages: import into an empty queue,"
                   " or add --merge (ids already queued are skipped)\n")
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(export),
                                             "--merge", "-c", str(dst))
    assert out == (f"imported 7 messages (skipped 1 already queued), 2504 send times,"
                   f" 1 paused accounts, 1 dedup keys, 3 webhook events from {export}\n")
    assert (code, err) == (0, "note: mail waits for accounts this config does not have:"
                              " spare (add them, or `relay queue move` it)\n")
    dump = _dump(tmp_path / "dst.sqlite3")
    mine = [r for r in dump["messages"] if r[0] == _id("D")]
    assert mine[0][1] == "queued" and len(dump["messages"]) == 9  # D stayed as it was
    # The queue's own dedup key stays as it was too.
    assert (("app:k1", _id("MINE"), NOW + 60) in dump["dedup"]) and len(dump["dedup"]) == 2


async def test_import_notes_no_missing_account_for_mail_to_a_group_the_config_has(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Mail queued for "spare" waits for nothing where "spare" is a group (X-Account and
    rules may name a group; its mail is queued under the group's name)."""
    src = _config(tmp_path, "src")
    dst = _config(tmp_path, "dst", spare=False, spare_group=True, webhooks=("hook", "audit"))
    await _seed(tmp_path / "src.sqlite3")
    export = tmp_path / "queue.jsonl"
    assert await asyncio.to_thread(main, ["queue", "export", str(export), "-c", str(src)]) == 0
    code, out, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(export),
                                             "-c", str(dst))
    assert (code, err) == (0, "") and out.startswith("imported 8 messages")


async def test_the_store_refuses_to_import_into_a_queue_with_mail_unless_merging(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "q.sqlite3", lock=False)
    await store.open()
    try:
        await store.enqueue(_new("A", NOW))

        async def items() -> Any:
            yield ExportedMessage("B", S.QUEUED, "outbox", Priority.NORMAL, "a@b", (
                Recipient("c@d"),), 1, 0, NOW, NOW, "", NOW, (), (), b"x")

        with pytest.raises(StoreError, match="already holds messages"):
            await store.import_messages(items(), merge=False)
        assert await store.import_messages(items(), merge=True) == (1, 0)
        assert await store.import_messages(items(), merge=True) == (0, 1)
    finally:
        await store.close()


async def test_a_truncated_or_foreign_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = _config(tmp_path, "src"), _config(tmp_path, "dst")
    await _seed(tmp_path / "src.sqlite3")
    export = tmp_path / "queue.jsonl"
    assert await asyncio.to_thread(main, ["queue", "export", str(export), "-c", str(src)]) == 0
    lines = export.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:-3]))
    code, _, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(cut),
                                           "-c", str(dst))
    assert (code, err) == (1, f"relay: {cut} ends without its end line: the export is"
                              " incomplete (nothing imported)\n")
    assert not (tmp_path / "dst.sqlite3").exists()
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"hello": 1}\n{"type":"end","messages":0,"sends":0,"paused":0}\n')
    code, _, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(foreign),
                                           "-c", str(dst))
    assert (code, err) == (1, f"relay: {foreign}: line 1: not a relay queue export (no"
                              ' "format": "relay-queue"); nothing imported\n')
    newer = tmp_path / "newer.jsonl"
    newer.write_text(lines[0].replace('"version":2', '"version":9') + "".join(lines[1:]))
    code, _, err = await asyncio.to_thread(_relay, capsys, "queue", "import", str(newer),
                                           "-c", str(dst))
    assert code == 1 and "export format 9 is newer than this relay's (2)" in err


def test_a_truncated_stream_says_what_stays(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From standard input the end is known only at the end: the windows committed
    before stay, and the message says how to finish."""
    src = _config(tmp_path, "src")
    dst = _config(tmp_path, "dst", webhooks=("hook", "audit"))
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    code, exported, err = _relay(capsys, "queue", "export", "-", "-c", str(src))
    assert code == 0 and err.startswith("exported 8 messages")
    lines = exported.splitlines(keepends=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(lines[:-1])))
    code, _, err = _relay(capsys, "queue", "import", "-", "-c", str(dst))
    assert code == 1
    assert err.startswith("relay: standard input: line ")
    assert "ends without its end line" in err and "again with --merge" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(lines)))
    code, out, err = _relay(capsys, "queue", "import", "-", "--merge", "-c", str(dst))
    assert (code, err) == (0, "")
    assert out.startswith("imported 0 messages (skipped 8 already queued)")


def test_export_never_overwrites_and_leaves_no_partial_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _config(tmp_path, "src")
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    export = tmp_path / "queue.jsonl"
    export.write_text("keep")
    code, _, err = _relay(capsys, "queue", "export", str(export), "-c", str(src))
    assert (code, err) == (1, f"relay: {export} already exists; give a new name (an export"
                              " never overwrites)\n")
    assert export.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


# -- the format (pure) -----------------------------------------------------------------
def test_a_message_line_reads_back_the_same() -> None:
    m = ExportedMessage(
        "ID", S.DEFERRED, "acc", Priority.LOW, "s@x", (
            Recipient("a@x", RecipientState.DELIVERED, "250 ok"), Recipient("b\u00e9@x")),
        3, 2, ODD, ODD + 1e-6, "451 \u2603", 0.1 + 0.2, ("SMTPUTF8", "BODY=8BITMIME"),
        (ExportedAttempt(ODD, "acc", "deferred", "451\r\nx"),), b"\x00\xff\r\n")
    line = message_line(m)
    assert line.endswith("\n") and line.isascii() and "\n" not in line[:-1]
    assert parse_record(line, 2) == m
    assert parse_record(message_line(replace(m, body=None)), 2) == replace(m, body=None)


_floats = st.floats(allow_nan=False, allow_infinity=False)
_messages = st.builds(
    ExportedMessage, id=st.text(min_size=1), state=st.sampled_from(list(S)),
    account=st.text(), priority=st.sampled_from(list(Priority)), sender=st.text(),
    recipients=st.lists(st.builds(Recipient, st.text(), st.sampled_from(list(RecipientState)),
                                  st.text()), max_size=3).map(tuple),
    size=st.integers(0, 2**40), attempts=st.integers(0, 1000), created_at=_floats,
    next_attempt_at=_floats, last_error=st.text(), updated_at=_floats,
    mail_options=st.lists(st.text(), max_size=3).map(tuple),
    attempts_log=st.lists(st.builds(ExportedAttempt, _floats, st.text(), st.text(),
                                    st.text()), max_size=3).map(tuple),
    body=st.none() | st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(_messages)
def test_any_message_reads_back_the_same(m: ExportedMessage) -> None:
    """Whatever text, bytes and times a message holds, its line is one ASCII line that
    reads back equal (floats to the last bit)."""
    line = message_line(m)
    assert line.isascii() and line.count("\n") == 1
    assert parse_record(line, 2) == m


def test_the_reader_checks_order_types_and_counts() -> None:
    head = json.dumps({"format": "relay-queue", "version": 1, "schema": 4, "store": "x",
                       "exported_at": 1.0, "relay": "0"})
    sends = json.dumps({"type": "sends", "account": "a", "at": [1.0, 2]})
    paused = json.dumps({"type": "paused", "account": "a", "at": 1.0})
    end = json.dumps({"type": "end", "messages": 0, "sends": 2, "paused": 1})
    reader = ExportReader([head, paused, "", sends, end])
    assert [p.account for p in reader.paused()] == ["a"]
    assert list(reader.sends()) == [("a", 1.0), ("a", 2.0)]
    assert list(reader.messages()) == []
    assert reader.finish() == End(0, 2, 1)
    with pytest.raises(ExportFormatError, match="line 3: a Paused record out of order"):
        reader = ExportReader([head, sends, paused, end])
        list(reader.paused()), list(reader.sends()), list(reader.paused())
    with pytest.raises(ExportFormatError, match="the end line counts 0 messages, 2 sends"):
        reader = ExportReader([head, end])
        reader.finish()
    with pytest.raises(ExportFormatError, match="more after the end line"):
        reader = ExportReader([head, paused, sends, end, paused])
        list(reader.paused()), list(reader.sends())
        reader.finish()
    for bad, why in [('{"type": "message", "id": "x"}', "'recipients' is missing or not a list"),
                     ('{"type": "message", "id": "x", "recipients": [], "attempts_log": [],'
                      ' "state": "lost"}', "message 'x': 'lost' is not a valid MessageState"),
                     ('{"type": "sends", "account": "a", "at": ["1"]}', "not a number"),
                     ("[1]", "not a JSON object"), ("{", "not JSON"),
                     ('{"type": "what"}', "unknown record type 'what'")]:
        with pytest.raises(ExportFormatError, match=why):
            parse_record(bad, 5)
    assert len(json.loads(sends)["at"]) < SENDS_PER_LINE


# -- what an import refuses (a3 #10) ------------------------------------------------------
_BAD_MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"state": "queued", "body": None}, "'body' is null for a queued message"),
    ({"recipients": []}, "'recipients' is empty"),
    ({"attempts": -1}, "'attempts' is -1: negative"),
    ({"id": "../../etc\npasswd"}, "'id' is not a relay queue id"),
    ({"id": "0000000000000000000A/B"}, "'id' is not a relay queue id"),
    ({"id": "0000000000000000000a.."}, "'id' is not a relay queue id"),
    ({"created_at": 1e308}, "'created_at' is 1e+308: not a time between 1970 and 9999"),
    ({"next_attempt_at": 1e308}, "'next_attempt_at' is 1e+308: not a time"),
    ({"updated_at": -1.0}, "'updated_at' is -1.0: not a time"),
    ({"next_attempt_at": float("nan")}, "'next_attempt_at' is nan: not a time"),
    ({"created_at": 253402300800.0}, "'created_at' is 253402300800.0: not a time"),
    ({"created_at": NOW + 86400}, "'created_at' is"),
    ({"sender": "a@b.c>\r\nRCPT TO:<evil@x.com"}, "'sender' holds a CR, LF or NUL"),
    ({"recipients": [["r@x.com>\r\nDATA", "pending", ""]]}, "'recipients' holds a CR, LF"),
    ({"mail_options": ["SIZE=1\r\nRCPT TO:<evil@x.com>"]}, "'mail_options' holds a CR, LF"),
]


def _mutated(lines: list[str], index: int, change: dict[str, Any]) -> str:
    record = json.loads(lines[index])
    record.update(change)
    return "".join([*lines[:index], json.dumps(record) + "\n", *lines[index + 1:]])


@pytest.mark.parametrize(("change", "why"), _BAD_MESSAGES,
                         ids=[why[:30] + str(i) for i, (_, why) in enumerate(_BAD_MESSAGES)])
def test_a_record_relay_never_writes_refuses_the_whole_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], why: str
) -> None:
    """The LAST message of the file is bad: nothing of the file is committed (it is checked
    whole first), and the error names the line and the field."""
    src, dst = _config(tmp_path, "src"), _config(tmp_path, "dst")
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    export = tmp_path / "queue.jsonl"
    assert main(["queue", "export", str(export), "-c", str(src)]) == 0
    lines = export.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if '"type":"message"' in line)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_mutated(lines, last, change))
    code, out, err = _relay(capsys, "queue", "import", str(bad), "-c", str(dst))
    assert (code, out) == (1, "")
    assert err.startswith(f"relay: {bad}: line {last + 1}: message ") and why in err, err
    assert err.endswith("; nothing imported\n")
    assert not (tmp_path / "dst.sqlite3").exists()


@pytest.mark.parametrize(("record", "why"), [
    ({"type": "sends", "account": "outbox", "at": [NOW + 86400]}, "'at' is"),
    ({"type": "paused", "account": "outbox", "at": float("inf")}, "'at' is inf"),
    ({"type": "dedup", "key": "k", "message_id": "x/../y", "expires_at": NOW},
     "dedup: 'message_id' is not a relay queue id"),
    ({"type": "event", "id": "e", "webhook": "h", "event": "failed", "body": "{}",
      "created_at": NOW, "next_attempt_at": 1e308, "attempts": 0, "last_error": ""},
     "event 'e': 'next_attempt_at' is 1e+308"),
    ({"type": "end", "messages": 8, "sends": 0, "paused": 0, "dedup": 0, "events": 0},
     "the end line counts 8 messages, 0 sends"),
])
def test_a_bad_line_after_the_messages_leaves_the_queue_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict[str, Any], why: str
) -> None:
    """Before, the messages were committed by the time a later line was found bad."""
    src, dst = _config(tmp_path, "src"), _config(tmp_path, "dst")
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    export = tmp_path / "queue.jsonl"
    assert main(["queue", "export", str(export), "-c", str(src)]) == 0
    lines = export.read_text().splitlines(keepends=True)
    end = json.loads(lines[-1])
    kind = record["type"]
    at = {"sends": 1, "paused": 1}.get(kind, len(lines) - 1)
    if kind == "end":
        lines[-1] = json.dumps(record) + "\n"
    else:
        lines.insert(at, json.dumps(record) + "\n")
        key = {"sends": "sends", "paused": "paused", "dedup": "dedup", "event": "events"}[kind]
        end[key] += len(record["at"]) if kind == "sends" else 1
        lines[-1] = json.dumps(end) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    code, _, err = _relay(capsys, "queue", "import", str(bad), "-c", str(dst))
    assert code == 1 and why in err and err.endswith("; nothing imported\n"), err
    assert not (tmp_path / "dst.sqlite3").exists()


def test_a_version_1_file_still_imports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = _config(tmp_path, "src"), _config(tmp_path, "dst")
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    export = tmp_path / "queue.jsonl"
    assert main(["queue", "export", str(export), "-c", str(src)]) == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    head, end = {**lines[0], "version": 1}, lines[-1]
    body = [r for r in lines[1:-1] if r.get("type") not in ("dedup", "event")]
    old = tmp_path / "v1.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in [
        head, *body, {k: end[k] for k in ("type", "messages", "sends", "paused")}]))
    code, out, err = _relay(capsys, "queue", "import", str(old), "-c", str(dst))
    assert (code, err) == (0, "")
    assert out.startswith("imported 8 messages") and "0 dedup keys, 0 webhook events" in out


# -- one line, not a traceback (a3 #9) -----------------------------------------------------
def test_export_to_a_full_disk_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _config(tmp_path, "src")
    asyncio.run(_seed(tmp_path / "src.sqlite3"))
    with open("/dev/full", "w", encoding="ascii") as full:
        monkeypatch.setattr(sys, "stdout", full)
        code = main(["queue", "export", "-", "-c", str(src)])
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert (code, err) == (1, "relay: cannot write standard output: No space left on device;"
                              " the export is incomplete\n")


def test_a_time_no_date_can_show_is_shown_as_such(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A queue an older relay's import left with next_attempt_at 1e308."""
    config = _config(tmp_path, "q")

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "q.sqlite3", lock=False)
        await store.open()
        try:
            await store.enqueue(_new(_id("FAR"), NOW))
            await store.execute([("UPDATE messages SET next_attempt_at=1e308, state='deferred',"
                                  " attempts=1", ())])
        finally:
            await store.close()

    asyncio.run(seed())
    code, out, err = _relay(capsys, "queue", "list", "--jsonl", "-c", str(config))
    assert (code, err) == (0, "") and json.loads(out)["next_attempt_at"] == "out of range (1e+308)"
    code, out, err = _relay(capsys, "queue", "show", _id("FAR"), "-c", str(config))
    assert (code, err) == (0, "") and "out of range (1e+308)" in out
    code, out, err = _relay(capsys, "queue", "show", "--json", _id("FAR"), "-c", str(config))
    assert (code, err) == (0, "") and "out of range (1e+308)" in out
