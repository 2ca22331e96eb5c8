"""Issue 14.5: numbered schema migrations, and the refusals of older and newer queues."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from relay.errors import SchemaError
from relay.queue.migrations import check_numbering, plan
from relay.queue.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, apply_migration
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import NewMessage, Priority
from tests.test_growth import _row, _schema_2_file

OLDER = (f"queue schema 2 is older than this relay (knows {SCHEMA_VERSION}): run `relay queue"
         " migrate` (it backs the queue up first), or start with `relay serve --migrate`")


def _newer(found: int) -> str:
    return (f"queue schema {found} is newer than this relay (knows {SCHEMA_VERSION}): upgrade"
            " relay, or restore the backup taken before the upgrade")


# -- the plan (pure) ---------------------------------------------------------------------
def test_plan_says_up_to_date_needs_or_newer() -> None:
    assert plan(5, 5).up_to_date and plan(5, 5).missing == ()
    older = plan(2, 5)
    assert (older.missing, older.new, older.newer, older.up_to_date) == ((3, 4, 5), False,
                                                                        False, False)
    assert plan(0, 3).new and plan(0, 3).missing == (1, 2, 3)
    newer = plan(7, 5)
    assert newer.newer and newer.missing == ()
    assert str(newer.refusal()) == ("queue schema 7 is newer than this relay (knows 5): upgrade"
                                    " relay, or restore the backup taken before the upgrade")
    assert (newer.refusal().found, newer.refusal().known) == (7, 5)
    assert "run `relay queue migrate`" in str(older.refusal())
    with pytest.raises(ValueError, match="start at"):
        plan(-1, 5)


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert check_numbering([1, 2, 3]) == 3
    for bad in ([1, 3], [2, 3], [1, 1, 2]):
        with pytest.raises(ValueError, match=r"numbered 1\.\.N"):
            check_numbering(bad)
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


# -- the SQLite store ----------------------------------------------------------------------
def _shape(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, list[str]], int]:
    """Every table, index and trigger with its SQL, each table's columns, and the version."""
    db = sqlite3.connect(path)
    try:
        objects = sorted(db.execute("SELECT type, name, sql FROM sqlite_master"
                                    " WHERE name NOT LIKE 'sqlite_%'"))
        columns = {name: [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
                   for _, name, _ in objects if _ == "table"}
        return objects, columns, db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def _file_at(path: Path, version: int) -> None:
    """A queue file as each numbered step left it at ``version``."""
    db = sqlite3.connect(path)
    try:
        for v in range(1, version + 1):
            apply_migration(db, v)
    finally:
        db.close()


async def test_a_new_file_is_created_without_being_asked(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    assert await store.schema_version() == 0
    await store.open()
    try:
        assert store.applied == list(range(1, SCHEMA_VERSION + 1))
        assert await store.schema_version() == SCHEMA_VERSION
    finally:
        await store.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_every_older_version_migrates_to_the_shape_of_a_new_file(
        tmp_path: Path, version: int) -> None:
    fresh, old = tmp_path / "fresh.sqlite3", tmp_path / "old.sqlite3"
    await SQLiteStore(fresh).migrate()
    _file_at(old, version)
    assert await SQLiteStore(old).schema_version() == version
    assert await SQLiteStore(old).migrate() == list(range(version + 1, SCHEMA_VERSION + 1))
    assert _shape(old) == _shape(fresh)
    assert await SQLiteStore(old).migrate() == []  # idempotent


async def test_the_frozen_schema_2_file_migrates_to_the_shape_of_a_new_file(
        tmp_path: Path) -> None:
    """A file as relay wrote it at schema 2 (tests/test_growth.py), not as the steps
    would: the steps from 3 on bring it to exactly a new file's tables and indexes."""
    fresh, old = tmp_path / "fresh.sqlite3", tmp_path / "old.sqlite3"
    await SQLiteStore(fresh).migrate()
    _schema_2_file(old, [_row(1, "queued", time.time())])
    await SQLiteStore(old).migrate()
    objects, columns, version = _shape(old)
    f_objects, f_columns, f_version = _shape(fresh)
    assert (columns, version) == (f_columns, f_version)
    # The same objects; only whitespace and comments of the CREATE statements may differ.
    assert [(t, n) for t, n, _ in objects] == [(t, n) for t, n, _ in f_objects]


async def test_an_older_file_is_refused_unless_migrating_and_left_untouched(
        tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    _schema_2_file(path, [_row(1, "queued", time.time())])
    before = path.read_bytes()
    store = SQLiteStore(path, lock=False)
    with pytest.raises(SchemaError) as refused:
        await store.open()
    assert str(refused.value) == OLDER
    assert (refused.value.found, refused.value.known) == (2, SCHEMA_VERSION)
    assert path.read_bytes() == before and await store.schema_version() == 2
    store = SQLiteStore(path, lock=False, migrate=True)
    await store.open()
    try:
        assert store.applied == list(range(3, SCHEMA_VERSION + 1))
        assert [m.id for m in await store.list_messages()] == ["OLD00001"]
    finally:
        await store.close()


async def test_a_newer_file_is_refused_even_when_migrating(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    await SQLiteStore(path).migrate()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    for store in (SQLiteStore(path), SQLiteStore(path, migrate=True)):
        with pytest.raises(SchemaError) as refused:
            await store.open()
        assert str(refused.value) == _newer(SCHEMA_VERSION + 3)
        with pytest.raises(SchemaError):
            await store.migrate()
    assert await SQLiteStore(path).schema_version() == SCHEMA_VERSION + 3


async def test_each_step_commits_alone_so_a_failed_step_keeps_the_ones_before(
        tmp_path: Path) -> None:
    """A step that fails is rolled back whole (its version is not recorded), and the steps
    before it stay applied: the next run starts from there."""
    path = tmp_path / "queue.sqlite3"
    _file_at(path, 2)
    with sqlite3.connect(path) as db:  # makes the last step (a new column) fail
        db.execute("ALTER TABLE messages ADD COLUMN owner TEXT")
    with pytest.raises(Exception, match="duplicate column"):
        await SQLiteStore(path).migrate()
    assert await SQLiteStore(path).schema_version() == SCHEMA_VERSION - 1
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='counts'"
                          ).fetchone() == (1,)
    finally:
        db.close()


async def test_a_store_open_on_a_migrated_file_works(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    _file_at(path, 1)
    await SQLiteStore(path).migrate()
    store = SQLiteStore(path)
    await store.open()
    try:
        now = time.time()
        await store.enqueue(NewMessage("N1", "a@example.com", ("b@example.com",), "up",
                                       Priority.NORMAL, b"x", now, now))
        (claimed,) = await store.claim_due("up", now, 5, lease_s=30)
        assert claimed.claim is not None and await store.counts() == {("up", "sending"): 1}
        assert await store.migrate() == []
    finally:
        await store.close()
