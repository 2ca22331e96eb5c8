"""Issue 18's figure: how soon `relay queue list` starts printing on a 100,000-message queue.

Not a test (no timed assertion): run it and quote the numbers.

    .venv/bin/python -m tests.bench_queue_cli [N]

Builds a queue of N messages (default 100,000: the size `relay bench --queued` builds) in a
temporary directory, then times, for a few listings, the first line through a pipe (what
`| head` sees) and the whole output, with `python -m relay` as an operator runs it.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from relay.queue.sqlite.store import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
CASES = (
    ("list (text)", []),
    ("list --jsonl", ["--jsonl"]),
    ("list --json", ["--json"]),
    ("list --rcpt '*@gmail.com' --jsonl", ["--rcpt", "*@gmail.com", "--jsonl"]),
    ("list --state deferred --error 4.7.0", ["--state", "deferred", "--error", "4.7.0"]),
    ("list --sort next-attempt --limit 20", ["--sort", "next-attempt", "--limit", "20"]),
    ("list --sender nobody (no match)", ["--sender", "nobody"]),
    ("summary --by domain", None),
)


async def build(path: Path, n: int) -> None:
    store = SQLiteStore(path, lock=False)
    await store.open()
    now = time.time()
    try:
        await store.execute([(
            "WITH RECURSIVE i(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM i WHERE k < ?)"
            " INSERT INTO messages (id, state, account, priority, sender, recipients, size,"
            " attempts, created_at, next_attempt_at, last_error, updated_at)"
            " SELECT printf('G%019d', k), iif(k % 3 = 0, 'deferred', 'queued'), 'gmail', 3,"
            " printf('app%d@example.com', k % 50),"
            " printf('[[\"user%d@%s\", \"pending\", \"\"]]', k,"
            " iif(k % 4 = 0, 'gmail.com', 'example.org')), 10240, k % 3,"
            " ? - (? - k) * 0.1, ? + (k % 977), iif(k % 3 = 0, '421 4.7.0 Try again later', ''),"
            " ? FROM i", (n, now, n, now, now)),
            ("INSERT INTO bodies (id, data) SELECT id, zeroblob(10240) FROM messages", ()),
        ])
    finally:
        await store.close()


def first_line_and_total(argv: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "relay", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    first = time.perf_counter() - started
    for _ in proc.stdout:
        pass
    if proc.wait() != 0:
        raise SystemExit(f"relay {' '.join(argv)} failed: {proc.stderr.read().decode()}")
    proc.stderr.close()
    return first, time.perf_counter() - started


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "queue": {"path": str(Path(tmp) / "queue.sqlite3")},
            "accounts": {"gmail": {"transport": "maildir", "path": str(Path(tmp) / "box")}},
            "routing": {"default_account": "gmail"},
        }))
        started = time.perf_counter()
        asyncio.run(build(Path(tmp) / "queue.sqlite3", n))
        print(f"built {n} messages in {time.perf_counter() - started:.1f}s")
        for label, extra in CASES:
            argv = (["queue", "summary", "--by", "domain"] if extra is None
                    else ["queue", "list", *extra])
            runs = [first_line_and_total([*argv, "--config", str(config)]) for _ in range(3)]
            print(f"{label:<40} first line {statistics.median(r[0] for r in runs):.2f}s,"
                  f" all {statistics.median(r[1] for r in runs):.2f}s (median of 3)")


if __name__ == "__main__":
    main()
