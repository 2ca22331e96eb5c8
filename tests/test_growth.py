"""Issue 11.17: the queue file stays bounded and /metrics never counts the whole of it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import aiohttp

from relay.queue.sqlite.schema import APPLICATION_ID, SCHEMA_VERSION, SENDS_KEPT_S
from relay.queue.sqlite.store import SQLiteStore
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send_many,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream

DAY = 86400.0

# The schema of relay files written before counts and pruning (user_version 2), as it was.
SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    account TEXT NOT NULL,
    priority INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    mail_options TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_ready
    ON messages (account, priority, next_attempt_at) WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, account);
CREATE TABLE IF NOT EXISTS bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    message_id TEXT NOT NULL,
    account TEXT NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    reply TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts (message_id);
CREATE INDEX IF NOT EXISTS attempts_account_at ON attempts (account, at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- When each account sent, for rate limits across restarts. Kept apart from attempts so
-- that deleting or purging messages never makes a restarted relay forget recent sends.
CREATE TABLE IF NOT EXISTS sends (account TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sends_account_at ON sends (account, at);
"""


def _row(i: int, state: str, at: float, account: str = "up") -> tuple[object, ...]:
    return (f"OLD{i:05d}", state, account, 3, "app@example.com",
            '[["to@example.com", "pending", ""]]', 10, 0, at, at, "", at, "")


def _schema_2_file(path: Path, rows: list[tuple[object, ...]]) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA_2)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA user_version = 2")
    db.executemany(
        "INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
        " attempts, created_at, next_attempt_at, last_error, updated_at, mail_options)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.executemany("INSERT INTO bodies (id, data) VALUES (?, ?)",
                   [(r[0], message(str(r[0]))) for r in rows if r[1] != "delivered"])
    db.executemany("INSERT INTO attempts VALUES (?, 'up', ?, 'delivered', '250 ok')",
                   [(r[0], r[11]) for r in rows if r[1] == "delivered"])
    db.commit()
    db.close()


def _true_counts(path: Path) -> dict[tuple[str, str], int]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT account, state, count(*) FROM messages GROUP BY 1, 2")
        return {(a, s): n for a, s, n in rows}
    finally:
        db.close()


async def test_schema_2_file_opens_counts_right_and_delivers(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """An existing queue file is migrated in place (`relay queue migrate`): its counts
    are taken once, its queued messages are delivered, and later changes keep the counts
    right."""
    now = time.time()
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(i, "queued", now) for i in range(3)]
                   + [_row(10 + i, "delivered", now - DAY) for i in range(4)]
                   + [_row(20, "failed", now - DAY), _row(21, "held", now, account="gone")])
    assert await SQLiteStore(queue).migrate() == list(range(3, SCHEMA_VERSION + 1))
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    await upstream.wait_for_messages(3)
    await app.scheduler.run_until_idle()
    assert await app.store.counts() == {("up", "delivered"): 7, ("up", "failed"): 1,
                                        ("gone", "held"): 1}
    await send_many(app.smtp_port, [message(f"new {i}") for i in range(5)])
    await upstream.wait_for_messages(8)
    await app.scheduler.run_until_idle()
    await app.store.delete_messages(states=["failed"])
    await app.store.update_messages(states=["held"], to_state="queued", now=now)
    assert await app.store.counts() == _true_counts(queue)
    assert (await app.store.counts())[("up", "delivered")] == 12
    db = sqlite3.connect(queue)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert "owner" in [r[1] for r in db.execute("PRAGMA table_info(messages)")]
    db.close()


async def test_delivered_messages_and_old_sends_are_pruned_while_running(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Delivered messages older than queue.keep_delivered go with their attempts, send
    times older than the longest rate window go; nothing undelivered is touched."""
    now = time.time()
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(i, "delivered", now - 8 * DAY) for i in range(1200)]
                   + [_row(2000, "delivered", now - DAY), _row(2001, "failed", now - 30 * DAY),
                      _row(2002, "deferred", now - 30 * DAY)])
    await SQLiteStore(queue).migrate()
    db = sqlite3.connect(queue)
    db.executemany("INSERT INTO sends VALUES ('up', ?)",
                   [(now - SENDS_KEPT_S - 60 - i,) for i in range(700)] + [(now - 60,)])
    db.commit()
    db.close()
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          queue={"keep_delivered": "7d"})
    app = await start_relay(config)

    def pruned() -> bool:
        return _true_counts(queue).get(("up", "delivered"), 0) <= 2

    await wait_until(pruned, what="old delivered messages pruned")
    await app.scheduler.run_until_idle()  # the deferred one is delivered meanwhile
    db = sqlite3.connect(queue)
    left = {r[0] for r in db.execute("SELECT id FROM messages")}
    assert left == {"OLD02000", "OLD02001", "OLD02002"}
    assert db.execute("SELECT count(*) FROM attempts WHERE message_id < 'OLD02000'"
                      ).fetchone() == (0,)
    await wait_until(lambda: db.execute("SELECT count(*) FROM sends").fetchone()[0] <= 2,
                     what="old send times pruned")
    db.close()
    assert await app.store.counts() == _true_counts(queue)
    await app.refresh_gauges()
    assert metric(app, "relay_queue_messages", account="up", state="delivered") == 2


async def test_prune_works_in_small_batches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    await store.open()
    try:
        now = time.time()
        await store.execute([
            ("INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
             " attempts, created_at, next_attempt_at, last_error, updated_at, mail_options)"
             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", _row(i, "delivered", now - 8 * DAY))
            for i in range(25)
        ])
        assert await store.prune(now, 7 * DAY, batch=10) == (10, 0)
        assert await store.prune_all(now, 7 * DAY, batch=10) == 15
        assert await store.counts() == {}
    finally:
        await store.close()


async def test_metrics_scrape_reads_no_table_scan(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """The queries behind /metrics use the counts table and index ranges only."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{app.http_port}/metrics") as response:
        assert response.status == 200
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        for sql in ("SELECT account, state, n FROM counts WHERE n > 0",
                    "SELECT account, min(created_at) FROM messages"
                    " WHERE state IN ('queued', 'deferred', 'sending') GROUP BY account",
                    "SELECT id FROM messages WHERE state='delivered' AND updated_at < 1"
                    " ORDER BY updated_at LIMIT 5"):
            plan = " | ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "SCAN messages" not in plan, (sql, plan)
    finally:
        db.close()
