"""Which claim owners are alive: a file per owner beside the queue, flock'ed by it.

A process that claims messages holds an exclusive flock on ``<queue>.owners/<owner>`` for
as long as its store is open; the kernel drops the lock when the process dies, SIGKILL
included. Another process can then tell a dead owner from a live one without trusting
pids (reused, and always 1 in a container) or clocks: if it can take the lock itself,
the owner is gone and its claims may go back to the queue at once instead of waiting for
their lease to run out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Owners:
    """The liveness files of one queue."""

    def __init__(self, queue_path: Path) -> None:
        self.folder = queue_path.with_name(queue_path.name + ".owners")
        self._fd: int | None = None
        self._mine: Path | None = None

    def _file(self, owner: str) -> Path:
        return self.folder / _UNSAFE.sub("_", owner)

    def register(self, owner: str, role: str = "") -> None:
        """Hold ``owner``'s file locked until ``release`` (or this process's death); the
        file says ``role`` (what `relay status` lists: 'serve', 'worker 1'...)."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        if self.folder.is_symlink():  # files made through it could land anywhere
            raise OSError(errno.ELOOP, "a symbolic link", str(self.folder))
        path = self._file(owner)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # an instant: nobody else holds a new owner's file
            # A sweep may have removed the file between open and flock (it was not locked
            # yet): a lock on a removed file proves nothing to others. Then again.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.write(fd, f"{os.getpid()} {role}".encode())
        self._fd, self._mine = fd, path

    def sweep(self) -> int:
        """Remove the files of processes that are gone (killed ones leave theirs)."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for path in self.folder.iterdir():
                if path != self._mine and not self._held(path):
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
        return removed

    def alive(self) -> list[tuple[int, str]]:
        """(pid, role) of every live process on this queue that gave a role."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.folder.iterdir()):
                if path == self._mine or not self._held(path):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    pid, _, role = path.read_text().partition(" ")
                    if role:
                        found.append((int(pid), role))
        return found

    @staticmethod
    def _held(path: Path) -> bool:
        return lock_held(path)

    def release(self) -> None:
        if self._fd is None:
            return
        if self._mine is not None:
            with contextlib.suppress(OSError):
                self._mine.unlink()
        os.close(self._fd)
        self._fd = self._mine = None

    def dead(self, owners: set[str]) -> set[str]:
        """Those of ``owners`` whose process is gone (no file, or a file nobody locks).

        ``None``-like owners (claims made before owners were recorded) count as dead.
        """
        gone: set[str] = set()
        for owner in owners:
            if not owner:
                gone.add(owner)
                continue
            path = self._file(owner)
            if path == self._mine:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                gone.add(owner)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process holds it: alive
            finally:
                os.close(fd)
            gone.add(owner)
            with contextlib.suppress(OSError):
                path.unlink()
        return gone


def lock_held(path: Path) -> bool:
    """True while some process holds an flock on ``path``; the lock is taken and let go at
    once otherwise (a process locking it in that instant would find it taken, as it would
    beside any holder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
