"""Key rotation: new upper keys re-wrap the keys below them; resources are never re-encrypted.

Root rotation is crash-safe: the new root key is added to the key file first
(both keys are then present), the tenant keys and the token signing key are
and the service secrets are
re-wrapped in one transaction, and only then is the old root key removed. A
crash in between leaves a key file that still opens everything.
"""

from __future__ import annotations

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.config import Settings
from fhirvault.container import SystemClock, open_store
from fhirvault.ports import WriteTx
from fhirvault.services.auth import SIGNING_META, AuthService
from fhirvault.services.keys import KeyRing
from fhirvault.services.secrets import ServiceSecrets


def rotate_root_key(settings: Settings) -> str:
    provider = KeyFileProvider.load(settings.root_key_path)
    old_ids = [k for k in provider.key_ids]
    store = open_store(settings)
    try:
        keys = KeyRing(store, provider, settings.tenant, SystemClock())
        keys.load()
        new_id = provider.begin_rotation()
        keys.rewrap_tenant_keys(provider)
        meta = store.get_meta(SIGNING_META)

        def rewrap(tx: WriteTx) -> None:
            if meta is not None:
                AuthService.rewrap_signing_key(tx, provider, provider, meta)
            ServiceSecrets.rewrap_all(tx, provider, provider)

        store.write_sync("keys.rotate-root.secrets", rewrap)
    finally:
        store.close()
    for kid in old_ids:
        provider.retire(kid)
    _audit(settings, f"root key rotated: new root key {new_id}; tenant keys and service secrets re-wrapped")
    return new_id


def rotate_tenant_key(settings: Settings) -> int:
    provider = KeyFileProvider.load(settings.root_key_path)
    store = open_store(settings)
    try:
        keys = KeyRing(store, provider, settings.tenant, SystemClock())
        keys.load()
        version = keys.rotate_tenant_key()
    finally:
        store.close()
    _audit(settings, f"tenant key rotated to version {version}; data keys re-wrapped")
    return version


def _audit(settings: Settings, detail: str) -> None:
    from fhirvault.container import build

    container = build(settings)
    try:
        container.audit.record_system_event(container.store, container.clock, "key-rotation", detail)
    finally:
        container.close()
