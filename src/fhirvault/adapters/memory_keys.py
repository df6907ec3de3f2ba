"""Root key provider with its keys in process memory (tests, throw-away servers).

``KeyFileProvider`` is this plus persistence to a key file. Keys held here are
lost with the process, so anything they wrapped is unreadable afterwards.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fhirvault.services.crypto import Aead, DecryptionError, new_key

if TYPE_CHECKING:
    from fhirvault.ports import RootKeyProvider


class RootKeyError(ValueError):
    """A root key operation was refused (e.g. retiring the active key)."""


def new_root_key_id() -> str:
    return "rk-" + secrets.token_hex(8)


class MemoryRootKeyProvider:
    def __init__(self, keys: dict[str, bytes] | None = None, active: str | None = None) -> None:
        if keys is None:
            active = new_root_key_id()
            keys = {active: new_key()}
        assert active in keys
        self._keys = keys
        self._aeads = {kid: Aead(k) for kid, k in keys.items()}
        self._active = active

    def _persist(self) -> None:
        """Hook for providers that keep their keys somewhere (see KeyFileProvider)."""

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._aeads)

    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        return self._active, self._aeads[self._active].seal(plaintext, aad)

    def unwrap(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        aead = self._aeads.get(key_id)
        if aead is None:
            raise DecryptionError("root key not available")
        return aead.open(blob, aad)

    def begin_rotation(self) -> str:
        """Add a new active root key; the old ones still unwrap until ``retire`` (crash-safe order)."""
        kid = new_root_key_id()
        self._keys[kid] = new_key()
        self._aeads[kid] = Aead(self._keys[kid])
        self._active = kid
        self._persist()
        return kid

    def retire(self, key_id: str) -> None:
        if key_id == self._active:
            raise RootKeyError("cannot retire the active root key")
        self._keys.pop(key_id, None)
        self._aeads.pop(key_id, None)
        self._persist()


if TYPE_CHECKING:
    _conforms: RootKeyProvider = MemoryRootKeyProvider()
