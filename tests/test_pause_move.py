"""On call (issue 20, points 6 and 8): `relay accounts pause/resume`, `relay queue move`,
and the relay_account_paused / relay_account_backoff gauges, against a running relay and
a real fault-injecting upstream, the CLI run as a second process would run it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.app import App
from relay.cli.commands import main
from relay.config.loading import load_config
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import MessageState, NewMessage, Priority
from tests.conftest import (
    FAST_AUTH_BACKOFF,
    FAST_RETRY,
    MakeStore,
    StartRelay,
    message,
    metric,
    queue_section,
    send,
    upstream_account,
    wait_until,
)
from tests.test_queue_cli import Relay, write_config
from tests.test_queue_filters import _on_a_terminal, add, fill, mixed
from tests.upstream import FakeUpstream

S = MessageState

NOTHING_SENT_S = 1.2  # over two of the scheduler's 0.5 s polls for CLI changes


def _config_file(tmp_path: Path, accounts: dict[str, Any],
                 queue: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "queue": queue or {"path": str(tmp_path / "queue.sqlite3")},
        "retry": dict(FAST_RETRY), "auth_backoff": dict(FAST_AUTH_BACKOFF),
        "accounts": accounts, "routing": {"default_account": next(iter(accounts))},
    }))
    return path


async def relay_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out + err


async def test_pause_queues_but_sends_nothing_across_restarts_until_resume(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str], store_kind: str, request: pytest.FixtureRequest,
) -> None:
    config_path = _config_file(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                               queue_section(store_kind, tmp_path, request))
    c = str(config_path)
    app = await start_relay(load_config(config_path))
    code, text = await relay_cli(capsys, "accounts", "pause", "up", "-c", c)
    assert code == 0 and "paused up" in text
    await wait_until(lambda: app.scheduler.workers["up"].paused, what="the pause seen")
    assert (await send(app.smtp_port, message("while paused")))[0] == 250
    await asyncio.sleep(NOTHING_SENT_S)
    assert upstream.messages == []
    await app.refresh_gauges()
    assert metric(app, "relay_account_paused", account="up") == 1
    code, text = await relay_cli(capsys, "status", "-c", c)
    assert "paused (new mail is queued, nothing is sent):" in text
    assert "`relay accounts resume up`" in text
    assert "  up            ok; paused: nothing is sent" in text  # not a bare "ok"

    await app.shutdown()  # a restart: the pause is in the queue file, not in memory
    app = await start_relay(load_config(config_path))
    assert app.scheduler.workers["up"].paused
    await asyncio.sleep(NOTHING_SENT_S)
    assert upstream.messages == []

    code, text = await relay_cli(capsys, "accounts", "resume", "up", "-c", c)
    assert code == 0 and "resumed up" in text
    await upstream.wait_for_messages(1)
    await app.refresh_gauges()
    assert metric(app, "relay_account_paused", account="up") == 0


async def test_a_group_sends_nothing_through_a_member_once_its_pause_returned(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """a3 #14: group mail sent right after `relay accounts pause first` returned must not
    go through first: the member choice reads the persisted pause, not the copy the
    scheduler polls every 0.5 s."""
    async with FakeUpstream() as second:
        path = _config_file(tmp_path, {"first": upstream_account(upstream, tmp_path),
                                       "second": upstream_account(second, tmp_path)})
        data = yaml.safe_load(path.read_text())
        data["routing"] = {"default_account": "mail",
                           "groups": {"mail": {"accounts": ["first", "second"]}}}
        path.write_text(yaml.safe_dump(data))
        app = await start_relay(load_config(path))
        for i in range(3):
            code, _ = await relay_cli(capsys, "accounts", "pause", "first", "-c", str(path))
            assert code == 0
            assert (await send(app.smtp_port, message(f"after pause {i}")))[0] == 250
            await second.wait_for_messages(i + 1)
            assert upstream.messages == []
            await relay_cli(capsys, "accounts", "resume", "first", "-c", str(path))
            await wait_until(lambda: not app.scheduler.workers["first"].paused,
                             what="the resume seen")


async def test_a_pause_holds_in_every_process_that_claims(make_store: MakeStore) -> None:
    """The claim statement itself skips a paused account, so a worker process that has
    not noticed the pause yet still claims nothing."""
    operator, worker = make_store(lock=False), make_store(lock=False)
    await operator.open()
    await worker.open()
    try:
        now = time.time()
        for account in ("up", "other"):
            await operator.enqueue(NewMessage(
                id=f"m-{account}", sender="a@example.com", recipients=("b@example.com",),
                account=account, priority=Priority.NORMAL, body=message(account),
                created_at=now, not_before=now))
        await operator.set_paused("up", True, now)
        assert await worker.claim_due("up", now + 1, 10, 60.0) == []
        assert [m.id for m in await worker.claim_due("other", now + 1, 10, 60.0)] == ["m-other"]
        assert set(await worker.paused_accounts()) == {"up"}
        await operator.set_paused("up", False, now)
        assert [m.id for m in await worker.claim_due("up", now + 1, 10, 60.0)] == ["m-up"]
    finally:
        await operator.close()
        await worker.close()


async def test_move_reroutes_queued_mail_to_another_account_one_line_each(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The on-call move: pause the broken account, move its mail, it goes out through
    the other account's upstream."""
    async with FakeUpstream() as second:
        config_path = _config_file(tmp_path, {
            "up": upstream_account(upstream, tmp_path),
            "second": upstream_account(second, tmp_path)})
        c = str(config_path)
        app = await start_relay(load_config(config_path))
        await relay_cli(capsys, "accounts", "pause", "up", "-c", c)
        await wait_until(lambda: app.scheduler.workers["up"].paused, what="the pause seen")
        ids = []
        for i in range(3):
            code, reply = await send(app.smtp_port, message(f"stuck {i}"))
            assert code == 250
            ids.append(reply.split()[-1])

        code, text = await relay_cli(capsys, "queue", "move", "--from", "up", "--to", "second",
                                     "-c", c)
        assert code == 0, text
        for message_id in ids:
            assert f"moved {message_id} from up to second" in text
        assert "3 message(s) moved from up to second" in text
        await second.wait_for_messages(3)
        assert upstream.messages == []

        code, text = await relay_cli(capsys, "queue", "move", "--from", "up", "--to", "nope",
                                     "-c", c)
        assert code == 2
        assert "--to: no account named 'nope' (accounts: second, up)" in text


async def test_a_stuck_accounts_backlog_moves_to_a_group_and_a_group_is_not_paused(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with FakeUpstream() as second, FakeUpstream() as third:
        config_path = _config_file(tmp_path, {
            "up": upstream_account(upstream, tmp_path),
            "second": upstream_account(second, tmp_path),
            "third": upstream_account(third, tmp_path)})
        data = yaml.safe_load(config_path.read_text())
        data["routing"]["groups"] = {"spread": {"accounts": ["second", "third"],
                                                "mode": "weighted",
                                                "weights": {"second": 1, "third": 1}}}
        config_path.write_text(yaml.safe_dump(data))
        c = str(config_path)
        app = await start_relay(load_config(config_path))
        code, text = await relay_cli(capsys, "accounts", "pause", "spread", "-c", c)
        assert code == 2
        assert "'spread' is a group (routing.groups): name one of its accounts" \
            " (second, third)" in text
        await relay_cli(capsys, "accounts", "pause", "up", "-c", c)
        await wait_until(lambda: app.scheduler.workers["up"].paused, what="the pause seen")
        for i in range(6):
            assert (await send(app.smtp_port, message(f"stuck {i}")))[0] == 250
        code, text = await relay_cli(capsys, "queue", "move", "--from", "up", "--to", "spread",
                                     "--yes", "-c", c)
        assert code == 0, text
        assert "6 message(s) moved from up to spread" in text
        await wait_until(lambda: len(second.messages) + len(third.messages) == 6,
                         what="the backlog through the group")
        assert upstream.messages == []
        code, text = await relay_cli(capsys, "queue", "move", "--from", "up", "--to", "nope",
                                     "-c", c)
        assert code == 2
        assert "--to: no account named 'nope' (accounts: second, third, up; groups: spread)" \
            in text


async def test_backoff_gauge_is_one_while_the_account_backs_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path)
    app: App = await start_relay(load_config(_config_file(tmp_path, {"up": account})))
    await app.refresh_gauges()
    assert metric(app, "relay_account_backoff", account="up") == 0
    upstream.password = "changed-at-the-provider"  # every login is refused: 535
    assert (await send(app.smtp_port, message("refused login")))[0] == 250
    await wait_until(lambda: app.scheduler.workers["up"].backed_off, what="the backoff")
    await app.refresh_gauges()
    assert metric(app, "relay_account_backoff", account="up") == 1


def test_rate_use_counts_each_sliding_window_and_finds_the_next_send() -> None:
    from relay.cli.status import rate_use

    now = 100_000.0
    sends = [now - 3000, now - 50, now - 30, now - 10]  # one an hour ago-ish, three recent
    use = rate_use([(60.0, 3), (3600.0, 10)], sends, now)
    assert use["windows"] == [
        {"window": "per_minute", "used": 3, "limit": 3, "remaining": 0,
         "next_slot_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 50 + 60))},
        {"window": "per_hour", "used": 4, "limit": 10, "remaining": 6, "next_slot_at": None}]
    # The minute is full: the next send may go when the oldest of the three leaves it.
    assert use["next_send_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                time.gmtime(now - 50 + 60))
    assert rate_use([(60.0, 5)], sends, now)["next_send_at"] is None


async def test_status_shows_rate_limit_use_per_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = _config_file(tmp_path, {"outbox": {
        "transport": "maildir", "path": str(tmp_path / "box"),
        "rate_limit": {"per_minute": 2, "per_day": 100}}})
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    await store.open()
    await store.execute([("INSERT INTO sends (account, at) VALUES (?, ?)",
                          ("outbox", time.time() - s)) for s in (5.0, 20.0, 7200.0)])
    await store.close()
    code, text = await relay_cli(capsys, "status", "-c", str(config_path))
    assert code == 0, text
    assert "rate limits (sends recorded in the queue file):" in text
    line = next(t for t in text.splitlines() if t.strip().startswith("outbox") and "/" in t)
    assert "2/2 per minute, 3/100 per day; next send: 20" in line  # a time, not "now"


async def test_a_reload_that_changes_a_paused_account_keeps_it_paused(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The reload builds a new worker for a changed account: it must start paused."""
    account = upstream_account(upstream, tmp_path)
    config_path = _config_file(tmp_path, {"up": account})
    app = await start_relay(load_config(config_path))
    await relay_cli(capsys, "accounts", "pause", "up", "-c", str(config_path))
    await wait_until(lambda: app.scheduler.workers["up"].paused, what="the pause seen")
    changed = _config_file(tmp_path, {"up": {**account, "pool": {"max_connections": 3}}})
    await app.reload(load_config(changed))
    assert app.scheduler.workers["up"].paused
    assert (await send(app.smtp_port, message("after the reload")))[0] == 250
    await asyncio.sleep(NOTHING_SENT_S)
    assert upstream.messages == []


# -- queue move as a bulk action (issue 20 point 7, a tester's finding) --------------------
@pytest.fixture
def two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Relay:
    """A queue with two maildir accounts and no server: mail of outbox moves to spare."""
    return Relay(write_config(tmp_path, {
        "outbox": {"transport": "maildir", "path": str(tmp_path / "box")},
        "spare": {"transport": "maildir", "path": str(tmp_path / "spare")}}), capsys)


async def _listed(relay: Relay) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in await relay.json("queue", "list")}


async def test_move_takes_the_filters_counts_first_and_reports_what_moved(two: Relay) -> None:
    await mixed(two)  # A queued, B and C deferred, D failed; all on outbox
    await add(two.queue, "H", rcpts=("hal@gmail.com",), state=S.HELD)
    before = await _listed(two)
    move = ("queue", "move", "--from", "outbox", "--to", "spare")

    dry = await two(*move, "--rcpt", "*@gmail.com", "--dry-run")
    assert (dry.code, dry.out) == (0, "would move 2 message(s)\n")  # A, B: not failed D, held H
    assert await _listed(two) == before

    moved = await two(*move, "--rcpt", "*@gmail.com")  # no terminal: no question
    assert moved.code == 0, moved.err
    assert moved.out.splitlines()[:3] == [
        "moved A from outbox to spare", "moved B from outbox to spare",
        "2 message(s) moved from outbox to spare"]
    after = await _listed(two)
    assert {i for i, m in after.items() if m["account"] == "spare"} == {"A", "B"}
    for i in "AB":  # only the account changed: the state and the due time stay
        assert {**after[i], "account": "outbox", "updated_at": None} == {
            **before[i], "updated_at": None}

    greylisted = await two(*move, "--error", "greylist", "--min-attempts", "1", "--yes")
    assert greylisted.out.splitlines()[:2] == [
        "moved C from outbox to spare", "1 message(s) moved from outbox to spare"]
    held = await two(*move, "--state", "held", "--since", "1h", "--sender", "app@*")
    assert held.out.splitlines()[1] == "1 held message(s) moved from outbox to spare"
    assert (await _listed(two))["H"]["state"] == "held"

    none = await two(*move, "--sender", "nobody")
    assert (none.code, none.err) == (1, "relay: no messages to move\n")
    with pytest.raises(SystemExit) as refused:  # not a state a move takes
        await two(*move, "--state", "failed")
    assert refused.value.code == 2
    same = await two("queue", "move", "--from", "spare", "--to", "spare")
    assert (same.code, same.err) == (2, "relay: --from and --to name the same account\n")
    unknown = await two("queue", "move", "--from", "outbox", "--to", "nope")
    assert unknown.code == 2 and "--to: no account named 'nope'" in unknown.err
    assert {i: m["account"] for i, m in (await _listed(two)).items()} == {
        "A": "spare", "B": "spare", "C": "spare", "D": "outbox", "H": "spare"}


async def test_a_move_is_in_the_messages_attempt_history(two: Relay) -> None:
    await mixed(two)
    assert (await two("queue", "move", "--from", "outbox", "--to", "spare",
                      "--rcpt", "bob@*")).code == 0
    shown = await two("queue", "show", "B")
    history = shown.out.split("attempts:\n", 1)[1].splitlines()
    assert history[0].endswith("outbox deferred: 421 4.7.0 Try again later")
    assert history[1].endswith("outbox moved: from outbox to spare by relay queue move")
    data = await two.json("queue", "show", "B")
    assert data["attempts"] == 3  # a move is not a delivery attempt: backoff unchanged
    assert "moved" not in (await two("queue", "show", "A")).out  # only what moved


async def test_move_limit_and_sort_choose_which_messages_move(two: Relay) -> None:
    await fill(two.queue, 6)  # G..01 oldest; attempts k % 4
    moved = await two("queue", "move", "--from", "outbox", "--to", "spare",
                      "--sort", "attempts", "--limit", "2")
    assert moved.out.splitlines()[:3] == [  # the most attempts: G3 (3), then G2 (2)
        f"moved G{2:019d} from outbox to spare", f"moved G{3:019d} from outbox to spare",
        "2 message(s) moved from outbox to spare"]
    listed = await _listed(two)
    assert {i for i, m in listed.items() if m["account"] == "spare"} == {
        f"G{k:019d}" for k in (3, 2)}


async def test_a_terminal_is_asked_before_a_move(two: Relay) -> None:
    await mixed(two)
    argv = ["queue", "move", "--from", "outbox", "--to", "spare", "--sender", "billing@*",
            "--config", str(two.config_path)]
    code, seen = await asyncio.to_thread(_on_a_terminal, argv, b"n\n")
    assert code == 1 and b"move 1 message(s)? [y/N]" in seen and b"nothing changed" in seen
    assert (await _listed(two))["A"]["account"] == "outbox"
    code, seen = await asyncio.to_thread(_on_a_terminal, argv, b"y\n")
    assert code == 0 and b"1 message(s) moved from outbox to spare" in seen
    assert (await _listed(two))["A"]["account"] == "spare"
    news = ["queue", "move", "--from", "outbox", "--to", "spare", "--sender", "news@*",
            "--yes", "--config", str(two.config_path)]
    code, seen = await asyncio.to_thread(_on_a_terminal, news, None)
    assert code == 0 and b"[y/N]" not in seen  # --yes: no question
    assert b"1 message(s) moved from outbox to spare" in seen


async def test_a_forced_delete_mid_send_is_logged_as_a_delete_not_a_lost_lease(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    config_path = _config_file(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(load_config(config_path))
    upstream.delay("DATA", 1.0)  # the send is under way while the operator deletes it
    code, text = await send(app.smtp_port, message("unwanted"))
    assert code == 250, text
    mid = text.split()[-1]
    await wait_until(lambda: bool(upstream.times_of("DATA")), what="the send under way")
    code, text = await relay_cli(capsys, "queue", "delete", mid, "--force", "-c",
                                 str(config_path))
    assert (code, text) == (0, f"{mid}: deleted\n")
    await wait_until(lambda: "outcome_dropped" in caplog.text, what="the outcome dropped")
    (line,) = [r.getMessage() for r in caplog.records if "outcome_dropped" in r.getMessage()]
    assert "deleted while being sent" in line and "lease" not in line
    assert await app.store.get(mid) is None  # and the outcome did not bring it back


async def test_a_forced_delete_mid_split_stops_the_transactions_still_to_come(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], start_relay: StartRelay,
) -> None:
    """6 recipients, 2 a transaction (452 too many recipients): deleted during the first
    transaction, the send stops there; the other four do not get it."""
    async with FakeUpstream(recipient_limit=2) as upstream:
        config_path = _config_file(tmp_path, {"up": upstream_account(upstream, tmp_path)})
        app = await start_relay(load_config(config_path))
        upstream.delay("DATA", 1.0)
        rcpts = [f"r{i}@example.com" for i in range(6)]
        code, text = await send(app.smtp_port, message("unwanted"), recipients=rcpts)
        assert code == 250, text
        mid = text.split()[-1]
        await wait_until(lambda: bool(upstream.times_of("DATA")), what="the first transaction")
        code, _ = await relay_cli(capsys, "queue", "delete", mid, "--force", "-c",
                                  str(config_path))
        assert code == 0
        await upstream.wait_for_messages(1)  # the transaction under way ends
        await asyncio.sleep(1.5)  # (the next would have begun at once)
        assert len(upstream.times_of("MAIL")) == 1
        assert await app.store.get(mid) is None
