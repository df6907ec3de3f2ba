"""Locks shared by the server processes of one SQLite data directory (``serve --workers N``).

Each is an ``flock`` on its own file next to the database: the kernel releases it when the
holder exits, even killed, so a crashed worker never leaves a role or the write gate taken.
flock locks belong to an open file, not to a process, so two stores in one process (tests,
a CLI beside a server) exclude each other like two processes do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from fhirvault.adapters.files import create_private
from fhirvault.ports import LostLeadership, WriteTx


def _open(path: Path) -> int:
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            create_private(path)
    return os.open(path, os.O_RDWR)


class WriteGate:
    """One writer transaction at a time across the processes, handed over at once.

    SQLite's own lock would do, but a process that finds it taken polls it with sleeps that grow
    to 100 ms; a blocking flock wakes the next writer as soon as the holder lets go."""

    def __init__(self, path: Path) -> None:
        self._fd = _open(path)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks without the GIL
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class FileLeadership:
    """Leadership (ports.Leadership) for the processes sharing a data directory: one lock file per role.

    A role taken stays with its holder until it closes or exits; the others take it over then."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def lead(self, role: str) -> bool:
        with self._lock:
            if role in self._held:
                return True
            fd = _open(self._dir / f"leader-{role}.lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._held[role] = fd
            return True

    def fence(self, tx: WriteTx, role: str) -> None:
        """A lock file's flock lasts as long as this process keeps its descriptor: it cannot be lost
        behind our back as a database session can, so holding the descriptor is the proof."""
        with self._lock:
            if role not in self._held:
                raise LostLeadership(role)

    def close(self) -> None:
        with self._lock:
            for fd in self._held.values():
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the only descriptor releases the lock
            self._held.clear()


class ServingLock:
    """Held, shared, by every server process of a data directory for its whole life.

    The CLI probes it (``serving``) before commands that must not run under a live server: the
    kernel drops a killed server's hold, so a crash never leaves the directory looking served."""

    def __init__(self, path: Path) -> None:
        self._fd = _open(path)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    @staticmethod
    def serving(path: Path) -> bool:
        """Whether some process holds the lock now (never blocks)."""
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases our probe, if we got it
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
