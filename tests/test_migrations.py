"""Issue 14.5: numbered schema migrations, and the refusals of older and newer queues."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from relay.cli.commands import main
from relay.errors import SchemaError
from relay.queue.migrations import check_numbering, plan
from relay.queue.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, apply_migration
from relay.queue.sqlite.store import SQLiteStore, server_lock_path
from relay.queue.types import NewMessage, Priority
from tests.conftest import Launch
from tests.relayproc import RelayProcess, write_config
from tests.test_growth import _row, _schema_2_file
from tests.upstream import FakeUpstream

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
    with sqlite3.connect(path) as db:  # makes step 4 (a new column) fail
        db.execute("ALTER TABLE messages ADD COLUMN owner TEXT")
    with pytest.raises(Exception, match="duplicate column"):
        await SQLiteStore(path).migrate()
    assert await SQLiteStore(path).schema_version() == 3
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


# -- the commands -------------------------------------------------------------------------
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "accounts": {"outbox": {"transport": "maildir", "path": str(tmp_path / "box")}},
        "routing": {"default_account": "outbox"},
    }))
    return path


def _relay(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def _backups(folder: Path) -> list[Path]:
    return sorted(folder.glob("queue.sqlite3.schema-2.*.bak"))


def test_queue_migrate_backs_up_then_migrates_and_is_idempotent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(1, "queued", time.time())])
    code, out, err = _relay(capsys, "queue", "migrate", "-c", str(config))
    assert code == 0, err
    (backup,) = _backups(tmp_path)
    assert out == (f"backed up {queue} (schema 2) to {backup}\n"
                   f"migrated {queue} from schema 2 to {SCHEMA_VERSION}"
                   f" (applied {', '.join(map(str, range(3, SCHEMA_VERSION + 1)))})\n")
    assert (_version(backup), _version(queue)) == (2, SCHEMA_VERSION)
    assert _relay(capsys, "queue", "migrate", "-c", str(config))[:2] == (
        0, f"queue schema {SCHEMA_VERSION} is up to date: nothing to migrate\n")
    assert _relay(capsys, "queue", "list", "-c", str(config))[0] == 0

    again = tmp_path / "again.sqlite3"
    _schema_2_file(again, [])
    config.write_text(config.read_text().replace("queue.sqlite3", "again.sqlite3"))
    chosen = tmp_path / "before.sqlite3"
    code, out, _ = _relay(capsys, "queue", "migrate", "--backup", str(chosen), "-c", str(config))
    assert code == 0 and f"to {chosen}\n" in out and _version(chosen) == 2
    _schema_2_file(tmp_path / "third.sqlite3", [])
    config.write_text(config.read_text().replace("again.sqlite3", "third.sqlite3"))
    code, out, _ = _relay(capsys, "queue", "migrate", "--no-backup", "-c", str(config))
    assert code == 0 and out.startswith("migrated ") and "backed up" not in out
    assert not list(tmp_path.glob("third.sqlite3.*.bak"))


def test_no_command_reads_an_older_queue_or_migrates_it_silently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(1, "queued", time.time())])
    before = queue.read_bytes()
    code, out, _ = _relay(capsys, "queue", "check", "-c", str(config))  # says, reads only
    assert code == 0 and out.endswith(
        f"{queue}: schema 2 is older than this relay's ({SCHEMA_VERSION}): `relay queue"
        " migrate` brings it up to date\n")
    for argv in (["queue", "list"], ["queue", "show", "OLD00001"], ["queue", "summary"],
                 ["status"], ["queue", "retry", "--all", "--yes"], ["accounts", "pause",
                                                                    "outbox"]):
        code, out, err = _relay(capsys, *argv, "-c", str(config))
        assert (code, out, err) == (1, "", f"relay: {OLDER}\n"), argv
    assert queue.read_bytes() == before


def test_every_command_refuses_a_newer_queue(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    assert _relay(capsys, "queue", "migrate", "-c", str(config))[0] == 0  # no queue yet
    _file_at(queue, SCHEMA_VERSION)
    with sqlite3.connect(queue) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for argv in (["queue", "list"], ["status"], ["queue", "migrate"], ["queue", "export", "-"],
                 ["queue", "summary"]):
        code, _, err = _relay(capsys, *argv, "-c", str(config))
        assert (code, err) == (1, f"relay: {_newer(SCHEMA_VERSION + 1)}\n"), argv
    assert _version(queue) == SCHEMA_VERSION + 1


def test_queue_migrate_says_when_there_is_no_queue_yet(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    code, out, _ = _relay(capsys, "queue", "migrate", "-c", str(config))
    assert (code, out) == (0, f"no queue yet at {tmp_path / 'queue.sqlite3'}: nothing to"
                              f" migrate (relay creates it at schema {SCHEMA_VERSION})\n")
    assert not (tmp_path / "queue.sqlite3").exists()


def test_queue_migrate_refuses_while_a_relay_runs_on_the_queue(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [])
    holder = os.open(server_lock_path(queue), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as a running `relay serve` (of any version)
        code, out, err = _relay(capsys, "queue", "migrate", "-c", str(config))
    finally:
        os.close(holder)
    assert (code, out) == (1, "")
    assert err == f"relay: a relay is running on {queue}: stop it before migrating\n"
    assert _version(queue) == 2 and not list(tmp_path.glob("*.bak"))


async def test_serve_refuses_an_older_queue_and_starts_with_migrate(
        tmp_path: Path, upstream: FakeUpstream, launch: Launch) -> None:
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(1, "queued", time.time())])
    config = write_config(tmp_path, upstream)
    refused = await launch(config)
    assert await refused.exit_code(within=20) == 1
    assert f"relay: {OLDER}" in refused.lines and _version(queue) == 2
    supervised = await RelayProcess.spawn(config, cwd=tmp_path, workers=2)
    try:
        assert await supervised.exit_code(within=20) == 1
    finally:
        await supervised.kill()
    assert "start_failed" in supervised.stderr and OLDER in supervised.stderr
    assert _version(queue) == 2
    relay = await launch(config, "--migrate")
    await relay.wait_started()
    await upstream.wait_for_messages(1)
    assert any("queue_migrated" in line and "schema_from=2" in line for line in relay.lines)
    assert _version(queue) == SCHEMA_VERSION
    (backup,) = _backups(tmp_path)
    assert _version(backup) == 2


def test_queue_migrate_refuses_a_foreign_file_as_serve_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "no queue yet: nothing to migrate", exit 0, for a file of other data."""
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    with sqlite3.connect(queue) as db:
        db.execute("CREATE TABLE mine (x)")
    db.close()
    before = queue.read_bytes()
    refusal = f"relay: {queue} is not a relay queue file (it holds other data)\n"
    assert _relay(capsys, "queue", "migrate", "-c", str(config)) == (1, "", refusal)
    assert queue.read_bytes() == before and list(tmp_path.glob("*.bak")) == []
    assert _relay(capsys, "queue", "list", "-c", str(config)) == (1, "", refusal)  # the same


def test_queue_migrate_removes_a_backup_that_does_not_check_clean(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(i, "queued", time.time()) for i in range(400)])
    data = bytearray(queue.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    data[3 * page + 8: 3 * page + 400] = b"\xff" * 392  # a damaged page, header intact
    queue.write_bytes(bytes(data))
    code, out, err = _relay(capsys, "queue", "migrate", "-c", str(config))
    assert (code, out) == (1, "")
    assert err.startswith("relay: the backup ") and "does not check clean" in err
    assert "removed it; nothing migrated" in err
    assert _backups(tmp_path) == [] and _version(queue) == 2


@pytest.mark.parametrize("argv", [["queue", "backup", "{missing}/x.bak"],
                                  ["queue", "migrate", "--backup", "{missing}/x.bak"]])
def test_a_backup_into_a_missing_folder_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    config = _config(tmp_path)
    queue = tmp_path / "queue.sqlite3"
    _schema_2_file(queue, [_row(1, "queued", time.time())])
    missing = tmp_path / "nonexistent" / "dir"
    argv = [a.format(missing=missing) for a in argv]
    code, out, err = _relay(capsys, *argv, "-c", str(config))
    assert (code, out, err) == (1, "", f"relay: cannot write the backup {missing}/x.bak: No such"
                                       " file or directory\n")
    assert _version(queue) == 2
