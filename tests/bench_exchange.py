"""Issue 14.5's figure: `relay queue export` and `import` of a large queue, time and memory.

Not a test (no timed assertion): run it and quote the numbers.

    .venv/bin/python -m tests.bench_exchange [N] [BODY_BYTES]

Builds a queue of N messages (default 100,000) with bodies of BODY_BYTES (default 2048)
and one attempt record each in a temporary directory, then runs `python -m relay queue
export FILE` and `relay queue import FILE` into an empty queue as an operator would, and
prints each one's wall time and peak resident memory. Streaming shows as a peak that does
not grow with N.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from relay.queue.sqlite.store import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent


async def build(path: Path, n: int, body: int) -> None:
    store = SQLiteStore(path, lock=False)
    await store.open()
    now = time.time()
    try:
        await store.execute([(
            "WITH RECURSIVE i(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM i WHERE k < ?)"
            " INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
            " attempts, created_at, next_attempt_at, last_error, updated_at)"
            " SELECT printf('%022X', k), iif(k % 3 = 0, 'deferred', 'queued'), 'outbox', 3,"
            " printf('app%d@example.com', k % 50),"
            " printf('[[\"user%d@example.org\", \"pending\", \"\"]]', k), ?, k % 3,"
            " ? - (? - k) * 0.1, ? + (k % 977), iif(k % 3 = 0, '421 4.7.0 later', ''),"
            " ? FROM i", (n, body, now, n, now, now)),
            ("INSERT INTO bodies (id, data) SELECT id, randomblob(?) FROM messages", (body,)),
            ("INSERT INTO attempts (message_id, account, at, outcome, reply) SELECT id,"
             " account, updated_at, 'deferred', last_error FROM messages"
             " WHERE state = 'deferred'", ()),
        ])
    finally:
        await store.close()


def config(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "queue": {"path": str(folder / f"{name}.sqlite3")},
        "accounts": {"outbox": {"transport": "maildir", "path": str(folder / "box")}},
        "routing": {"default_account": "outbox"},
    }))
    return path


def timed(*argv: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `relay` command, run alone."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "relay", *argv], cwd=ROOT,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"relay {' '.join(argv)} failed: {done.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest so far
    print(f"    {done.stdout.strip() or done.stderr.strip()}")
    return elapsed, peak


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    body = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    with tempfile.TemporaryDirectory(prefix="relay-bench-exchange-") as tmp:
        folder = Path(tmp)
        src, dst = config(folder, "src"), config(folder, "dst")
        asyncio.run(build(folder / "src.sqlite3", n, body))
        size = (folder / "src.sqlite3").stat().st_size / 2**20
        print(f"queue of {n} messages, {body}-byte bodies: {size:.0f} MiB")
        export = folder / "queue.jsonl"
        seconds, peak = timed("queue", "export", str(export), "-c", str(src))
        print(f"export: {seconds:.1f} s ({n / seconds:,.0f} messages/s),"
              f" file {export.stat().st_size / 2**20:.0f} MiB, peak RSS so far {peak:.0f} MiB")
        seconds, peak = timed("queue", "import", str(export), "-c", str(dst))
        print(f"import: {seconds:.1f} s ({n / seconds:,.0f} messages/s),"
              f" peak RSS so far {peak:.0f} MiB")


if __name__ == "__main__":
    main()
