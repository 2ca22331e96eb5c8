"""Backing up and checking a queue file, beside a running server or with none.

A backup uses SQLite's online backup API in one step: one read transaction, so the copy
is the queue as it was at one commit (WAL lets the server keep writing meanwhile). `cp`
of a live queue can copy the main file and its -wal from different moments.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import StoreError
from relay.queue.migrations import plan
from relay.queue.sqlite.schema import APPLICATION_ID, SCHEMA_VERSION


@dataclass(frozen=True)
class QueueCheck:
    """What `relay queue check` found in one file."""

    path: Path
    schema: int
    integrity: list[str]  # ["ok"] when sound
    counts: dict[str, int] = field(default_factory=dict)  # messages by state
    problems: list[str] = field(default_factory=list)
    known: int = SCHEMA_VERSION  # this relay's schema

    @property
    def older(self) -> bool:
        """Sound, but `relay queue migrate` must bring it up to date before use."""
        return 0 < self.schema < self.known

    @property
    def ok(self) -> bool:
        return not self.problems


def backup(source: Path, dest: Path) -> QueueCheck:
    """Copy the queue at ``source`` to ``dest`` (which must not exist), consistently, and
    check the copy. The copy is written beside ``dest`` and renamed into place, so a
    failed backup never leaves a half file under the name asked for."""
    if not source.is_file():
        raise StoreError(f"no queue at {source}")
    if dest.exists():
        raise StoreError(f"{dest} already exists; give a new name (a backup never overwrites)")
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # mail is private
    except OSError as exc:  # e.g. no such directory
        raise StoreError(f"cannot write the backup {dest}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
        try:
            src.execute("PRAGMA busy_timeout = 10000")
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # pages=-1: all in one step, one snapshot
                # A single self-contained file: no -wal beside the backup.
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {source}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return check(dest)


def refuse_foreign(path: Path) -> None:
    """StoreError when ``path`` is an SQLite file of other data (tables, and not relay's
    application_id), as opening it as a queue would be refused; read-only."""
    if not path.is_file() or not path.stat().st_size:
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    if tables and app_id != APPLICATION_ID:
        raise StoreError(f"{path} is not a relay queue file (it holds other data)")


def file_version(path: Path) -> int:
    """The schema version of the queue file at ``path``, read-only: 0 when there is no
    file yet (or an empty one). Never migrates or writes."""
    if not path.exists() or not path.stat().st_size:
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the schema of {path}: {exc}") from None


def check(path: Path) -> QueueCheck:
    """Read-only: is this a relay queue, of which schema, and is SQLite's integrity check
    clean? Never migrates or writes."""
    if not path.is_file():
        raise StoreError(f"no queue at {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        return _check(db, path)
    except sqlite3.DatabaseError as exc:
        return QueueCheck(path, 0, [str(exc)], problems=[f"damaged or not SQLite: {exc}"])
    finally:
        db.close()


def _check(db: sqlite3.Connection, path: Path) -> QueueCheck:
    db.execute("PRAGMA busy_timeout = 10000")
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    problems = []
    if app_id != APPLICATION_ID:
        problems.append("not a relay queue file (application_id differs)")
        return QueueCheck(path, version, [], problems=problems)
    found = plan(version, SCHEMA_VERSION)
    if found.newer:
        problems.append(str(found.refusal()))
    integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        problems += [f"integrity: {line}" for line in integrity[:20]]
    counts = {state: n for state, n in
              db.execute("SELECT state, count(*) FROM messages GROUP BY state ORDER BY state")}
    return QueueCheck(path, version, integrity, counts, problems)
