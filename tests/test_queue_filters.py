"""Issue 18: `relay queue` at scale: filters, streamed listings, bulk actions with a
safety net, the message's bytes, why it waits, summary by age, pipelines.

Commands run through relay.cli.main on a real queue file (the Relay fixture of
test_queue_cli), or as `python -m relay` where a pipe, a terminal or raw bytes matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.cli.commands import build_parser
from relay.delivery.health import AccountHealth, HealthReport, encode
from relay.queue.filters import MessageFilter, SortKey
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import (
    AttemptResult,
    MessageState,
    NewMessage,
    Priority,
    Recipient,
    RecipientState,
)
from tests.conftest import message, queue_section
from tests.test_queue_cli import Relay, store_of, write_config

S = MessageState
ROOT = Path(__file__).resolve().parent.parent
NOW = time.time()


@pytest.fixture(autouse=True)
def _now() -> None:
    """Each test's NOW is its own start: ages and rate windows are relative to it."""
    global NOW
    NOW = time.time()


@pytest.fixture
def relay(tmp_path: Path, capsys: pytest.CaptureFixture[str], store_kind: str,
          request: pytest.FixtureRequest) -> Relay:
    """A queue with a maildir account and no server, on each store."""
    return Relay(write_config(tmp_path, {"outbox": {"transport": "maildir",
                                                     "path": str(tmp_path / "box")}},
                              queue=queue_section(store_kind, tmp_path, request)), capsys)


async def add(queue: Path | str, mid: str, *, sender: str = "app@example.com",
              rcpts: tuple[str, ...] = ("to@example.com",), account: str = "outbox",
              age_s: float = 0.0, state: MessageState = S.QUEUED, attempts: int = 0,
              error: str = "", body: bytes | None = None, not_before: float | None = None,
              ) -> None:
    """One message as the server would leave it: accepted ``age_s`` ago, then tried
    ``attempts`` times (the last with ``error``) and left in ``state``."""
    store = store_of(queue)
    await store.open()
    created = NOW - age_s
    try:
        await store.enqueue(NewMessage(
            id=mid, sender=sender, recipients=rcpts, account=account,
            priority=Priority.NORMAL, body=body if body is not None else message(mid),
            created_at=created, not_before=not_before or created))
        if attempts:
            final = {S.DELIVERED: RecipientState.DELIVERED, S.FAILED: RecipientState.FAILED}
            await store.finish(AttemptResult(
                id=mid, account=account, state=state,
                recipients=[Recipient(r, final.get(state, RecipientState.PENDING)) for r in rcpts],
                attempts=attempts,
                next_attempt_at=NOW + 3600 if state is S.DEFERRED else NOW,
                last_error=error, at=NOW, outcome=str(state), reply=error or "250 ok"))
        elif state is not S.QUEUED:
            await store.update_messages(states=["queued"], to_state=str(state), ids=[mid],
                                        now=created)
    finally:
        await store.close()


async def fill(queue: Path | str, n: int, *, account: str = "outbox") -> None:
    """``n`` queued messages written in one statement (a big queue in a second)."""
    store = store_of(queue)
    await store.open()
    try:
        if isinstance(queue, str):  # PostgreSQL
            await store.execute([(
                "INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
                " attempts, created_at, next_attempt_at, last_error, updated_at)"
                " SELECT format('G%%s', lpad(k::text, 19, '0')), 'queued', %s, 3,"
                " format('app%%s@example.com', k %% 10),"
                " jsonb_build_array(jsonb_build_array(format('user%%s@example.com', k),"
                " 'pending', '')), 100, k %% 4, %s + k, %s + k, '', %s + k"
                " FROM generate_series(1, %s) AS k", (account, NOW - n, NOW - n, NOW - n, n)),
                ("INSERT INTO bodies (id, data) SELECT id, 'Subject: g' FROM messages"
                 " WHERE id LIKE 'G%%'", ()),
            ])
            return
        await store.execute([(
            "WITH RECURSIVE i(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM i WHERE k < ?)"
            " INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
            " attempts, created_at, next_attempt_at, last_error, updated_at)"
            " SELECT printf('G%019d', k), 'queued', ?, 3, printf('app%d@example.com', k % 10),"
            " printf('[[\"user%d@example.com\", \"pending\", \"\"]]', k), 100, k % 4, ? + k,"
            " ? + k, '', ? + k FROM i", (n, account, NOW - n, NOW - n, NOW - n)),
            ("INSERT INTO bodies (id, data) SELECT id, 'Subject: g' FROM messages"
             " WHERE id LIKE 'G%'", ()),
        ])
    finally:
        await store.close()


async def mixed(relay: Relay) -> None:
    await add(relay.queue, "A", sender="billing@shop.example", rcpts=("ann@gmail.com",))
    await add(relay.queue, "B", sender="news@shop.example", age_s=3 * 3600,
              rcpts=("bob@yahoo.com", "carl@gmail.com"), state=S.DEFERRED, attempts=3,
              error="421 4.7.0 Try again later")
    await add(relay.queue, "C", sender="alerts@ops.example", age_s=600,
              rcpts=("dan_x@corp.example",), state=S.DEFERRED, attempts=1,
              error="451 4.3.0 greylisted")
    await add(relay.queue, "D", sender="billing@shop.example", age_s=2 * 86400,
              rcpts=("eve@gmail.com",), state=S.FAILED, attempts=1,
              error="550 5.1.1 no such user")


async def ids(relay: Relay, *argv: str) -> list[str]:
    return [m["id"] for m in await relay.json("queue", "list", *argv)]


# -- filters ------------------------------------------------------------------------------
async def test_list_filters_narrow_together(relay: Relay) -> None:
    await mixed(relay)
    assert await ids(relay, "--sender", "billing") == ["A", "D"]
    assert await ids(relay, "--sender", "BILLING@*") == ["A", "D"]  # glob, any case
    assert await ids(relay, "--sender", "billing@*", "--state", "failed") == ["D"]
    assert await ids(relay, "--rcpt", "*@gmail.com") == ["A", "B", "D"]  # any recipient
    assert await ids(relay, "--rcpt", "gmail") == ["A", "B", "D"]
    assert await ids(relay, "--rcpt", "*@gmail") == []  # a glob matches the whole address
    assert await ids(relay, "--rcpt", "d_n") == []  # _ is itself, not LIKE's any-character
    assert await ids(relay, "--rcpt", "n_x@") == ["C"]
    assert await ids(relay, "--since", "1h") == ["A", "C"]
    assert await ids(relay, "--until", "1h") == ["B", "D"]
    assert await ids(relay, "--since", "1d", "--until", "5m") == ["B", "C"]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 86400))
    assert await ids(relay, "--until", when) == ["D"]
    assert await ids(relay, "--min-attempts", "2") == ["B"]
    assert await ids(relay, "--error", "4.7.0") == ["B"]
    assert await ids(relay, "--error", "GREYLIST") == ["C"]
    assert await ids(relay, "--state", "deferred", "--state", "failed") == ["B", "C", "D"]
    assert await ids(relay, "--sort", "attempts") == ["B", "C", "D", "A"]
    assert await ids(relay, "--sort", "attempts", "--limit", "2") == ["B", "C"]
    text = await relay("queue", "list", "--sender", "nobody")
    assert (text.code, text.out) == (0, "no message matches\n")
    bad = await relay("queue", "list", "--since", "last tuesday")
    assert bad.code == 2 and bad.err.startswith("relay: queue list: --since must be")
    for limit in ("0", "-1"):  # not "queue is empty" on a full queue
        bad = await relay("queue", "list", "--limit", limit)
        assert (bad.code, bad.out) == (2, "")
        assert bad.err == ("relay: queue list: --limit must be at least 1"
                           " (leave it out for no limit)\n")


async def test_sql_filter_agrees_with_the_reference_meaning(relay: Relay) -> None:
    """What the SQLite store selects is what MessageFilter.matches says, pattern by
    pattern: the contract a second store (PostgreSQL) will be held to."""
    await mixed(relay)
    await add(relay.queue, "P", sender="50%_off@deals.example", rcpts=("x@deals.example",))
    store = store_of(relay.queue)
    await store.open()
    try:
        every = [m async for m in store.iter_messages(MessageFilter())]
        filters = [MessageFilter(sender=p) for p in
                   ("50%", "50%_", "%", "_", "*", "b?lling@*", "*.example", "SHOP")]
        filters += [MessageFilter(rcpt=p) for p in ("*@gmail.com", "@", "n_x", "?@*", "X@")]
        filters += [MessageFilter(error=e) for e in ("4.", "%", "no such", "*")]
        filters += [MessageFilter(min_attempts=n) for n in (0, 1, 3, 4)]
        filters += [MessageFilter(since=NOW - 700, until=NOW + 1),
                    MessageFilter(states=frozenset({S.DEFERRED}), account="outbox")]
        for f in filters:
            got = [m.id async for m in store.iter_messages(f)]
            assert got == [m.id for m in every if f.matches(m)], f
            assert await store.count_messages(f) == len(got)
        by_next = [m.id async for m in store.iter_messages(
            MessageFilter(), sort=SortKey.NEXT_ATTEMPT)]
        assert by_next == [m.id for m in sorted(every, key=lambda m: m.next_attempt_at)]
    finally:
        await store.close()


async def test_json_is_one_document_and_jsonl_one_object_a_line(relay: Relay) -> None:
    await mixed(relay)
    whole = json.loads((await relay("queue", "list", "--json")).out)
    lines = (await relay("queue", "list", "--jsonl")).out.splitlines()
    assert [json.loads(line) for line in lines] == whole and len(whole) == 4
    assert json.loads((await relay("queue", "list", "--json", "--sender", "no1")).out) == []
    assert (await relay("queue", "list", "--jsonl", "--sender", "no1")).out == ""


async def test_control_characters_in_listed_fields_stay_escaped(relay: Relay) -> None:
    await add(relay.queue, "E", state=S.DEFERRED, attempts=1,
              error="451 \x1b[2Jwiped\r\nFAKE 250 ok")
    shown = await relay("queue", "list", "--error", "wiped")
    assert "\x1b" not in shown.out and "\\u001b[2Jwiped\\r\\nFAKE" in shown.out


# -- bulk actions -------------------------------------------------------------------------
async def test_bulk_actions_take_the_filters_and_count_what_changed(relay: Relay) -> None:
    await mixed(relay)
    dry = await relay("queue", "delete", "--rcpt", "*@gmail.com", "--dry-run")
    assert (dry.code, dry.out) == (0, "would delete 3 message(s)\n")
    assert await ids(relay) == ["A", "B", "C", "D"]

    held = await relay("queue", "hold", "--rcpt", "*@gmail.com")  # queued/deferred only
    assert (held.code, held.out) == (0, "held 2 message(s)\n")
    assert (await relay.states())["A"] == (await relay.states())["B"] == "held"
    released = await relay("queue", "release", "--all")
    assert (released.code, released.out) == (0, "released 2 message(s), due now\n")

    retried = await relay("queue", "retry", "--error", "4.7.0")  # deferred by default
    assert (retried.code, retried.err) == (1, "relay: no deferred messages to retry\n")
    retried = await relay("queue", "retry", "--error", "greylist", "--rcpt", "*@corp.example")
    assert (retried.code, retried.out) == (0, "1 deferred message(s) queued, due now\n")
    assert (await relay.states())["C"] == "queued"

    deleted = await relay("queue", "delete", "--state", "queued", "--since", "1h")
    assert (deleted.code, deleted.out) == (0, "deleted 2 queued message(s)\n")
    assert await ids(relay) == ["B", "D"]
    none = await relay("queue", "hold", "--sender", "nobody")
    assert (none.code, none.err) == (1, "relay: no messages to hold\n")
    both = await relay("queue", "hold", "A", "--sender", "x")
    assert both.code == 2 and "give message IDs, or --all or filters" in both.err
    assert (await relay("queue", "delete")).code == 2  # nothing chosen is not "everything"


async def test_limit_and_sort_choose_which_messages_a_bulk_action_takes(relay: Relay) -> None:
    await fill(relay.queue, 12)  # G..01 oldest; attempts k % 4
    oldest = await relay("queue", "hold", "--all", "--limit", "3", "--yes")
    assert (oldest.code, oldest.out) == (0, "held 3 message(s)\n")
    assert await ids(relay, "--state", "held") == [f"G{k:019d}" for k in (1, 2, 3)]
    tried = await relay("queue", "delete", "--state", "queued", "--sort", "attempts",
                        "--limit", "2", "--dry-run")
    assert tried.out == "would delete 2 queued message(s)\n"
    tried = await relay("queue", "delete", "--state", "queued", "--sort", "attempts",
                        "--limit", "2")
    assert tried.out == "deleted 2 queued message(s)\n"
    assert [f"G{k:019d}" for k in (7, 11)] == [  # the most attempts (3), not yet held
        i for i in (f"G{k:019d}" for k in range(1, 13)) if i not in await ids(relay)]
    assert (await relay("queue", "hold", "--all", "--limit", "-1")).code == 2
    assert (await relay("queue", "hold", "--all", "--limit", "0")).code == 2


async def test_the_count_is_of_what_the_action_can_change(relay: Relay) -> None:
    """A failed message whose body is gone cannot be retried: not counted either."""
    await add(relay.queue, "F1", state=S.FAILED, attempts=1, error="550 5.7.1 refused")
    await add(relay.queue, "F2", state=S.FAILED, attempts=1, error="550 5.7.1 refused")
    store = store_of(relay.queue)
    await store.open()
    try:
        await store.execute([("DELETE FROM bodies WHERE id='F2'", ())])
    finally:
        await store.close()
    dry = await relay("queue", "retry", "--state", "failed", "--error", "5.7.1", "--dry-run")
    assert (dry.code, dry.out) == (0, "would retry 1 failed message(s)\n")
    done = await relay("queue", "retry", "--state", "failed", "--error", "5.7.1")
    assert (done.code, done.out) == (0, "1 failed message(s) queued, due now\n")


async def test_bulk_action_beside_a_running_server(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The server's store holds the lock and writes; the CLI's bulk change queues behind
    its writer and the server sees it."""
    path = write_config(tmp_path, {"outbox": {"transport": "maildir",
                                              "path": str(tmp_path / "box")}})
    relay = Relay(path, capsys)
    server = SQLiteStore(relay.queue)  # locked, as `relay serve` holds it
    await server.open()
    try:
        for i in range(20):
            await server.enqueue(NewMessage(
                id=f"M{i:02d}", sender="app@example.com", recipients=(f"u{i}@x.example",),
                account="outbox", priority=Priority.NORMAL, body=message(str(i)),
                created_at=NOW, not_before=NOW + 3600))
        await server.changed_elsewhere()
        held = await relay("queue", "hold", "--rcpt", "u1*", "--yes")
        assert (held.code, held.out) == (0, "held 11 message(s)\n")  # u1, u10..u19
        assert await server.changed_elsewhere()
        counts = await server.counts()
        assert (counts[("outbox", "held")], counts[("outbox", "queued")]) == (11, 9)
    finally:
        await server.close()


def _on_a_terminal(argv: list[str], answer: bytes | None = None) -> tuple[int, bytes]:
    """`python -m relay ARGV` with stdin, stdout and stderr on one pty; type ``answer``
    at the question (None: expect none)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "relay", *argv])
    seen = b""
    try:
        if answer is not None:
            while b"[y/N]" not in seen:
                seen += os.read(fd, 1024)
            os.write(fd, answer)
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen


async def test_a_terminal_is_asked_before_a_bulk_change(relay: Relay) -> None:
    await mixed(relay)
    argv = ["queue", "delete", "--sender", "billing@*", "--config", str(relay.config_path)]
    # n, and end of input (Ctrl-D) at the question, are both "not confirmed": exit 1.
    for answer in (b"n\n", b"\x04"):
        code, seen = await asyncio.to_thread(_on_a_terminal, argv, answer)
        assert code == 1 and b"delete 2 message(s)? [y/N]" in seen, (answer, seen)
        assert b"relay: cancelled: nothing changed" in seen, (answer, seen)
        assert await ids(relay) == ["A", "B", "C", "D"]
    code, seen = await asyncio.to_thread(_on_a_terminal, argv, b"y\n")
    assert code == 0 and b"deleted 2 message(s)" in seen
    assert await ids(relay) == ["B", "C"]


# -- show ---------------------------------------------------------------------------------
def _relay(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "relay", *argv], cwd=ROOT,
                          capture_output=True, timeout=60, check=False)


async def test_show_raw_writes_the_exact_bytes_and_headers_the_header_section(
    relay: Relay,
) -> None:
    body = (b"From: a@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n"
            b"\x00\xff\xfe binary \x1b[31m\r\n.\r\nend\r\n")
    await add(relay.queue, "R", body=body)
    await add(relay.queue, "OK", state=S.DELIVERED, attempts=1)
    config = str(relay.config_path)
    raw = await _run("queue", "show", "R", "--raw", "--config", config)
    assert (raw.returncode, raw.stdout) == (0, body)
    head = await _run("queue", "show", "R", "--headers", "--config", config)
    assert head.stdout == body[: body.index(b"\r\n\r\n") + 2]
    argv = ["queue", "show", "R", "--raw", "--config", config]
    code, seen = await asyncio.to_thread(_on_a_terminal, argv)  # read, not written raw
    assert code == 0 and b"\x1b" not in seen and b"\\u001b[31m" in seen
    assert b"Subject: =?utf-8?q?caf=C3=A9?=\r\n" in seen  # one line each (pty's CRLF)
    gone = await relay("queue", "show", "OK", "--raw")
    assert (gone.code, gone.out) == (1, "")
    assert "was delivered; relay does not keep a delivered message's body" in gone.err
    text = await relay("queue", "show", "OK")
    assert "body not kept: OK was delivered" in text.out


async def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(_relay, *argv)


async def test_show_says_why_a_message_waits_and_until_when(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(tmp_path, {
        "outbox": {"transport": "maildir", "path": str(tmp_path / "box"),
                   "rate_limit": {"per_minute": 1}},
        "other": {"transport": "maildir", "path": str(tmp_path / "box2")},
    })
    relay = Relay(path, capsys)
    await add(relay.queue, "RETRY", account="other", state=S.DEFERRED, attempts=2,
              error="451 4.3.0 busy")
    await add(relay.queue, "LATER", account="other", not_before=NOW + 7200)
    await add(relay.queue, "HELD", account="other", state=S.HELD)
    await add(relay.queue, "DUE", account="other")
    await add(relay.queue, "RATE", account="outbox")
    await add(relay.queue, "RATE2", account="outbox", state=S.DEFERRED, attempts=1)
    await add(relay.queue, "SENT", account="outbox", state=S.DELIVERED, attempts=1)  # a send
    store = store_of(relay.queue)
    await store.open()
    try:
        await store.publish_health(encode(HealthReport(os.getpid(), NOW, {
            "other": AccountHealth("other", NOW + 5000, 3, "421 4.7.0 slow down")})))
    finally:
        await store.close()

    async def waiting(mid: str) -> dict[str, object]:
        shown = await relay.json("queue", "show", mid)
        return shown["waiting"]  # type: ignore[no-any-return]

    retry = await waiting("RETRY")
    assert [r["kind"] for r in retry["reasons"]] == ["retry-delay", "account-backoff"]
    assert retry["next_attempt"] == retry["reasons"][1]["until"]  # the later of the two
    later = await waiting("LATER")
    assert [r["kind"] for r in later["reasons"]] == ["deferred-delivery", "account-backoff"]
    assert later["next_attempt"] == later["reasons"][0]["until"]
    held = await waiting("HELD")
    assert [r["kind"] for r in held["reasons"]] == ["held"] and held["next_attempt"] is None
    assert [r["kind"] for r in (await waiting("DUE"))["reasons"]] == ["account-backoff"]
    assert [r["kind"] for r in (await waiting("RATE"))["reasons"]] == ["rate-limit"]
    # due in an hour, long after this minute's limit: the limit is not why it waits
    assert [r["kind"] for r in (await waiting("RATE2"))["reasons"]] == ["retry-delay"]
    assert (await relay.json("queue", "show", "SENT"))["waiting"] is None

    text = await relay("queue", "show", "RETRY")
    assert "waiting:         retry-delay: retry delay after attempt 2 until " in text.out
    assert "account-backoff: its account is backing off" in text.out
    assert "next attempt:" in text.out and "last_error:      451 4.3.0 busy" in text.out
    flushed = await relay("queue", "flush")
    assert flushed.code == 0  # a flush ends the backoff, and makes RETRY due now
    assert (await waiting("RETRY"))["reasons"] == []
    # A paused account's mail waits for a resume, not "due now" (found by a tester).
    assert (await relay("accounts", "pause", "other")).code == 0
    paused = await waiting("DUE")
    assert [r["kind"] for r in paused["reasons"]] == ["paused"]
    assert paused["next_attempt"] is None
    assert (await relay("accounts", "resume", "other")).code == 0
    assert (await waiting("DUE"))["reasons"] == []


# -- summary ------------------------------------------------------------------------------
async def test_summary_buckets_waiting_messages_by_age(relay: Relay) -> None:
    for mid, age, rcpts in (("a", 60, ("x@gmail.com",)), ("b", 400, ("y@gmail.com",)),
                            ("c", 900, ("z@Yahoo.com", "w@gmail.com")),
                            ("d", 2000, ("v@corp.example",)), ("e", 3000, ("u@gmail.com",)),
                            ("f", 9000, ("t@gmail.com",))):
        await add(relay.queue, mid, age_s=age, rcpts=rcpts)
    await add(relay.queue, "done", age_s=60, state=S.DELIVERED, attempts=1)
    await add(relay.queue, "other", age_s=60, account="second")
    shape = await relay.json("queue", "summary")
    assert shape["buckets"] == ["0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80m+"]
    assert shape["total"] == {"total": 7, "0-5m": 2, "5-10m": 1, "10-20m": 1, "20-40m": 1,
                              "40-80m": 1, "80m+": 1}
    assert [(r["account"], r["total"]) for r in shape["rows"]] == [("outbox", 6), ("second", 1)]
    domains = await relay.json("queue", "summary", "--by", "domain")
    assert [(r["domain"], r["total"]) for r in domains["rows"]] == [
        ("gmail.com", 5), ("corp.example", 1), ("example.com", 1), ("yahoo.com", 1)]
    text = (await relay("queue", "summary")).out.splitlines()
    assert text[0].split() == ["ACCOUNT", "TOTAL", "0-5m", "5-10m", "10-20m", "20-40m",
                               "40-80m", "80m+"]
    assert text[1].split() == ["total", "7", "2", "1", "1", "1", "1", "1"]
    assert text[2].split() == ["outbox", "6", "1", "1", "1", "1", "1", "1"]


# -- pipelines and help -------------------------------------------------------------------
async def test_a_closed_pipe_ends_the_listing_quietly(relay: Relay) -> None:
    await fill(relay.queue, 20_000)  # far more than a pipe holds
    def head() -> tuple[int, bytes, bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "queue", "list", "--jsonl",
             "--config", str(relay.config_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # `| head -1` exits
        err = proc.stderr.read()
        proc.stderr.close()
        return proc.wait(timeout=60), first, err

    code, first, err = await asyncio.to_thread(head)
    assert json.loads(first)["id"] == "G0000000000000000001"
    assert (code, err) == (141, b"")


def test_every_option_has_a_help_line() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "relay")
    assert missing == []
