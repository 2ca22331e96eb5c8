"""Issue 14's figure: messages per second through 1, 2 and 3 `relay serve` processes on one
PostgreSQL queue, beside one relay on SQLite. Not a test (no timed assertion): run it and
quote the numbers.

    .venv/bin/python -m tests.bench_postgres [MESSAGES]

Starts a private PostgreSQL cluster (tests/pgcluster.py, fsync on: a commit is a real
flush, as in production) and the test upstream (tests/upstream.py) in this process, then
for each setup sends MESSAGES messages over 12 SMTP sessions spread over the relays and
reports how soon every one was answered 250 (accepted/s) and how soon the upstream had
them all (delivered/s).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import FAST_RETRY, message, send_many, upstream_account
from tests.pgcluster import Cluster
from tests.relayproc import RelayProcess, free_port
from tests.upstream import FakeUpstream

SESSIONS = 12


def _config(tmp: Path, up: FakeUpstream, queue: dict[str, Any], n: int) -> Path:
    data = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "metrics": {"enabled": False},
        "queue": queue,
        "retry": dict(FAST_RETRY),
        "logging": {"level": "info"},  # (the `started` line is how RelayProcess waits)
        "accounts": {"up": upstream_account(up, tmp)},
        "routing": {"default_account": "up"},
    }
    path = tmp / f"relay-{n}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def run(label: str, queue: dict[str, Any], relays: int, total: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with FakeUpstream() as up:
            procs = [await RelayProcess.spawn(_config(tmp, up, queue, n), cwd=tmp)
                     for n in range(relays)]
            try:
                for p in procs:
                    await p.wait_started()
                bodies = [message(f"b{i}") for i in range(total)]
                per = [bodies[k::relays] for k in range(relays)]
                started = time.monotonic()
                replies = await asyncio.gather(*(
                    send_many(p.port, part, sessions=SESSIONS // relays)
                    for p, part in zip(procs, per, strict=True)))
                accepted = time.monotonic() - started
                bad = sum(code != 250 for part in replies for code, _ in part)
                await up.wait_for_messages(total, timeout=300)
                delivered = time.monotonic() - started
            finally:
                for p in procs:
                    await p.kill()
    print(f"{label:<28} {total / accepted:8.0f} accepted/s {total / delivered:8.0f}"
          f" delivered/s  (refused: {bad})", flush=True)


async def main(total: int) -> None:
    cluster = Cluster(fsync=True)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as d:
            await run("SQLite, 1 relay", {"path": str(Path(d) / "q.sqlite3")}, 1, total)
        for relays in (1, 2, 3):
            url = cluster.create_database()
            await run(f"PostgreSQL, {relays} relay(s)", {"url": url}, relays, total)
    finally:
        cluster.remove()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
