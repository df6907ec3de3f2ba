"""Durable file writes: data on disk (fsync) and its directory entry too, before we say it is saved."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_private(path: Path) -> None:
    """Create ``path`` empty, owner-only, unless it exists: SQLite then gives its -wal and -shm files the same mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist), write all of ``data`` and fsync it; the caller syncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, directory fsync)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_new(tmp, data, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)
