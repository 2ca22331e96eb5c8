"""Local and upstream faults (issue 5): nothing acknowledged is lost, nothing leaks."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.app import App
from relay.errors import StoreError
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    send_many,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream


def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of its own, so 'disk full' is real and harms nothing else."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    yield from _tmpfs(tmp_path / "small", "1m")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: one 100 KB message cannot fit; grow it with remount_size."""
    yield from _tmpfs(tmp_path / "tiny", "64k")


def remount_size(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


async def test_disk_full_answers_452_and_recovers_by_itself(
    tmp_path: Path, small_disk: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    upstream.fail_data(451, "4.3.0 hold everything", times=10_000)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 600_000)
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          # No reserve: this is the backstop when the disk really fills.
                          queue={"path": str(small_disk / "queue.sqlite3"), "min_free": 0})
    app = await start_relay(config)
    acknowledged: list[str] = []
    refusal = ""
    for i in range(40):
        code, text = await send(app.smtp_port, message(f"fill {i}", body=("z" * 998 + "\r\n") * 40))
        if code == 250:
            acknowledged.append(text.split()[-1])
            continue
        refusal = f"{code} {text}"
        break
    assert refusal.startswith("452 4.3.1"), refusal
    assert acknowledged, "some messages fit before the disk filled"
    for queue_id in acknowledged:  # every 250 is really on disk
        assert await app.store.get(queue_id) is not None

    filler.unlink()  # space returns; no restart
    code, text = await send(app.smtp_port, message("after space returns"))
    assert code == 250, text
    acknowledged.append(text.split()[-1])
    upstream.clear_faults()
    await upstream.wait_for_messages(len(acknowledged), timeout=20)
    received = {m.data.split(b"\r\n")[0] for m in upstream.messages}
    assert len(received) == len(acknowledged)


async def test_maildir_full_disk_never_delivers_a_cut_off_file(
    tmp_path: Path, tiny_disk: Path, start_relay: StartRelay
) -> None:
    """A short write is a temporary failure: nothing reaches new/, the tmp file is
    removed, the message stays queued and is delivered whole once space returns."""
    box = tiny_disk / "box"
    app = await start_relay(relay_config(tmp_path, {"box": {"transport": "maildir",
                                                            "path": str(box)}}))
    body = message("big", body=("y" * 998 + "\r\n") * 100)  # ~100 KB on a 64 KiB disk
    code, text = await send(app.smtp_port, body)
    assert code == 250, text
    queue_id = text.split()[-1]
    await wait_until(lambda: metric(app, "relay_messages_deferred_total", account="box") >= 2,
                     what="two deferred attempts")
    assert metric(app, "relay_messages_delivered_total", account="box") == 0
    assert list((box / "new").iterdir()) == [] and list((box / "tmp").iterdir()) == []
    stored = await app.store.get(queue_id)
    assert stored is not None and "No space left" in stored.last_error

    remount_size(tiny_disk, "1m")  # space returns; no restart
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="box") == 1,
                     what="delivery once space returned")
    [delivered] = list((box / "new").iterdir())
    assert delivered.read_bytes() == b"Return-Path: <app@example.com>\n" + body.replace(
        b"\r\n", b"\n")
    assert list((box / "tmp").iterdir()) == []


async def test_a_full_maildir_disk_backs_the_account_off(
    tmp_path: Path, tiny_disk: Path, start_relay: StartRelay
) -> None:
    """ENOSPC refuses every message alike: the account backs off with one probe at a
    time (was: each message retried on its own, 350 deferrals in 10 s for 70 messages)."""
    box = tiny_disk / "box"
    account = {"transport": "maildir", "path": str(box),
               "retry": {"initial_delay": "300ms", "max_delay": "300ms", "max_age": "1h",
                         "jitter": 0}}
    app = await start_relay(relay_config(tmp_path, {"box": account}))
    (tiny_disk / "filler").write_bytes(b"\0" * 60_000)  # what is left fits no message
    replies = await send_many(app.smtp_port, [message(f"m{i}", body=("x" * 998 + "\r\n") * 5)
                                              for i in range(10)], sessions=2)
    assert all(code == 250 for code, _ in replies)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="box",
                                    reason="disk_full") >= 3, what="three disk-full backoffs")
    backoffs = metric(app, "relay_account_backoffs_total", account="box", reason="disk_full")
    deferred = metric(app, "relay_messages_deferred_total", account="box")
    concurrency = app.config.accounts["box"].pool.max_connections
    assert deferred <= concurrency + backoffs  # not every message, every time
    assert metric(app, "relay_messages_failed_total", account="box") == 0

    (tiny_disk / "filler").unlink()  # space returns; no restart
    remount_size(tiny_disk, "1m")
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="box") == 10,
                     what="all delivered once space returned")


def test_maildir_file_size_limit_is_a_temporary_failure(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (another real short write, then EFBIG) in a child process."""
    script = (
        "import asyncio, resource, signal\n"
        "from pathlib import Path\n"
        "from relay.delivery.maildir import MaildirTransport\n"
        "from relay.errors import TemporaryFailure\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))\n"
        f"box = MaildirTransport('box', Path({str(tmp_path / 'box')!r}))\n"
        "try:\n"
        "    asyncio.run(box.send('a@example.com', ['b@example.com'], b'x' * 50000, ()))\n"
        "except TemporaryFailure as exc:\n"
        "    print('temporary:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("temporary:") and "too large" in done.stdout
    for sub in ("new", "tmp"):
        assert list((tmp_path / "box" / sub).iterdir()) == []


async def test_corrupt_queue_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    config = relay_config(tmp_path, {"up": {"transport": "maildir", "path": str(tmp_path)}})
    app = App(config)
    with pytest.raises(StoreError, match=r"cannot open queue .*not a database"):
        await app.startup()


async def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    db.commit()
    db.close()
    config = relay_config(tmp_path, {"up": {"transport": "maildir", "path": str(tmp_path)}})
    with pytest.raises(StoreError, match="not a relay queue file"):
        await App(config).startup()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM customers").fetchone() == (0,)


async def test_second_relay_on_the_same_queue_is_refused(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    await start_relay(config)
    with pytest.raises(StoreError, match="another relay is already using"):
        await App(config).startup()


async def test_upstream_fault_storm_loses_nothing_and_leaks_no_connections(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Drops, resets, 421s and slow replies in turn: every message arrives, pools stay
    within max_connections, and no connection is left open beyond what a pool keeps."""
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               timeouts={"command": "1s", "data": "1s"})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    upstream.drop_connection_after("RCPT", times=3)
    upstream.drop_connection_after("DATA", times=3)
    upstream.fail_data(421, "4.3.2 closing", times=3)
    upstream.delay("MAIL", 1.5)  # longer than the command timeout: timeouts too
    bodies = [message(f"storm {i}") for i in range(30)]
    replies = await send_many(app.smtp_port, bodies, sessions=5)
    assert all(code == 250 for code, _ in replies)
    await wait_until(lambda: upstream.connections_opened >= 2, what="first attempts")
    upstream.delay("MAIL", 0)
    await upstream.wait_for_messages(30, timeout=30)
    await app.scheduler.run_until_idle()
    subjects = {m.data.split(b"\r\n")[0] for m in upstream.messages}
    assert len(subjects) == 30
    assert upstream.connections_open <= 3
    assert app.transports["up"].open_connections() <= 3


async def test_one_bad_write_fails_alone_and_the_writer_survives(tmp_path: Path) -> None:
    """Text sqlite cannot store (a lone surrogate) fails that message only: the others in
    the same group commit are stored, and the queue keeps accepting afterwards."""
    import asyncio
    import time

    from relay.queue.sqlite.store import SQLiteStore
    from relay.queue.types import NewMessage, Priority

    store = SQLiteStore(tmp_path / "queue.sqlite3")
    await store.open()
    now = time.time()

    def new(mid: str, sender: str) -> NewMessage:
        return NewMessage(id=mid, sender=sender, recipients=("b@example.com",), account="a",
                          priority=Priority.NORMAL, body=b"x", created_at=now, not_before=now)

    try:
        results = await asyncio.gather(
            store.enqueue(new("GOOD1", "a@example.com")),
            store.enqueue(new("BAD", "\udcff@example.com")),
            store.enqueue(new("GOOD2", "a@example.com")),
            return_exceptions=True,
        )
        assert results[0] == "GOOD1" and results[2] == "GOOD2"
        assert isinstance(results[1], StoreError)
        await store.enqueue(new("LATER", "a@example.com"))
        assert {m.id for m in await store.list_messages()} == {"GOOD1", "GOOD2", "LATER"}
    finally:
        await store.close()


async def test_a_connection_without_a_greeting_is_counted(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """relay_upstream_connections_opened_total counts TCP connects (docs/monitoring.md),
    also to a server that never greets (was: 0 after 6 connections)."""
    upstream.delay("GREETING", 30)
    account = upstream_account(upstream, tmp_path, timeouts={"connect": "200ms"},
                               retry={"initial_delay": "100ms", "max_delay": "100ms",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    assert (await send(app.smtp_port, message("silent")))[0] == 250
    await wait_until(lambda: upstream.connections_opened >= 2, what="two connections")
    await wait_until(lambda: metric(app, "relay_upstream_connections_opened_total",
                                    account="up") >= 2, what="them counted")
    assert metric(app, "relay_messages_delivered_total", account="up") == 0
