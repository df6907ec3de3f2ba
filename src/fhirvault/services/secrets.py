"""Named service secrets (audit signing key, backup key…) wrapped by the root key.

Each secret is random, created on first use, and kept in the store's ``meta``
table wrapped under the active root key (never derived from the root key, so a
root rotation only re-wraps them and nothing they protected changes).
"""

from __future__ import annotations

import orjson

from fhirvault.ports import ResourceStore, RootKeyProvider, WriteTx
from fhirvault.services.crypto import DecryptionError, associated_data, new_key

_PREFIX = "secret/"


class SecretError(RuntimeError):
    """A stored secret does not unwrap with the available root key."""


def _aad(name: str) -> bytes:
    return associated_data("service-secret", name)


def _encode(root: RootKeyProvider, name: str, secret: bytes) -> bytes:
    root_id, wrapped = root.wrap(secret, _aad(name))
    return orjson.dumps({"root_key_id": root_id, "wrapped": wrapped.hex()})


def _decode(root: RootKeyProvider, name: str, meta: bytes) -> bytes:
    doc = orjson.loads(meta)
    try:
        return root.unwrap(doc["root_key_id"], bytes.fromhex(doc["wrapped"]), _aad(name))
    except (DecryptionError, KeyError, ValueError):
        raise SecretError(f"service secret '{name}' does not unwrap with this root key") from None


class ServiceSecrets:
    def __init__(self, store: ResourceStore, root: RootKeyProvider) -> None:
        self._store = store
        self._root = root
        self._cache: dict[str, bytes] = {}

    def get(self, name: str) -> bytes:
        """The 32-byte secret called ``name``, created (and stored durably) on first use."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        meta = self._store.get_meta(_PREFIX + name)
        if meta is None:
            candidate = new_key()

            def create(tx: WriteTx) -> bytes:
                # Another process may have created it first: the stored one wins.
                existing = tx.get_meta(_PREFIX + name)
                if existing is not None:
                    return existing
                encoded = _encode(self._root, name, candidate)
                tx.set_meta(_PREFIX + name, encoded)
                return encoded

            meta = self._store.write_sync("secrets.create", create)
        secret = _decode(self._root, name, meta)
        self._cache[name] = secret
        return secret

    @staticmethod
    def rewrap_all(tx: WriteTx, old: RootKeyProvider, new: RootKeyProvider) -> int:
        """Re-wrap every service secret under ``new``'s active key (root rotation)."""
        names = [n for n in tx.meta_names() if n.startswith(_PREFIX)]
        for full in names:
            meta = tx.get_meta(full)
            assert meta is not None
            name = full[len(_PREFIX):]
            tx.set_meta(full, _encode(new, name, _decode(old, name, meta)))
        return len(names)
