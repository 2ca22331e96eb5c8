"""The SQLite queue's file: pragmas, schema and its migration, the claim statement, and
the mapping between rows and the queue's types. Shared by the store's writer, its reads
and its operator operations.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from relay.errors import StoreError, StoreFullError
from relay.queue import rows
from relay.queue.migrations import check_numbering
from relay.queue.rows import COLUMNS as COLUMNS
from relay.queue.types import Priority, QueuedMessage, Recipient

# The same settings for both connections.
PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    # FULL: the WAL is synced at every commit, so a commit survives power loss.
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
)
APPLICATION_ID = 0x52454C59  # 'RELY': marks a file as a relay queue
FLUSH_KEY = "flush_requested_at"  # meta: written by `relay queue flush`, read by the server
PAUSED_PREFIX = "paused:"  # meta: paused:<account> = when; claims skip its messages
HEALTH_KEY = "account_health"  # meta: the server's account health, read by `relay status`
READY = "('queued', 'deferred')"
SENDS_KEPT_S = 2 * 86400.0  # longer than the longest rate-limit window (per_day)

# The numbered migrations, from an empty file: each runs in one transaction that also
# sets the file's user_version to its number (apply_migration), so a crash mid-way leaves
# the version before it and the next run applies it again. Add a step with the next
# number; never change one that has shipped (files out there were made by it).
_V1 = f"""
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
    ON messages (account, priority, next_attempt_at) WHERE state IN {READY};
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
"""
_V2 = """
-- (meta again: the first files of schema 1 were written before it existed)
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- When each account sent, for rate limits across restarts. Kept apart from attempts so
-- that deleting or purging messages never makes a restarted relay forget recent sends.
CREATE TABLE IF NOT EXISTS sends (account TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sends_account_at ON sends (account, at);
"""
_V3 = """
CREATE INDEX IF NOT EXISTS sends_at ON sends (at);
-- Delivered messages by age, for pruning without reading every delivered row.
CREATE INDEX IF NOT EXISTS messages_delivered ON messages (updated_at) WHERE state='delivered';
-- Messages per account and state, kept by triggers in the transaction of every change
-- (the server's and the CLI's alike), so /metrics reads a few rows instead of counting
-- the whole messages table on every scrape.
CREATE TABLE IF NOT EXISTS counts (
    account TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (account, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS counts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO counts (account, state, n) VALUES (NEW.account, NEW.state, 1)
        ON CONFLICT (account, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS counts_delete AFTER DELETE ON messages BEGIN
    UPDATE counts SET n = n - 1 WHERE account = OLD.account AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS counts_update AFTER UPDATE OF state, account ON messages
    WHEN OLD.state IS NOT NEW.state OR OLD.account IS NOT NEW.account BEGIN
    UPDATE counts SET n = n - 1 WHERE account = OLD.account AND state = OLD.state;
    INSERT INTO counts (account, state, n) VALUES (NEW.account, NEW.state, 1)
        ON CONFLICT (account, state) DO UPDATE SET n = n + 1;
END;
-- The counts of the rows already there.
DELETE FROM counts;
INSERT INTO counts (account, state, n)
    SELECT account, state, count(*) FROM messages GROUP BY account, state;
"""
_V4 = """
-- Who holds the claim of a 'sending' row (QueueStore.owner).
ALTER TABLE messages ADD COLUMN owner TEXT;
"""
_V5 = """
-- The SMTP conversation of each attempt, one line per line (`queue show --transcript`).
ALTER TABLE attempts ADD COLUMN transcript TEXT NOT NULL DEFAULT '';
-- Idempotent submission (dedup): the key of each message accepted with one, recorded in
-- the transaction of its enqueue, until expires_at (pruned after).
CREATE TABLE IF NOT EXISTS dedup (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires_at);
-- Webhook events (the outbox): one row per event and webhook, written in the transaction
-- of the outcome that causes it, deleted once sent or given up. Claimed like a message.
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL,
    webhook TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (id, webhook)
);
CREATE INDEX IF NOT EXISTS events_due ON events (next_attempt_at);
"""
_V6 = """
-- Connection slots: a row per upstream connection open (or being opened) to an account,
-- held by one process under a lease, so pool.max_connections holds across processes.
CREATE TABLE IF NOT EXISTS slots (
    account TEXT NOT NULL,
    slot INTEGER NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (account, slot)
) WITHOUT ROWID;
-- Accounts backed off as a whole (down, login refused, quota), for every process: until
-- when, why, and which process may probe once it ends (one at a time across the host).
CREATE TABLE IF NOT EXISTS backoffs (
    account TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL,
    probe_owner TEXT,
    probe_until REAL
);
"""
_V7 = """
-- A group's message on its way through a member account (routing.groups): held against
-- that member's rate windows by the process sending it, from the member's choice until
-- the outcome is recorded, as the member's own claims are by their 'sending' rows.
CREATE TABLE IF NOT EXISTS group_sends (
    message_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS group_sends_account ON group_sends (account);
"""
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "messages, bodies, attempts and meta", _V1),
    (2, "send times kept for rate limits", _V2),
    (3, "per-state counts kept by triggers, indexes for pruning", _V3),
    (4, "the owner of a claim (several processes on one queue)", _V4),
    (5, "dedup keys, the webhook events outbox, each attempt's transcript", _V5),
    (6, "connection slots and account backoffs shared by the processes on one queue", _V6),
    (7, "group sends in flight through a member account, held in its rate windows", _V7),
)
VERSIONS = tuple(version for version, _, _ in MIGRATIONS)
SCHEMA_VERSION = check_numbering(VERSIONS)
# The whole schema of a new file, every step in order (what an empty file becomes).
SCHEMA = "".join(sql for _, _, sql in MIGRATIONS)


def apply_migration(db: sqlite3.Connection, version: int) -> None:
    """Step ``version`` and the user_version it reaches, in one transaction."""
    _, _, sql = MIGRATIONS[version - 1]
    try:
        db.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA application_id = {APPLICATION_ID};"
                         f"\nPRAGMA user_version = {version};\nCOMMIT;")
    except BaseException:
        if db.in_transaction:
            db.rollback()
        raise


# SQLite result codes that mean "cannot write now, try later" (sqlite3.h).
_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 13, 8, 10, 14


def recipients_json(recipients: Iterable[Recipient]) -> str:
    return json.dumps([[r.address, str(r.state), r.reply] for r in recipients])


def row_to_message(row: Sequence[Any]) -> QueuedMessage:
    """relay.queue.rows.row_to_message, the recipients being JSON text in this store."""
    return rows.row_to_message(row, json.loads)


def map_sqlite_error(exc: sqlite3.Error) -> StoreError:
    """One place that turns sqlite errors into the store's temporary/fatal split."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in (
        _SQLITE_FULL,
        _SQLITE_READONLY,
        _SQLITE_IOERR,
        _SQLITE_CANTOPEN,
    ):
        return StoreFullError(f"queue not writable: {exc}")
    return StoreError(f"queue error: {exc}")


# One range scan of the partial index per priority level: strict priority, then
# readiness order within a level (FIFO for new messages).
_PER_LEVEL = (
    "SELECT * FROM (SELECT seq FROM messages WHERE account=:a AND priority={p}"
    f" AND state IN {READY} AND next_attempt_at<=:now ORDER BY next_attempt_at, seq LIMIT :n)"
)


# An account backed off (by any process) claims nothing until its backoff ends; then
# only the process that holds its probe does (QueueStore.take_probe).
_NOT_BACKED_OFF = (" AND NOT EXISTS (SELECT 1 FROM backoffs WHERE account = :a"
                   " AND (until > :now OR probe_owner IS NOT :owner))")


def _claim_sql(levels: Iterable[Priority]) -> str:
    return (
        "UPDATE messages SET state='sending', lease_until=:lease, owner=:owner,"
        " updated_at=:now WHERE seq IN"
        " (SELECT seq FROM ("
        + " UNION ALL ".join(_PER_LEVEL.format(p=int(p)) for p in levels)
        + ") LIMIT :n)"
        # A paused account (`relay accounts pause`) claims nothing, in whichever process.
        + f" AND NOT EXISTS (SELECT 1 FROM meta WHERE key = '{PAUSED_PREFIX}' || :a)"
        + _NOT_BACKED_OFF
        + f" RETURNING {COLUMNS}"
    )


CLAIM_SQL = _claim_sql(Priority)
# High priority alone: first, when the rest may use less of the rate windows
# (rate_limit.reserve_for_high).
CLAIM_HIGH_SQL = _claim_sql([Priority.HIGH])
# One message by id (ack: after_upstream), on the same conditions as CLAIM_SQL.
# A message held for its session's claim (ack: after_upstream) that the session did not
# claim after all: due now. Only while still held as queued (not claimed, moved or retried).
RELEASE_HOLD_SQL = ("UPDATE messages SET next_attempt_at=? WHERE id=? AND state='queued'"
                    " AND next_attempt_at=? AND attempts=0")

CLAIM_ONE_SQL = (
    "UPDATE messages SET state='sending', lease_until=:lease, owner=:owner, updated_at=:now"
    f" WHERE id=:id AND account=:a AND state IN {READY} AND next_attempt_at<=max(:now, :held)"
    # :any false: only high priority may take the share reserve_for_high keeps.
    f" AND (:any OR priority={int(Priority.HIGH)})"
    f" AND NOT EXISTS (SELECT 1 FROM meta WHERE key = '{PAUSED_PREFIX}' || :a)"
    f"{_NOT_BACKED_OFF}"
    f" RETURNING {COLUMNS}"
)
