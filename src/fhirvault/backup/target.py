"""Where backups go: the ``BackupTarget`` port and its errors.

A target is a flat key/value object store (a local directory, an S3 bucket
prefix). Keys are ``/``-separated relative paths such as
``chunks/ab/abcdef…`` or ``manifests/20261129T030000Z.json``. Everything stored
through this port is already compressed, encrypted and authenticated by the
backup engine; a target only has to store bytes faithfully.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

# EEA member states (EU 27 + Iceland, Liechtenstein, Norway), ISO 3166-1 alpha-2.
EEA_COUNTRIES = frozenset((
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
    "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
))


class TargetError(Exception):
    """A target operation failed; the message names the target, never the data."""


class TargetNotFound(TargetError):
    """The key does not exist on the target."""


class TargetUnavailable(TargetError):
    """The target could not be reached or refused the request (after retries)."""


class TargetImmutable(TargetError):
    """The object is under retention (object lock) and cannot be deleted yet."""


class BackupTarget(Protocol):
    @property
    def url(self) -> str:
        """The target as configured (``file:///…``, ``s3://bucket/prefix``), without credentials."""

    @property
    def location(self) -> str:
        """ISO 3166-1 alpha-2 country where the stored bytes live (declared by the operator)."""

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        """Store ``data`` atomically: readers see the whole object or nothing.

        ``retain_until_ms`` asks for immutability (object lock) until then where
        the target supports it; targets that cannot enforce it ignore it.
        """

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ``TargetNotFound`` if absent."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""

    def delete(self, key: str) -> None:
        """Remove the object (absent is fine); ``TargetImmutable`` under retention."""
