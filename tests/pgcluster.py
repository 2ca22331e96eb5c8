"""A private PostgreSQL cluster for tests: initdb + pg_ctl into a temp dir, listening only
on a unix socket in that dir, as an unprivileged user (PostgreSQL refuses to run as root:
under root the server runs as ``nobody`` through runuser).

No fsync (a test cluster is thrown away; the relay's own check is synchronous_commit,
which stays on). Tests get a fresh database each, made from template0.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

_BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)
_COUNTER = itertools.count(1)


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for pattern in _BIN_GLOBS:
        for d in sorted(glob.glob(pattern), reverse=True):
            if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
                return Path(d)
    return None


def missing_reason() -> str | None:
    if find_bin_dir() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl) not found: install the postgresql"
                " package (.ci/run does) to run the PostgreSQL store's tests")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as another user"
    return None


class Cluster:
    """One private cluster; ``start``/``stop`` may be called again (fault tests)."""

    def __init__(self, *, fsync: bool = False) -> None:
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.fsync = fsync  # off for tests; on for a benchmark (tests/bench_postgres.py)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody")
            self._as_user = ["runuser", "-u", "nobody", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_user, str(self.bin / tool), *args],
                              capture_output=True, text=True, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        durability = "" if self.fsync else " -c fsync=off -c full_page_writes=off"
        options = (f"-k {self.dir} -c listen_addresses=''{durability}"
                   " -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                  "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={quote(str(self.dir), safe='/')}"

    @staticmethod
    def dbname(url: str) -> str:
        """The database a URL of ``url()``'s form names."""
        return url.split("@/", 1)[1].split("?", 1)[0]

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"relay_{os.getpid()}_{next(_COUNTER)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql)
            return str(cur.fetchall()) if cur.description else ""
