"""Root key provider with its keys in process memory (tests, throw-away servers).

Same behaviour as ``KeyFileProvider`` without the file: the keys are lost with
the process, so anything they wrapped is unreadable afterwards.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fhirvault.services.crypto import Aead, DecryptionError, new_key

if TYPE_CHECKING:
    from fhirvault.ports import RootKeyProvider


def _new_id() -> str:
    return "rk-" + secrets.token_hex(8)


class MemoryRootKeyProvider:
    def __init__(self) -> None:
        kid = _new_id()
        self._aeads = {kid: Aead(new_key())}
        self._active = kid

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
        """Add a new active root key; the old ones still unwrap until ``retire``."""
        kid = _new_id()
        self._aeads[kid] = Aead(new_key())
        self._active = kid
        return kid

    def retire(self, key_id: str) -> None:
        if key_id == self._active:
            raise ValueError("cannot retire the active root key")
        self._aeads.pop(key_id, None)


if TYPE_CHECKING:
    _conforms: RootKeyProvider = MemoryRootKeyProvider()
