"""Root key provider backed by a local key file (the embedded default).

The file holds one or more 256-bit root keys (the active one and, during a
rotation, the previous one) as JSON, mode 0600, outside the database. It never
leaves this module: callers only ask it to wrap or unwrap tenant keys.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

from fhirvault.services.crypto import Aead, DecryptionError, new_key

_FORMAT = "fhirvault-root-key"


class KeyFileError(Exception):
    pass


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable by the owner only, and sync it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KeyFileProvider:
    def __init__(self, path: Path, keys: dict[str, bytes], active: str) -> None:
        self._path = path
        self._keys = keys
        self._active = active
        self._aeads = {kid: Aead(k) for kid, k in keys.items()}

    @classmethod
    def create(cls, path: Path) -> KeyFileProvider:
        if path.exists():
            raise KeyFileError(f"root key file already exists: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        kid = "rk-" + secrets.token_hex(8)
        provider = cls(path, {kid: new_key()}, kid)
        provider._save()
        return provider

    @classmethod
    def load(cls, path: Path) -> KeyFileProvider:
        try:
            st = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"root key file not found: {path}") from None
        if st.st_mode & 0o077:
            raise KeyFileError(f"root key file {path} must not be readable by group or others (chmod 600)")
        try:
            doc = json.loads(raw)
            if doc.get("format") != _FORMAT:
                raise ValueError
            keys = {kid: base64.b64decode(k, validate=True) for kid, k in doc["keys"].items()}
            active = doc["active"]
            if active not in keys or any(len(k) != 32 for k in keys.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise KeyFileError(f"root key file {path} is malformed") from None
        return cls(path, keys, active)

    def _save(self) -> None:
        doc = {
            "format": _FORMAT,
            "version": 1,
            "active": self._active,
            "keys": {kid: base64.b64encode(k).decode() for kid, k in self._keys.items()},
        }
        write_private_file(self._path, json.dumps(doc, indent=1).encode())

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        return self._active, self._aeads[self._active].seal(plaintext, aad)

    def unwrap(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        aead = self._aeads.get(key_id)
        if aead is None:
            raise DecryptionError("root key not available")
        return aead.open(blob, aad)

    def begin_rotation(self) -> str:
        """Add a new active root key, keeping the old ones until ``retire`` (crash-safe)."""
        kid = "rk-" + secrets.token_hex(8)
        self._keys[kid] = new_key()
        self._aeads[kid] = Aead(self._keys[kid])
        self._active = kid
        self._save()
        return kid

    def retire(self, key_id: str) -> None:
        if key_id == self._active:
            raise KeyFileError("cannot retire the active root key")
        self._keys.pop(key_id, None)
        self._aeads.pop(key_id, None)
        self._save()
