"""``file:///path``: a backup target in a local (or mounted) directory.

Each object is a file under the root. ``put`` writes a temp file, fsyncs it,
renames it into place and fsyncs the directory, so a crash leaves either the
whole object or nothing (a stray ``.tmp-*`` file at worst, never listed).

Retention (``object_lock_days``) works as on S3 for fhirvault itself: a put
that asks for it records the date beside the object (``.retain-<name>``, never
listed) and leaves the file read-only; ``delete`` refuses until then
(``TargetImmutable``), so ``prune`` keeps those backups and chunks as it does
under S3 object lock. It does not stop someone with shell access to the
directory: use an S3 target with object lock (COMPLIANCE mode) for that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from fhirvault.adapters.files import fsync_dir, write_new
from fhirvault.backup.target import TargetError, TargetImmutable, TargetNotFound, TargetUnavailable

_TMP = ".tmp-"
_RETAIN = ".retain-"


def path_from_url(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise TargetError(f"not a local target URL (expected file:///absolute/path): {url}")
    return Path(unquote(parsed.path))


class FileTarget:
    def __init__(self, root: Path, location: str) -> None:
        self._root = root.absolute()
        self._location = location

    @classmethod
    def from_url(cls, url: str, location: str) -> FileTarget:
        return cls(path_from_url(url), location)

    @property
    def url(self) -> str:
        return self._root.as_uri()

    @property
    def location(self) -> str:
        return self._location

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith((_TMP, _RETAIN)) for p in parts):
            raise TargetError(f"invalid object key: {key!r}")
        return self._root.joinpath(*parts)

    @staticmethod
    def _retain_path(path: Path) -> Path:
        return path.with_name(_RETAIN + path.name)

    def retained_until(self, key: str) -> int | None:
        """The retention date (ms) recorded for ``key``, if any."""
        try:
            return int(self._retain_path(self._path(key)).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        path = self._path(key)
        tmp = path.with_name(_TMP + secrets.token_hex(6))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if retain_until_ms is not None:
                # Recorded before the object appears; a renewal never shortens a retention already given.
                until = max(retain_until_ms, self.retained_until(key) or 0)
                retain_tmp = path.with_name(_TMP + secrets.token_hex(6))
                write_new(retain_tmp, str(until).encode())
                os.replace(retain_tmp, self._retain_path(path))
            write_new(tmp, data)
            if retain_until_ms is not None:
                tmp.chmod(0o400)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TargetUnavailable(f"{self.url}: no space left on the target") from None
            raise TargetUnavailable(f"{self.url}: cannot write an object: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise TargetNotFound(f"{self.url}: no object {key}") from None
        except OSError as exc:
            raise TargetUnavailable(f"{self.url}: cannot read an object: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        if not self._root.is_dir():
            raise TargetUnavailable(f"{self.url}: the target directory does not exist")
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP)]
            rel = Path(dirpath).relative_to(self._root).as_posix()
            base = "" if rel == "." else rel + "/"
            # Prune whole subtrees that cannot match the prefix.
            dirnames[:] = [d for d in dirnames if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")]
            keys.extend(base + f for f in filenames
                        if not f.startswith((_TMP, _RETAIN)) and (base + f).startswith(prefix))
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        until = self.retained_until(key)
        if until is not None and until > time.time_ns() // 1_000_000:
            raise TargetImmutable(f"{self.url}: {key} is under retention and cannot be deleted yet")
        try:
            path.unlink()
            if until is not None:
                self._retain_path(path).unlink(missing_ok=True)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TargetUnavailable(f"{self.url}: cannot delete an object: {exc.strerror}") from None
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
