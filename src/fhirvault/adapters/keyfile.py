"""Root key provider backed by a local key file (the embedded default).

The file holds one or more 256-bit root keys (the active one and, during a
rotation, the previous one) as JSON, mode 0600, outside the database. It never
leaves this module: callers only ask it to wrap or unwrap tenant keys.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from fhirvault.adapters.files import replace_durably
from fhirvault.adapters.memory_keys import MemoryRootKeyProvider, RootKeyError, new_root_key_id
from fhirvault.services.crypto import new_key

_FORMAT = "fhirvault-root-key"


class KeyFileError(RootKeyError):
    pass


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable by the owner only, and sync it."""
    replace_durably(path, data, 0o600)


class KeyFileProvider(MemoryRootKeyProvider):
    def __init__(self, path: Path, keys: dict[str, bytes], active: str) -> None:
        super().__init__(keys, active)
        self._path = path

    @classmethod
    def create(cls, path: Path) -> KeyFileProvider:
        if path.exists():
            raise KeyFileError(f"root key file already exists: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        kid = new_root_key_id()
        provider = cls(path, {kid: new_key()}, kid)
        provider._persist()
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
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyFileError(f"root key file {path} is malformed") from None
        return cls(path, keys, active)

    def _persist(self) -> None:
        doc = {
            "format": _FORMAT,
            "version": 1,
            "active": self._active,
            "keys": {kid: base64.b64encode(k).decode() for kid, k in self._keys.items()},
        }
        write_private_file(self._path, json.dumps(doc, indent=1).encode())
