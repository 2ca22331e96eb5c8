"""The PostgreSQL queue's schema as numbered migrations, the claim statement, and the
mapping between rows and the queue's types.

Times are epoch seconds in double precision, as the SQLite store keeps them, so both
stores compare and return the same values. Recipients are jsonb lists of
[address, state, reply], the SQLite store's JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

from psycopg.types.json import Jsonb

from relay.queue.migrations import check_numbering
from relay.queue.rows import COLUMNS as COLUMNS
from relay.queue.rows import row_to_message as row_to_message  # jsonb comes decoded
from relay.queue.types import Priority, Recipient

READY = "('queued', 'deferred')"
SENDS_KEPT_S = 2 * 86400.0  # longer than the longest rate-limit window (per_day)
FLUSH_KEY = "flush_requested_at"  # meta: written by `relay queue flush`
HEALTH_KEY = "account_health"  # meta: the server's account health, read by `relay status`
CHANNEL = "relay_wake"  # NOTIFY payload: "<owner> <account>", or "<owner> *" for any change
# pg_advisory_xact_lock keys ('RELY' and a number): one migrator, one pruner at a time.
MIGRATE_LOCK = 0x52454C59_0001
PRUNE_LOCK = 0x52454C59_0002
# pg_advisory_lock (a session's, on the LISTEN connection): the relay holding it exports
# the queue-wide gauges; when it dies its session ends and another relay takes over.
REPORT_LOCK = 0x52454C59_0003

# (version, name, SQL): applied in order, each in the transaction that records it in
# relay_schema, under MIGRATE_LOCK. Never edit one that has shipped: add the next.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "initial queue", f"""
CREATE TABLE messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    state text NOT NULL,
    account text NOT NULL,
    priority integer NOT NULL,
    sender text NOT NULL,
    recipients jsonb NOT NULL,
    size bigint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    lease_until double precision,
    owner text,          -- the store that holds a 'sending' row (QueueStore.owner)
    claim_token text,    -- which of its claims: every settling write names it
    last_error text NOT NULL DEFAULT '',
    updated_at double precision NOT NULL,
    mail_options text NOT NULL DEFAULT ''
);
-- The claim's scan: one account's ready rows in priority, then readiness order.
CREATE INDEX messages_ready ON messages (account, priority, next_attempt_at, seq)
    WHERE state IN {READY};
CREATE INDEX messages_state ON messages (state, account);
CREATE INDEX messages_delivered ON messages (updated_at) WHERE state = 'delivered';
-- Finished rows churn: vacuum the hot table early so SKIP LOCKED scans stay short.
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.01,
                          autovacuum_vacuum_threshold = 1000);
CREATE TABLE bodies (id text PRIMARY KEY, data bytea NOT NULL);
CREATE TABLE attempts (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL,
    account text NOT NULL,
    at double precision NOT NULL,
    outcome text NOT NULL,
    reply text NOT NULL,
    transcript text NOT NULL DEFAULT ''  -- the attempt's SMTP conversation, lines joined by \n
);
CREATE INDEX attempts_message ON attempts (message_id);
CREATE INDEX attempts_account_at ON attempts (account, at);
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
-- When each account sent, for rate limits across relays and restarts; message_id makes a
-- retried finish (its first commit's reply lost) count its send once.
CREATE TABLE sends (account text NOT NULL, at double precision NOT NULL, message_id text);
CREATE INDEX sends_account_at ON sends (account, at);
CREATE INDEX sends_at ON sends (at);
-- One row per account, locked (FOR UPDATE) by a claim that checks rate windows: two
-- relays cannot both take the last place of a window.
CREATE TABLE accounts (name text PRIMARY KEY);
CREATE TABLE paused (account text PRIMARY KEY, at double precision NOT NULL);
-- Owner liveness across hosts: each open store refreshes its row; an expired row is a
-- dead owner, whose claims go back to the queue at once.
CREATE TABLE processes (
    owner text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    role text NOT NULL,
    expires_at double precision NOT NULL  -- the database's clock (clock_timestamp())
);
-- Connection slots: a row per upstream connection open (or being opened) to an account,
-- held by one owner under a lease, so pool.max_connections holds across relays.
CREATE TABLE slots (
    account text NOT NULL,
    slot integer NOT NULL,
    owner text NOT NULL,
    lease_until double precision NOT NULL,
    PRIMARY KEY (account, slot)
);
-- Accounts backed off as a whole, for every relay: until when, why, and which owner may
-- probe once it ends (one at a time across all relays).
CREATE TABLE backoffs (
    account text PRIMARY KEY,
    until double precision NOT NULL,
    reason text NOT NULL,
    probe_owner text,
    probe_until double precision
);
-- Folded into migration 1 (dedup, the events outbox, attempts.transcript: the SQLite
-- queue's version 5), since this schema has not shipped yet.
-- Idempotent submission (dedup): each key accepted, recorded in its enqueue's
-- transaction (unique: of concurrent submissions one wins), until expires_at (pruned).
CREATE TABLE dedup (
    key text PRIMARY KEY,
    message_id text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE INDEX dedup_expires ON dedup (expires_at);
-- Webhook events (the outbox): one row per event and webhook, written in the transaction
-- of the outcome that causes it, deleted once sent or given up; claimed like a message.
CREATE TABLE events (
    id text NOT NULL,
    webhook text NOT NULL,
    type text NOT NULL,
    body text NOT NULL,
    created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    owner text,
    lease_until double precision,
    last_error text NOT NULL DEFAULT '',
    PRIMARY KEY (id, webhook)
);
CREATE INDEX events_due ON events (next_attempt_at);
"""),
    (2, "group sends in flight through a member account", """
-- A group's message on its way through a member account (routing.groups): held against
-- that member's rate windows by the relay sending it, from the member's choice until the
-- outcome is recorded, as the member's own claims are by their 'sending' rows.
CREATE TABLE group_sends (
    message_id text PRIMARY KEY,
    account text NOT NULL,
    owner text NOT NULL,
    lease_until double precision NOT NULL
);
CREATE INDEX group_sends_account ON group_sends (account);
"""),
]
SCHEMA_VERSION = check_numbering([number for number, _, _ in MIGRATIONS])
SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS relay_schema (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


# One range scan of the ready index per priority level, each locking what it takes
# (FOR UPDATE SKIP LOCKED: rows another relay is claiming are passed over, not waited
# for), then strict priority and readiness order over the three, in a CTE so that the
# LIMIT is applied once (Oban #652). A level full of messages deferred to later costs one
# index probe, not a scan of every one of them.
_LEVEL = f"""
    p{{p}} AS (
        SELECT seq, priority, next_attempt_at FROM messages
        WHERE account = %(a)s AND priority = {{p}} AND state IN {READY}
          AND next_attempt_at <= %(now)s
        ORDER BY next_attempt_at, seq LIMIT %(n)s FOR UPDATE SKIP LOCKED
    )"""
NOT_BACKED_OFF = ("NOT EXISTS (SELECT 1 FROM backoffs b WHERE b.account = %(a)s"
                  " AND (b.until > %(now)s OR b.probe_owner IS DISTINCT FROM %(owner)s))")
RETURNED = ", ".join("m." + c.strip() for c in COLUMNS.split(","))


def _claim_sql(levels: Iterable[Priority]) -> str:
    return (
        "WITH" + ",".join(_LEVEL.format(p=int(p)) for p in levels) + """,
    picked AS (
        SELECT seq FROM ("""
        + " UNION ALL ".join(f"SELECT * FROM p{int(p)}" for p in levels)
        + f""") x
        WHERE NOT EXISTS (SELECT 1 FROM paused WHERE paused.account = %(a)s)
          -- backed off (by any relay): nothing until it ends, then only for its prober
          AND {NOT_BACKED_OFF}
        ORDER BY priority, next_attempt_at, seq LIMIT %(n)s
    )
UPDATE messages m SET state = 'sending', lease_until = %(lease)s, owner = %(owner)s,
    claim_token = %(token)s, updated_at = %(now)s
FROM picked WHERE m.seq = picked.seq
RETURNING {RETURNED}
"""
    )


CLAIM_SQL = _claim_sql(Priority)
# High priority alone: first, when the rest may use less of the rate windows
# (rate_limit.reserve_for_high).
CLAIM_HIGH_SQL = _claim_sql([Priority.HIGH])
# One message by id (ack: after_upstream), on CLAIM_SQL's conditions; %(any)s false: only
# if it is HIGH priority (the others' share of a window is used up). A concurrent claim of
# the same row waits for this one, then finds it no longer ready.
# A message held for its session's claim (ack: after_upstream) that the session did not
# claim after all: due now. Only while still held as queued (not claimed, moved or retried).
RELEASE_HOLD_SQL = ("UPDATE messages SET next_attempt_at = %s WHERE id = %s AND state = 'queued'"
                    " AND next_attempt_at = %s AND attempts = 0 RETURNING account")

CLAIM_ONE_SQL = f"""
UPDATE messages m SET state = 'sending', lease_until = %(lease)s, owner = %(owner)s,
    claim_token = %(token)s, updated_at = %(now)s
WHERE m.id = %(id)s AND m.account = %(a)s AND m.state IN {READY}
  AND m.next_attempt_at <= GREATEST(%(now)s, %(held)s)
  AND (%(any)s OR m.priority = {int(Priority.HIGH)})
  AND NOT EXISTS (SELECT 1 FROM paused WHERE paused.account = %(a)s)
  AND {NOT_BACKED_OFF}
RETURNING {RETURNED}
"""


def recipients_json(recipients: Iterable[Recipient]) -> Jsonb:
    return Jsonb([[r.address, str(r.state), r.reply] for r in recipients])
