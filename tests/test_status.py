"""`relay status`: queue counts, attempt rates and account health, on a real queue file.

The summary is checked pure (``summarise`` on a Snapshot) for each health state, then
end to end: `relay status` run as `relay.cli.main` in a thread beside an App serving a
real upstream that refuses AUTH, so the health it shows is what the server published.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.cli.status import Snapshot, age, render, summarise
from relay.config.loading import load_config
from relay.delivery.health import AccountHealth, HealthReport, decode, encode
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import AttemptResult, MessageState, NewMessage, Priority, QueuedMessage
from tests.conftest import StartRelay, message, send, upstream_account
from tests.upstream import FakeUpstream

NOW = 1_800_000_000.0
SLOW_RETRY = {"initial_delay": "1h", "max_delay": "1h", "max_age": "2d", "jitter": 0}


def snapshot(**overrides: Any) -> Snapshot:
    values: dict[str, Any] = {
        "now": NOW, "queue": "q.sqlite3", "configured": ["gmail", "outbox"],
        "counts": {}, "oldest_by_account": {}, "oldest": None, "attempts": {},
        "server_running": True, "health": None,
    }
    return Snapshot(**{**values, **overrides})


def report(*health: AccountHealth, at: float = NOW - 10) -> HealthReport:
    return HealthReport(pid=1, published_at=at, accounts={h.account: h for h in health})


# -- pure: the summary --------------------------------------------------------------------
def test_counts_oldest_and_attempts_are_summed_per_account_and_in_total() -> None:
    oldest = QueuedMessage(id="OLD1", state=MessageState.DEFERRED, account="gmail",
                           priority=Priority.NORMAL, sender="a@x", recipients=[], size=1,
                           attempts=3, created_at=NOW - 7300, next_attempt_at=NOW + 60)
    summary = summarise(snapshot(
        counts={("gmail", "deferred"): 4, ("gmail", "queued"): 2, ("outbox", "delivered"): 9,
                ("outbox", "held"): 1, ("gone", "queued"): 1},
        oldest_by_account={"gmail": NOW - 7300, "gone": NOW - 5},
        oldest=oldest,
        attempts={"last_minute": {("gmail", "deferred"): 2, ("outbox", "delivered"): 1},
                  "last_hour": {("gmail", "deferred"): 8, ("gmail", "partial"): 1,
                                ("outbox", "delivered"): 30}},
    ))
    gmail = summary["accounts"]["gmail"]
    assert gmail["queue"] == {"queued": 2, "deferred": 4, "sending": 0, "held": 0,
                              "delivered": 0, "failed": 0}
    assert gmail["undelivered"] == 6 and gmail["oldest_undelivered_age_s"] == 7300
    assert gmail["attempts"]["last_hour"] == {"delivered": 0, "deferred": 8, "failed": 0,
                                              "partial": 1}
    # An account with messages but no longer in the config is shown, and said so.
    assert list(summary["accounts"]) == ["gmail", "outbox", "gone"]
    assert summary["accounts"]["gone"]["health"]["state"] == "not_configured"
    assert summary["totals"]["undelivered"] == 7  # held is counted apart
    assert summary["totals"]["queue"]["held"] == 1
    assert summary["totals"]["attempts"]["last_minute"] == {
        "delivered": 1, "deferred": 2, "failed": 0, "partial": 0}
    assert summary["oldest_undelivered"] == {
        "id": "OLD1", "account": "gmail", "state": "deferred",
        "created_at": "2027-01-15T05:58:20Z", "age_s": 7300}

    text = render(summary)
    assert "oldest undelivered: OLD1 (gmail, deferred), 2h 1m old" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    queue_row, attempts_row = [x.split() for x in text.splitlines() if x.startswith("gmail ")]
    assert queue_row == ["gmail", "2", "4", "0", "0", "0", "0", "2h", "1m"]
    # last minute: 2 deferred of 2 (100%); last hour: 8 deferred of 9 (89%)
    assert attempts_row == ["gmail", "0", "2", "0", "0", "100%", "0", "8", "0", "1", "89%"]


@pytest.mark.parametrize(
    ("health", "flush_at", "state", "until"),
    [
        (None, None, "ok", None),
        (AccountHealth("gmail", NOW - 100, 0), None, "ok", None),  # recovered
        (AccountHealth("gmail", NOW + 90, 2, "421 4.7.0 busy"), None, "backing_off",
         "2027-01-15T08:01:30Z"),
        # The backoff time passed: the worker sends one message at a time to test it.
        (AccountHealth("gmail", NOW - 5, 2, "421 4.7.0 busy"), None, "probing", None),
        # `relay queue flush` after the report ends the backoff early.
        (AccountHealth("gmail", NOW + 90, 2, "421 4.7.0 busy"), NOW - 1, "probing", None),
        (AccountHealth("gmail", NOW + 90, 1, "535 5.7.8 bad credentials", auth=True), None,
         "auth_failing", "2027-01-15T08:01:30Z"),
    ],
    ids=["never-reported", "recovered", "backing-off", "backoff-over", "flushed", "auth"],
)
def test_health_states(health: AccountHealth | None, flush_at: float | None, state: str,
                       until: str | None) -> None:
    published = report(health) if health else report()
    summary = summarise(snapshot(health=published, flush_at=flush_at))
    gmail = summary["accounts"]["gmail"]["health"]
    assert (gmail["state"], gmail["backoff_until"]) == (state, until)
    assert gmail["backoff_left_s"] == (90 if until else None)
    assert summary["accounts"]["outbox"]["health"]["state"] == "ok"
    assert summary["server"]["health_reported_at"] == "2027-01-15T07:59:50Z"
    line = next(x for x in render(summary).splitlines() if x.startswith("  gmail"))
    expected = {"ok": "ok", "backing_off": "failing (2 in a row): 421 4.7.0 busy; backing off"
                " until 2027-01-15T08:01:30Z (in 1m)", "probing": "backoff over",
                "auth_failing": "AUTH failing (1 in a row): 535 5.7.8 bad credentials"}[state]
    assert expected in line


def test_without_a_server_health_is_unknown_and_says_why() -> None:
    summary = summarise(snapshot(server_running=False,
                                 health=None, counts={("gmail", "queued"): 1}))
    assert summary["server"] == {"running": False, "health_reported_at": None, "processes": []}
    assert {a["health"]["state"] for a in summary["accounts"].values()} == {"unknown"}
    text = render(summary)
    assert "account health: unknown, as relay serve is not running" in text
    assert "q.sqlite3.lock" in text


def test_health_report_round_trips_and_garbage_is_no_report() -> None:
    r = report(AccountHealth("gmail", NOW + 5, 3, "421 busy", auth=False))
    assert decode(encode(r)) == r
    for bad in (None, "", "{", "[]", '{"pid": 1}', '{"pid": 1, "published_at": 2,'
                ' "accounts": {"a": {"nope": 1}}}'):
        assert decode(bad) is None


def test_age_is_short_and_rounded() -> None:
    assert [age(s) for s in (0, 59.9, 60, 3599, 3600, 3660 * 2, 86400 * 2 + 3600 * 5)] == [
        "0s", "59s", "1m", "59m", "1h 0m", "2h 2m", "2d 5h"]


# -- end to end ---------------------------------------------------------------------------
class Status:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    async def text(self) -> str:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["status", "--config", str(self.config)])
        out, err = self.capsys.readouterr()
        assert (code, err) == (0, "")
        return out

    async def json(self) -> Any:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["status", "--json", "--config", str(self.config)])
        out, err = self.capsys.readouterr()
        assert (code, err) == (0, "")
        return json.loads(out)


def write_config(tmp_path: Path, accounts: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "accounts": accounts,
        "routing": {"default_account": next(iter(accounts))},
    }, sort_keys=False))
    return path


async def poll(condition: Any, what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_status_shows_what_the_running_server_reports(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, {
        "up": upstream_account(upstream, tmp_path, retry=SLOW_RETRY,
                               auth_backoff={"initial": "1h", "max": "1h"}),
        "outbox": {"transport": "maildir", "path": str(tmp_path / "box")},
    })
    status = Status(config, capsys)
    app = await start_relay(load_config(config))
    upstream.fail_auth()
    _, reply = await send(app.smtp_port, message("status"))
    queue_id = reply.split()[-1]

    async def published() -> HealthReport | None:
        found = decode(await app.store.read_health())
        return found if found and found.accounts["up"].failures else None

    await poll(published, "the server to publish the auth failure")
    data = await status.json()
    assert data["server"]["running"] is True and data["server"]["health_reported_at"]
    up = data["accounts"]["up"]
    assert up["health"]["state"] == "auth_failing"
    assert up["health"]["last_error"].startswith("535")
    assert 3500 < up["health"]["backoff_left_s"] <= 3600  # auth_backoff.initial 1h
    assert up["queue"]["deferred"] == 1 and up["undelivered"] == 1
    assert up["attempts"]["last_minute"]["deferred"] == 1
    assert data["accounts"]["outbox"]["health"]["state"] == "ok"
    assert data["oldest_undelivered"]["id"] == queue_id
    text = await status.text()
    reported = data["server"]["health_reported_at"]
    assert f"account health, as reported by the running server at {reported}:" in text
    assert "  up            AUTH failing (1 in a row): 535" in text

    # The password is fixed and the operator flushes: the next send recovers the account.
    upstream.fail_auth(False)
    await asyncio.to_thread(main, ["queue", "flush", "--config", str(config)])
    await upstream.wait_for_messages(1)

    async def recovered() -> Any:
        data = await status.json()
        return data if data["accounts"]["up"]["health"]["state"] == "ok" else None

    data = await poll(recovered, "status to show the account recovered")
    up = data["accounts"]["up"]
    assert up["queue"]["delivered"] == 1 and up["undelivered"] == 0
    assert up["attempts"]["last_hour"] == {"delivered": 1, "deferred": 1, "failed": 0,
                                           "partial": 0}
    assert data["oldest_undelivered"] is None


async def seed(queue: Path, count: int, *, at: float) -> None:
    store = SQLiteStore(queue, lock=False)
    await store.open()
    try:
        for i in range(count):
            await store.enqueue(NewMessage(
                id=f"SEED{i:04d}", sender="app@example.com", recipients=("to@example.com",),
                account="outbox", priority=Priority.NORMAL, body=message(f"m{i}"),
                created_at=at, not_before=at))
        await store.finish(AttemptResult(
            id="SEED0000", account="outbox", state=MessageState.DEFERRED, recipients=[],
            attempts=1, next_attempt_at=at + 3600, last_error="451 4.3.0 busy", at=at,
            outcome="deferred", reply="451 4.3.0 busy"))
    finally:
        await store.close()


async def test_without_a_running_server_status_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, {"outbox": {"transport": "maildir",
                                                "path": str(tmp_path / "box")}})
    queue = tmp_path / "queue.sqlite3"
    await seed(queue, 3, at=time.time() - 600)
    # A report left by a server that has stopped is not shown as current.
    store = SQLiteStore(queue, lock=False)
    await store.open()
    await store.publish_health(encode(report(AccountHealth("outbox", NOW, 4, "x"))))
    await store.close()
    (tmp_path / "queue.sqlite3.lock").touch()  # as a stopped server leaves it

    data = await Status(config, capsys).json()
    assert data["server"] == {"running": False, "health_reported_at": None, "processes": []}
    outbox = data["accounts"]["outbox"]
    assert outbox["health"]["state"] == "unknown"
    assert (outbox["queue"]["queued"], outbox["queue"]["deferred"]) == (2, 1)
    assert 599 < outbox["oldest_undelivered_age_s"] < 700
    assert outbox["attempts"]["last_minute"]["deferred"] == 0  # ten minutes ago
    assert outbox["attempts"]["last_hour"]["deferred"] == 1
    text = await Status(config, capsys).text()
    assert "account health: unknown, as relay serve is not running" in text
    # status only looked: the lock is free again for a server to take.
    store = SQLiteStore(queue)
    await store.open()
    await store.close()


async def test_a_time_no_date_can_show_does_not_end_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A queue an older relay's import left with created_at 1e308: status shows it as
    `relay queue show` does, rather than ending with a traceback (OverflowError)."""
    config = write_config(tmp_path, {"outbox": {"transport": "maildir",
                                                "path": str(tmp_path / "box")}})
    queue = tmp_path / "queue.sqlite3"
    await seed(queue, 1, at=time.time() - 600)
    store = SQLiteStore(queue, lock=False)
    await store.open()
    try:
        await store.execute([("UPDATE messages SET created_at=1e308", ())])
    finally:
        await store.close()
    data = await Status(config, capsys).json()
    assert data["oldest_undelivered"]["created_at"] == "out of range (1e+308)"
    assert "oldest undelivered: SEED0000 (outbox, deferred)" in await Status(config,
                                                                              capsys).text()


async def test_a_report_from_an_earlier_run_is_not_shown_as_current(
    tmp_path: Path, start_relay: StartRelay, capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, {"outbox": {"transport": "maildir",
                                                "path": str(tmp_path / "box")}})
    app = await start_relay(load_config(config))
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()  # a process that published a report, then ended
    stale = HealthReport(gone.pid, NOW, {"outbox": AccountHealth("outbox", NOW, 4)})
    await app.store.publish_health(encode(stale))
    data = await Status(config, capsys).json()
    assert data["server"] == {"running": True, "health_reported_at": None,
                             "processes": [{"pid": os.getpid(), "role": "serve"}]}
    assert data["accounts"]["outbox"]["health"]["state"] == "ok"
    assert "(the running server has reported no backoff since it started)" in (
        await Status(config, capsys).text())


def test_with_several_workers_the_shared_backoff_is_the_accounts_state() -> None:
    """Each worker's report says only what that worker saw last (and is ignored once its
    process is gone): with workers, the backoff they share in the queue decides."""
    workers = [(101, "supervisor"), (102, "worker 0"), (103, "worker 1")]
    stale = report(AccountHealth("outbox", NOW + 50, 2, "421 down", reason="connect"))
    health = {name: summarise(snapshot(
        processes=workers, health=None if name == "gone" else stale,
        backoffs={"gmail": (NOW + 600, "auth:3"), "outbox": (NOW - 1, "connect")},
    ))["accounts"] for name in ("gone", "stale")}
    gmail = health["gone"]["gmail"]["health"]
    assert gmail["state"] == "auth_failing" and gmail["backoff_left_s"] == 600
    assert gmail["last_error"] == "auth" and gmail["failures"] == 3
    assert health["stale"]["outbox"]["health"]["state"] == "probing"
    assert health["stale"]["outbox"]["health"]["last_error"] == "421 down"
    # Another worker's probe got through (no shared row): ok, whatever a report says.
    ok = summarise(snapshot(processes=workers, health=stale))["accounts"]["outbox"]
    assert ok["health"]["state"] == "ok"
