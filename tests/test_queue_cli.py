"""`relay queue ...` and `relay accounts test`, run as `relay.cli.main([...])` on a real queue.

Commands run in a thread (main() calls asyncio.run) while the test's loop keeps serving
the relay and the fake upstream, as a second process would beside `relay serve`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import load_config
from relay.config.schema import Config
from relay.queue.ops import OPERATIONS
from relay.queue.postgres.store import PostgresStore
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.store import QueueStore
from relay.queue.types import (
    AttemptResult,
    MessageState,
    NewMessage,
    Priority,
    Recipient,
    RecipientState,
)
from tests.conftest import (
    FAST_RETRY,
    StartRelay,
    message,
    queue_section,
    send,
    upstream_account,
)
from tests.upstream import FakeUpstream

S = MessageState
DAY = 86400.0
# Only `relay queue flush` / `retry` / `release` can make a deferred message due sooner.
SLOW_RETRY = {"initial_delay": "1h", "max_delay": "1h", "max_age": "2d", "jitter": 0}


@dataclass
class Result:
    code: int
    out: str
    err: str


class Relay:
    """The `relay` command against one config file, output captured."""

    def __init__(self, config_path: Path, capsys: pytest.CaptureFixture[str],
                 *, secrets: bool = True) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path, secrets=secrets)
        # The SQLite file, or the PostgreSQL URL (a str): what seed() and store_of() take.
        self.queue: Path | str = self.config.queue.url or self.config.queue.path
        self._capsys = capsys

    async def __call__(self, *argv: str) -> Result:
        self._capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--config", str(self.config_path)])
        out, err = self._capsys.readouterr()
        return Result(code, out, err)

    async def json(self, *argv: str) -> Any:
        result = await self(*argv, "--json")
        assert result.code == 0, result.err
        return json.loads(result.out)

    async def states(self) -> dict[str, str]:
        return {m["id"]: m["state"] for m in await self.json("queue", "list")}

    def rows(self, table: str, column: str = "id") -> set[str]:
        return {r[0] for r in self.select(f"SELECT {column} FROM {table}")}

    def select(self, sql: str) -> list[Any]:
        """A read straight from the queue's database, whichever store holds it."""
        if isinstance(self.queue, str):
            import psycopg

            with psycopg.connect(self.queue) as pg:
                return pg.execute(sql).fetchall()
        with sqlite3.connect(self.queue) as db:
            return db.execute(sql).fetchall()


def store_of(queue: Path | str) -> QueueStore:
    """An unopened store beside the server's: a SQLite file or a PostgreSQL URL."""
    if isinstance(queue, str):
        return PostgresStore(queue)
    return SQLiteStore(queue, lock=False)


def sql(queue: Path | str, text: str) -> str:
    """A statement written with ? placeholders, as the queue's store takes them."""
    return text.replace("?", "%s") if isinstance(queue, str) else text


def write_config(tmp_path: Path, accounts: dict[str, Any], **sections: Any) -> Path:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "retry": dict(FAST_RETRY),
        "accounts": accounts,
        "routing": {"default_account": next(iter(accounts))},
        **sections,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def relay(tmp_path: Path, capsys: pytest.CaptureFixture[str], store_kind: str,
          request: pytest.FixtureRequest) -> Relay:
    """A queue with a maildir account and no server: for the commands on their own."""
    return Relay(write_config(tmp_path, {"outbox": {"transport": "maildir",
                                                     "path": str(tmp_path / "box")}},
                              queue=queue_section(store_kind, tmp_path, request)), capsys)


async def seed(
    queue: Path | str,
    states: dict[str, MessageState],
    *,
    at: float | None = None,
    recipients: Sequence[str] = ("to@example.com",),
) -> None:
    """Put messages into the queue in the given states, as the server would leave them."""
    store = store_of(queue)
    await store.open()
    now = time.time()
    at = now if at is None else at
    final = {S.DEFERRED: RecipientState.PENDING, S.DELIVERED: RecipientState.DELIVERED,
             S.FAILED: RecipientState.FAILED}
    try:
        for mid, state in states.items():
            await store.enqueue(NewMessage(
                id=mid, sender="app@example.com", recipients=tuple(recipients),
                account="outbox", priority=Priority.NORMAL, body=message(mid),
                created_at=at, not_before=at,
            ))
            if state in final:
                reply = {S.DEFERRED: "451 4.3.0 busy", S.FAILED: "550 5.1.1 no such user"}
                await store.finish(AttemptResult(
                    id=mid, account="outbox", state=state,
                    recipients=[Recipient(r, final[state], reply.get(state, "250 ok"))
                                for r in recipients],
                    attempts=1, next_attempt_at=at + 3600 if state is S.DEFERRED else at,
                    last_error=reply.get(state, ""), at=at, outcome=str(state),
                    reply=reply.get(state, "250 2.0.0 ok"),
                ))
            elif state in (S.HELD, S.SENDING):
                await store.update_messages(states=["queued"], to_state=str(state), ids=[mid],
                                            now=at)
    finally:
        await store.close()


EVERY_STATE = {"Q": S.QUEUED, "D": S.DEFERRED, "SND": S.SENDING, "H": S.HELD,
               "OK": S.DELIVERED, "F": S.FAILED}


# -- list, show, --json ------------------------------------------------------------------
async def test_list_shows_every_message_with_its_state_until_purged(relay: Relay) -> None:
    await seed(relay.queue, EVERY_STATE)
    result = await relay("queue", "list")
    assert result.code == 0
    for mid, state in EVERY_STATE.items():
        assert any(line.split()[:2] == [mid, str(state)] for line in result.out.splitlines())
    assert "-- 6 message(s)" in result.out
    assert [m["id"] for m in await relay.json("queue", "list", "--state", "failed")] == ["F"]
    assert (await relay("queue", "list", "--account", "nobody")).out == "no message matches\n"


async def test_json_carries_the_envelope_and_show_adds_headers_and_attempts(
    relay: Relay,
) -> None:
    await seed(relay.queue, {"F": S.FAILED, "OK": S.DELIVERED})
    listed = await relay.json("queue", "list")
    keys = {"id", "state", "account", "priority", "sender", "recipients", "attempts",
            "next_attempt_at", "last_error", "created_at"}
    assert all(keys <= set(m) for m in listed)
    failed = await relay.json("queue", "show", "F")
    assert {k: failed[k] for k in ("id", "state", "account", "priority", "sender", "attempts")} \
        == {"id": "F", "state": "failed", "account": "outbox", "priority": "normal",
            "sender": "app@example.com", "attempts": 1}
    assert failed["recipients"] == [
        {"address": "to@example.com", "state": "failed", "reply": "550 5.1.1 no such user"}]
    assert ["Subject", "F"] in failed["headers"]
    assert [(a["outcome"], a["reply"]) for a in failed["attempt_log"]] == [
        ("failed", "550 5.1.1 no such user")]
    assert (await relay.json("queue", "show", "OK"))["headers"] is None  # body gone

    text = await relay("queue", "show", "F")
    assert "state:           failed" in text.out and "550 5.1.1 no such user" in text.out
    unknown = await relay("queue", "show", "NOPE")
    assert (unknown.code, unknown.err) == (1, "relay: no message NOPE in the queue\n")


async def test_a_missing_queue_is_one_line_not_a_traceback(relay: Relay) -> None:
    result = await relay("queue", "hold", "X")
    assert result.code == 1
    assert result.err.startswith(("relay: no queue at ", "relay: no queue in "))
    assert result.err.count("\n") == 1


# -- hold / release / retry / delete by ID -----------------------------------------------
async def test_hold_and_release_change_only_what_they_may(relay: Relay) -> None:
    await seed(relay.queue, EVERY_STATE)
    held = await relay("queue", "hold", "Q", "D")
    assert (held.code, held.out) == (0, "Q: held\nD: held\n")

    for mid, why in [("OK", "it was delivered"), ("H", "H is already held"),
                     ("SND", "delivering it right now"), ("F", "`relay queue retry`"),
                     ("NOPE", "no message NOPE in the queue")]:
        refused = await relay("queue", "hold", mid)
        assert refused.code == 1 and why in refused.err, (mid, refused.err)
        assert refused.err.count("\n") == 1
    refused = await relay("queue", "release", "D", "OK")  # D is held now
    assert refused.code == 1 and refused.out == "D: released, due now\n"
    assert "cannot release OK: it is not held (it is delivered)" in refused.err
    assert await relay.states() == {**{k: str(v) for k, v in EVERY_STATE.items()},
                                    "Q": "held", "H": "held", "D": "queued"}


async def test_retry_refuses_delivered_unknown_held_and_sending_messages(
    relay: Relay,
) -> None:
    await seed(relay.queue, EVERY_STATE)
    for mid, why in [("OK", "cannot retry OK: it was delivered"),
                     ("NOPE", "no message NOPE in the queue"),
                     ("H", "`relay queue release`"), ("SND", "delivering it right now")]:
        refused = await relay("queue", "retry", mid)
        assert refused.code == 1 and why in refused.err, (mid, refused.err)
    assert (await relay("queue", "retry")).code == 2
    assert (await relay("queue", "retry", "D", "--all")).code == 2
    assert await relay.states() == {k: str(v) for k, v in EVERY_STATE.items()}


async def test_retry_of_a_failed_message_resets_its_failed_recipients(relay: Relay) -> None:
    await seed(relay.queue, {"F": S.FAILED}, recipients=["a@example.com", "b@example.com"])
    before = time.time()
    result = await relay("queue", "retry", "F")
    assert (result.code, result.out) == (0, "F: queued, due now\n")
    shown = await relay.json("queue", "show", "F")
    assert shown["state"] == "queued" and shown["attempts"] == 1
    assert shown["recipients"] == [{"address": a, "state": "pending", "reply": ""}
                                   for a in ("a@example.com", "b@example.com")]
    store = store_of(relay.queue)
    await store.open()
    try:
        got = await store.get("F")
    finally:
        await store.close()
    assert got is not None and before - 1 <= got.next_attempt_at <= time.time()
    assert got.pending_recipients == ["a@example.com", "b@example.com"]


async def test_retry_state_failed_puts_failed_messages_back(relay: Relay) -> None:
    """The way out of a misclassified refusal: failed messages, by account and since when."""
    now = time.time()
    await seed(relay.queue, {"OLD": S.FAILED}, at=now - 3 * DAY)
    await seed(relay.queue, {"NEW": S.FAILED, "D": S.DEFERRED, "OK": S.DELIVERED}, at=now)
    nobody = await relay("queue", "retry", "--state", "failed", "--account", "nobody")
    assert nobody.code == 1 and "no failed messages to retry" in nobody.err
    recent = await relay("queue", "retry", "--state", "failed", "--account", "outbox",
                         "--since", "1d")
    assert (recent.code, recent.out) == (0, "1 failed message(s) queued, due now\n")
    assert await relay.states() == {"OLD": "failed", "NEW": "queued", "D": "deferred",
                                    "OK": "delivered"}
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 4 * DAY))
    older = await relay("queue", "retry", "--state", "failed", "--since", when)
    assert (older.code, older.out) == (0, "1 failed message(s) queued, due now\n")
    shown = await relay.json("queue", "show", "OLD")
    assert shown["state"] == "queued"
    assert [r["state"] for r in shown["recipients"]] == ["pending"]
    bad = await relay("queue", "retry", "--state", "failed", "--since", "yesterday")
    assert bad.code == 2 and "--since" in bad.err
    assert (await relay("queue", "retry", "NEW", "--account", "outbox")).code == 2


async def test_retry_all_makes_every_deferred_message_due_now(relay: Relay) -> None:
    await seed(relay.queue, {"D1": S.DEFERRED, "D2": S.DEFERRED, "F": S.FAILED, "Q": S.QUEUED})
    result = await relay("queue", "retry", "--all")
    assert (result.code, result.out) == (0, "2 deferred message(s) queued, due now\n")
    assert await relay.states() == {"D1": "queued", "D2": "queued", "F": "failed",
                                    "Q": "queued"}
    (due,) = relay.select("SELECT max(next_attempt_at) FROM messages WHERE id LIKE 'D%'")
    assert due[0] <= time.time()
    again = await relay("queue", "retry", "--all")
    assert (again.code, again.err) == (1, "relay: no deferred messages to retry\n")


async def test_delete_removes_messages_with_their_bodies_and_attempts(relay: Relay) -> None:
    await seed(relay.queue, {"F1": S.FAILED, "F2": S.FAILED, "Q": S.QUEUED, "D": S.DEFERRED})
    result = await relay("queue", "delete", "--state", "failed")
    assert (result.code, result.out) == (0, "deleted 2 failed message(s)\n")
    assert relay.rows("messages") == relay.rows("bodies") == {"Q", "D"}
    assert relay.rows("attempts", "message_id") == {"D"}
    assert (await relay("queue", "delete", "--state", "failed")).code == 1

    assert (await relay("queue", "delete", "D")).out == "D: deleted\n"
    assert relay.rows("attempts", "message_id") == set()
    gone = await relay("queue", "delete", "D")
    assert (gone.code, gone.err) == (1, "relay: no message D in the queue\n")
    assert (await relay("queue", "delete", "Q", "--state", "queued")).code == 2
    assert relay.rows("messages") == {"Q"}


async def test_delete_refuses_messages_being_sent_unless_forced(relay: Relay) -> None:
    await seed(relay.queue, {"S1": S.SENDING, "S2": S.SENDING})
    by_id = await relay("queue", "delete", "S1")
    assert by_id.code == 1 and "may still arrive" in by_id.err and "--force" in by_id.err
    by_state = await relay("queue", "delete", "--state", "sending")
    assert by_state.code == 1 and "--force" in by_state.err
    assert relay.rows("messages") == {"S1", "S2"}
    assert (await relay("queue", "delete", "S1", "--force")).code == 0
    assert (await relay("queue", "delete", "--state", "sending", "--force")).code == 0
    assert relay.rows("messages") == relay.rows("bodies") == set()


async def test_purge_deletes_only_final_records_older_than_the_age(relay: Relay) -> None:
    await seed(relay.queue, {"OLD_OK": S.DELIVERED, "OLD_F": S.FAILED, "OLD_D": S.DEFERRED},
               at=time.time() - 8 * DAY)
    await seed(relay.queue, {"NEW_OK": S.DELIVERED, "NEW_F": S.FAILED})
    result = await relay("queue", "purge", "--older-than", "7d")
    assert (result.code, result.out) == (0, "purged 2 delivered/failed record(s) older than 7d\n")
    assert relay.rows("messages") == {"OLD_D", "NEW_OK", "NEW_F"}
    assert relay.rows("bodies") == {"OLD_D", "NEW_F"}
    assert relay.rows("attempts", "message_id") == {"OLD_D", "NEW_OK", "NEW_F"}
    bad = await relay("queue", "purge", "--older-than", "a week")
    assert bad.code == 2 and bad.err.startswith("relay: queue purge: --older-than must be")


async def test_bulk_changes_commit_window_by_window(relay: Relay) -> None:
    await seed(relay.queue, {f"D{i}": S.DEFERRED for i in range(9)})
    store = store_of(relay.queue)
    await store.open()
    try:
        await store.delete_messages(states=["deferred"], ids=["D1", "D2", "D3"])  # a gap
        done: list[int] = []
        count = await store.update_messages(states=["deferred"], to_state="queued",
                                            now=time.time(), chunk=2, progress=done.append)
        assert count == 6 and done == [1, 1, 3, 5, 6]  # windows of seq 1-2, 3-4, 5-6, ...
        removed: list[int] = []
        count = await store.delete_messages(states=["queued"], chunk=4, progress=removed.append)
        assert count == 6 and removed == [1, 5, 6]
    finally:
        await store.close()
    assert relay.rows("messages") == relay.rows("bodies") == set()


def test_every_operation_keeps_to_the_transition_table() -> None:
    assert all(op.allowed_by_transitions() for op in OPERATIONS)


# -- beside a running server
@pytest.fixture
async def served(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str], store_kind: str, request: pytest.FixtureRequest,
) -> tuple[Relay, Any]:
    """A running relay delivering to the fake upstream, with a 1-hour retry delay."""
    path = write_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                        retry=SLOW_RETRY, queue=queue_section(store_kind, tmp_path, request))
    relay = Relay(path, capsys)
    app = await start_relay(relay.config)
    return relay, app


async def queue_id(port: int, subject: str) -> str:
    code, text = await send(port, message(subject))
    assert code == 250
    return text.rsplit(" ", 1)[-1]


async def wait_for_state(relay: Relay, message_id: str, state: str, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while (await relay.states()).get(message_id) != state:
        assert time.monotonic() < deadline, f"{message_id} never became {state}"
        await asyncio.sleep(0.05)


async def test_held_message_is_not_sent_and_release_sends_it_within_a_second(
    served: tuple[Relay, Any], upstream: FakeUpstream,
) -> None:
    relay, app = served
    upstream.fail_data(451, "4.3.0 try later")
    mid = await queue_id(app.smtp_port, "hold me")
    await wait_for_state(relay, mid, "deferred")
    assert (await relay("queue", "hold", mid)).code == 0
    # Due now and the server woken (another process wrote): still it must not be sent.
    store = store_of(relay.queue)
    await store.open()
    await store.execute([(sql(relay.queue, "UPDATE messages SET next_attempt_at=0 WHERE id=?"),
                          (mid,))])
    await store.close()
    await asyncio.sleep(1.5)  # three polls of data_version
    assert upstream.messages == [] and (await relay.states())[mid] == "held"

    released = time.monotonic()
    assert (await relay("queue", "release", mid)).code == 0
    await upstream.wait_for_messages(1, timeout=3)
    assert time.monotonic() - released < 1.5
    assert b"Subject: hold me" in upstream.messages[0].data


async def test_flush_sends_deferred_messages_and_ends_an_account_backoff(
    served: tuple[Relay, Any], upstream: FakeUpstream,
) -> None:
    relay, app = served
    upstream.fail_auth()  # account-wide: the whole account backs off for an hour
    mid = await queue_id(app.smtp_port, "flush me")
    await wait_for_state(relay, mid, "deferred")
    upstream.fail_auth(False)
    await asyncio.sleep(0.6)
    assert upstream.messages == []  # the fix alone does not end an hour's backoff

    flushed = time.monotonic()
    result = await relay("queue", "flush")
    assert (result.code, result.out) == (
        0, "1 deferred message(s) due now; accounts backing off resume\n")
    await upstream.wait_for_messages(1, timeout=3)
    assert time.monotonic() - flushed < 2.0
    await wait_for_state(relay, mid, "delivered")


async def test_show_names_the_running_servers_account_backoff(
    served: tuple[Relay, Any], upstream: FakeUpstream,
) -> None:
    """Issue 18: "why is this one delayed" from what the server itself published."""
    relay, app = served
    upstream.fail_auth()  # account-wide: the account backs off
    mid = await queue_id(app.smtp_port, "why")
    await wait_for_state(relay, mid, "deferred")
    deadline = time.monotonic() + 5
    while True:  # the health report is written just after the attempt
        waiting = (await relay.json("queue", "show", mid))["waiting"]
        kinds = [r["kind"] for r in waiting["reasons"]]
        if "account-backoff" in kinds or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert kinds[0] == "retry-delay" and "account-backoff" in kinds, kinds
    text = await relay("queue", "show", mid)
    assert "535" in text.out and "next attempt:" in text.out
    upstream.fail_auth(False)
    assert (await relay("queue", "flush")).code == 0
    await wait_for_state(relay, mid, "delivered")
    assert (await relay.json("queue", "show", mid))["waiting"] is None


async def test_bulk_hold_and_release_by_filter_beside_the_server(
    served: tuple[Relay, Any], upstream: FakeUpstream,
) -> None:
    relay, app = served
    upstream.fail_data(451, "4.3.0 try later", times=3)
    ids = {}
    for rcpt in ("a@keep.example", "b@hold.example", "c@hold.example"):
        code, text = await send(app.smtp_port, message(rcpt), recipients=[rcpt])
        assert code == 250
        ids[rcpt] = text.rsplit(" ", 1)[-1]
    for mid in ids.values():
        await wait_for_state(relay, mid, "deferred")
    held = await relay("queue", "hold", "--rcpt", "*@hold.example", "--yes")
    assert (held.code, held.out) == (0, "held 2 message(s)\n")
    assert (await relay("queue", "retry", "--all")).out == "1 deferred message(s) queued, due now\n"
    await upstream.wait_for_messages(1, timeout=3)
    await wait_for_state(relay, ids["a@keep.example"], "delivered")
    assert (await relay.states())[ids["b@hold.example"]] == "held"
    released = await relay("queue", "release", "--rcpt", "hold.example")
    assert (released.code, released.out) == (0, "released 2 message(s), due now\n")
    await upstream.wait_for_messages(3, timeout=3)


async def test_retry_redelivers_a_failed_message_once_the_fault_is_cleared(
    served: tuple[Relay, Any], upstream: FakeUpstream,
) -> None:
    relay, app = served
    upstream.fail_data(554, "5.7.1 message refused")
    mid = await queue_id(app.smtp_port, "retry me")
    await wait_for_state(relay, mid, "failed")
    assert upstream.messages == []

    assert (await relay("queue", "retry", mid)).code == 0
    await upstream.wait_for_messages(1, timeout=3)
    await wait_for_state(relay, mid, "delivered")
    shown = await relay.json("queue", "show", mid)
    assert [a["outcome"] for a in shown["attempt_log"]] == ["failed", "delivered"]
    assert shown["recipients"][0]["state"] == "delivered"


async def test_a_change_made_right_after_the_server_starts_is_noticed(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = Relay(write_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}), capsys)
    await seed(relay.queue, {"H": S.HELD})
    store = store_of(relay.queue)  # seed() writes account 'outbox'
    await store.open()
    await store.execute([("UPDATE messages SET account='up'", ())])
    await store.close()
    await start_relay(relay.config)
    assert (await relay("queue", "release", "H")).code == 0  # well within the first poll
    await upstream.wait_for_messages(1, timeout=1.5)


# -- accounts test
def account_lines(out: str) -> dict[str, str]:
    lines = [line.strip().split(":", 1) for line in out.splitlines()[1:]]
    return {step: text.strip() for step, text in lines}


async def test_accounts_test_passes_every_step_against_a_working_upstream(
    tmp_path: Path, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
) -> None:
    relay = Relay(write_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}), capsys)
    result = await relay("accounts", "test", "up")
    assert result.code == 0, result.out + result.err
    assert account_lines(result.out) == {
        "connect": f"ok ({upstream.host}:{upstream.port})", "tls": "off (tls: none)",
        "auth": "ok", "noop": "ok (250)"}
    assert upstream.password not in result.out + result.err
    assert upstream.auth_successes == 1


async def test_accounts_test_reads_only_the_tested_accounts_secrets(
    tmp_path: Path, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unrelated webhook's or account's unset variable does not stop the test of
    another account; the tested account's own still does, naming the key."""
    monkeypatch.delenv("RELAY_TEST_UNSET_HOOK", raising=False)
    monkeypatch.delenv("RELAY_TEST_UNSET_PW", raising=False)
    relay = Relay(write_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path),
                   "other": {"host": "192.0.2.1", "username": "u",
                             "password_env": "RELAY_TEST_UNSET_PW"}},
        events={"webhooks": [{"url": "https://hooks.example.com/h",
                              "secret_env": "RELAY_TEST_UNSET_HOOK"}]}), capsys,
                  secrets=False)
    ok = await relay("accounts", "test", "up")
    assert ok.code == 0, ok.out + ok.err
    assert account_lines(ok.out)["auth"] == "ok" and upstream.auth_successes == 1
    refused = await relay("accounts", "test", "other")
    assert refused.code == 2
    assert refused.err == ("config error: accounts.other.password_env: environment variable"
                           " RELAY_TEST_UNSET_PW is not set here\n")


async def test_accounts_test_names_the_failing_step_and_its_reason(
    tmp_path: Path, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.fail_auth()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    relay = Relay(write_config(tmp_path, {
        "up": upstream_account(upstream, tmp_path),
        "down": {"host": "127.0.0.1", "port": closed, "tls": "none"},
    }), capsys)

    auth = await relay("accounts", "test", "up")
    steps = account_lines(auth.out)
    assert auth.code == 1
    assert steps["connect"].startswith("ok") and steps["auth"].startswith("FAILED: 535")
    assert steps["noop"] == "not tried"
    assert upstream.password not in auth.out + auth.err

    down = await relay("accounts", "test", "down")
    steps = account_lines(down.out)
    assert down.code == 1
    assert steps["connect"].startswith("FAILED: connection failed") and str(closed) in steps[
        "connect"]
    assert steps["auth"] == steps["noop"] == "not tried"

    unknown = await relay("accounts", "test", "nope")
    assert (unknown.code, unknown.err) == (1, "relay: no account named 'nope' (accounts: up,"
                                              " down)\n")


async def test_accounts_test_checks_a_maildir_can_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "box").mkdir()
    (tmp_path / "file").write_text("not a directory")
    relay = Relay(write_config(tmp_path, {
        "box": {"transport": "maildir", "path": str(tmp_path / "box")},
        "new": {"transport": "maildir", "path": str(tmp_path / "later" / "box")},
        "bad": {"transport": "maildir", "path": str(tmp_path / "file" / "box")},
    }), capsys)
    ok = await relay("accounts", "test", "box")
    assert ok.code == 0 and account_lines(ok.out) == {
        "directory": f"ok ({tmp_path / 'box'})", "write": "ok"}
    assert list((tmp_path / "box").iterdir()) == []  # the probe is removed
    assert (await relay("accounts", "test", "new")).code == 0
    bad = await relay("accounts", "test", "bad")
    assert bad.code == 1 and "is not a writable directory" in bad.out
