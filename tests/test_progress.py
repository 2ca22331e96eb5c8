"""Progress bars of long `relay queue` operations: drawn on a terminal, silent when piped.

The terminal is real: `python -m relay queue ...` runs with its stderr on a pseudo-terminal
(os.openpty) of a set width, and the bytes it draws there are read back.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from relay.cli.commands import main
from relay.cli.progress import render
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import AttemptResult, MessageState, NewMessage, Priority, Recipient
from tests.conftest import message

ROOT = Path(__file__).resolve().parent.parent


def test_render_fits_the_width_and_fills_in_proportion() -> None:
    line = render("delete", 2500, 10000, 3.25, 60, "#", "-")
    assert len(line) <= 59
    assert line.startswith("delete  25% [") and line.endswith("]  2500/10000 3.2s")
    bar = line[line.index("[") + 1: line.index("]")]
    assert bar.count("#") == len(bar) // 4 and set(bar) == {"#", "-"}
    assert "[" + "#" * len(bar) + "]" in render("delete", 10000, 10000, 1.0, 60)
    # More done than counted beforehand (the server added some): full, never over 100%.
    assert "100%" in render("retry", 12, 10, 0.0, 60)
    assert render("purge", 42, None, 0.5, 60) == "purge: 42 done 0.5s"  # no total
    assert len(render("delete", 5, 10, 0.1, 20)) <= 19  # too narrow for a bar


@pytest.fixture
def queue_config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "queue": {"path": str(tmp_path / "queue.sqlite3")},
        "accounts": {"outbox": {"transport": "maildir", "path": str(tmp_path / "box")}},
    }))
    return path


async def seed(config: Path, queued: int, deferred: int) -> None:
    store = SQLiteStore(config.parent / "queue.sqlite3", lock=False)
    await store.open()
    now = time.time()
    try:
        for i in range(queued + deferred):
            await store.enqueue(NewMessage(
                id=f"P{i:05d}", sender="app@example.com", recipients=("to@example.com",),
                account="outbox", priority=Priority.NORMAL, body=message(f"m{i}"),
                created_at=now, not_before=now))
        for i in range(queued, queued + deferred):
            await store.finish(AttemptResult(
                id=f"P{i:05d}", account="outbox", state=MessageState.DEFERRED,
                recipients=[Recipient("to@example.com")], attempts=1,
                next_attempt_at=now + 3600, last_error="451 busy", at=now,
                outcome="deferred", reply="451 busy"))
    finally:
        await store.close()


async def test_quiet_when_stderr_is_not_a_terminal(
    queue_config: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    await seed(queue_config, 30, 5)
    for argv, out in ((["retry", "--all"], "5 deferred message(s) queued, due now\n"),
                      (["delete", "--state", "queued"], "deleted 35 queued message(s)\n")):
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["queue", *argv, "--config", str(queue_config)])
        assert (code, *capsys.readouterr()) == (0, out, "")


def _drain(fd: int) -> bytes:
    """Everything written to a pty until the child closes its end (EIO on Linux)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data


def run_on_a_terminal(argv: list[str], *, columns: int, encoding: str,
                      stdout_tty: bool = True) -> tuple[int, str, bytes]:
    """`python -m relay ARGV` with stderr on a pty ``columns`` wide (and stdout on another
    unless ``stdout_tty`` is false: then a pipe); (exit, stdout, stderr's tty bytes)."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out_controller, out_terminal = os.openpty() if stdout_tty else (-1, subprocess.PIPE)
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "relay", *argv], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out_terminal,
                                stderr=terminal)
    finally:
        os.close(terminal)
        if stdout_tty:
            os.close(out_terminal)
    drawn = _drain(controller)  # a command's own output is small: the other pty holds it
    out, _ = proc.communicate(timeout=30)
    if stdout_tty:
        out = _drain(out_controller).replace(b"\r\n", b"\n")
    return proc.returncode, out.decode(), drawn


async def test_no_bar_when_stdout_is_not_a_terminal(queue_config: Path) -> None:
    """`relay queue delete ... | tee log`: a pipeline gets no bar, even on a terminal."""
    await seed(queue_config, 40, 0)
    code, out, drawn = await asyncio.to_thread(
        run_on_a_terminal, ["queue", "delete", "--state", "queued", "--config", str(queue_config)],
        columns=60, encoding="utf-8", stdout_tty=False)
    assert (code, out, drawn) == (0, "deleted 40 queued message(s)\n", b"")


@pytest.mark.parametrize(("encoding", "fill"), [("utf-8", "\u2588"), ("ascii", "#")])
async def test_bar_is_drawn_on_a_terminal_and_cleared(
    queue_config: Path, encoding: str, fill: str,
) -> None:
    await seed(queue_config, 40, 0)
    code, out, drawn = await asyncio.to_thread(
        run_on_a_terminal, ["queue", "delete", "--state", "queued", "--config", str(queue_config)],
        columns=60, encoding=encoding)
    assert (code, out) == (0, "deleted 40 queued message(s)\n")
    text = drawn.decode(encoding)
    frames = [f for f in text.split("\r") if f.strip()]
    assert frames[0].startswith("delete   0% [") and frames[0].rstrip().endswith(" 0/40 0.0s")
    final = frames[-1]
    assert final.startswith("delete 100% [" + fill * 10) and "] 40/40 " in final
    assert all(len(f) <= 59 for f in frames)  # never wraps a 60-column terminal
    assert text.endswith("\r" + " " * len(final) + "\r")  # and leaves the line clean


async def test_nothing_to_do_draws_nothing(queue_config: Path) -> None:
    await seed(queue_config, 3, 0)
    code, out, drawn = await asyncio.to_thread(
        run_on_a_terminal, ["queue", "flush", "--config", str(queue_config)],
        columns=60, encoding="utf-8")
    assert (code, drawn) == (0, b"")
    assert out == "0 deferred message(s) due now; accounts backing off resume\n"
