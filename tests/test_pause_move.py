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
from relay.queue.types import NewMessage, Priority
from tests.conftest import (
    FAST_AUTH_BACKOFF,
    FAST_RETRY,
    StartRelay,
    message,
    metric,
    send,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream

NOTHING_SENT_S = 1.2  # over two of the scheduler's 0.5 s polls for CLI changes


def _config_file(tmp_path: Path, accounts: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
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
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = _config_file(tmp_path, {"up": upstream_account(upstream, tmp_path)})
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


async def test_a_pause_holds_in_every_process_that_claims(tmp_path: Path) -> None:
    """The claim statement itself skips a paused account, so a worker process that has
    not noticed the pause yet still claims nothing."""
    path = tmp_path / "queue.sqlite3"
    operator, worker = SQLiteStore(path, lock=False), SQLiteStore(path, lock=False)
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
    assert use["windows"] == [{"window": "per_minute", "used": 3, "limit": 3},
                              {"window": "per_hour", "used": 4, "limit": 10}]
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
