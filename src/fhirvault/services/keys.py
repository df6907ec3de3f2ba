"""The key hierarchy: root key → tenant key (KEK, versioned) → data keys.

* the root key stays inside its ``RootKeyProvider`` (file, HSM, KMS);
* each tenant has a key-encryption key, wrapped by the root key;
* each patient compartment has its own data key, wrapped by the tenant key, so
  destroying it later makes every copy of that patient's data unreadable;
  resources outside any patient compartment use a tenant-level data key;
* a per-tenant index key (also wrapped by the tenant key) derives the HMAC
  lookups that find a compartment's data key without storing patient ids in clear.

Rotating an upper key re-wraps the keys below it; no resource is re-encrypted.
Unwrapped keys are cached in memory, bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from fhirvault.ports import (
    Clock,
    ResourceStore,
    RootKeyProvider,
    TenantKeyRow,
    VersionConflict,
    WrappedKey,
    WriteTx,
)
from fhirvault.services.crypto import Aead, DecryptionError, associated_data, new_key

TENANT_COMPARTMENT = "tenant"
AUDIT_COMPARTMENT = "audit"
# Unwrapped data keys kept per map. Each costs about 2.6 KB (the AES-GCM context; measured), so
# 20,000 patients' keys stay under ~55 MB per map; a miss is one key-row read and unwrap (~0.1 ms).
# (200,000 made a soak grow by 112 MB/h toward ~600 MB on a small clinic's box.)
_CACHE_MAX = 20_000


class KeyError_(Exception):
    """Key material is missing or does not unwrap (wrong root key, tampered row)."""


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    aead: Aead
    compartment: str


def patient_compartment(patient_id: str) -> str:
    return "patient/" + patient_id


def _tenant_key_aad(tenant: str, version: int) -> bytes:
    return associated_data("tenant-key", tenant, version)


def _data_key_aad(tenant: str, key_id: str, kek_version: int) -> bytes:
    return associated_data("data-key", tenant, key_id, kek_version)


def _compartment_aad(tenant: str, key_id: str, kek_version: int) -> bytes:
    return associated_data("compartment", tenant, key_id, kek_version)


def _index_key_aad(tenant: str, kek_version: int) -> bytes:
    return associated_data("index-key", tenant, kek_version)


def _index_meta_name(tenant: str) -> str:
    return f"index-key/{tenant}"


class KeyRing:
    def __init__(self, store: ResourceStore, root: RootKeyProvider, tenant: str, clock: Clock) -> None:
        self._store = store
        self._root = root
        self.tenant = tenant
        self._clock = clock
        self._lock = threading.Lock()
        self._keks: dict[int, Aead] = {}
        self._index_key = b""
        self._by_lookup: OrderedDict[bytes, DataKey] = OrderedDict()
        self._by_id: OrderedDict[str, DataKey] = OrderedDict()

    # -- bootstrap and load -----------------------------------------------------
    def initialise(self) -> None:
        """Create the tenant key and index key if this tenant has none yet, then load them."""

        def create(tx: WriteTx) -> None:
            if tx.tenant_keys(self.tenant):
                return
            kek = new_key()
            root_id, wrapped = self._root.wrap(kek, _tenant_key_aad(self.tenant, 1))
            tx.insert_tenant_key(TenantKeyRow(self.tenant, 1, wrapped, root_id), self._clock.now_ms())
            index_blob = Aead(kek).seal(new_key(), _index_key_aad(self.tenant, 1))
            tx.set_meta(_index_meta_name(self.tenant), struct.pack(">I", 1) + index_blob)

        self._store.write_sync("keys.initialise", create)
        self.load()

    def load(self) -> None:
        rows = self._store.tenant_keys(self.tenant)
        if not rows:
            raise KeyError_(f"tenant '{self.tenant}' has no key; run 'fhirvault init'")
        keks: dict[int, Aead] = {}
        for row in rows:
            try:
                keks[row.version] = Aead(self._root.unwrap(row.root_key_id, row.wrapped,
                                                           _tenant_key_aad(row.tenant, row.version)))
            except DecryptionError:
                raise KeyError_("the tenant key does not unwrap with this root key") from None
        meta = self._store.get_meta(_index_meta_name(self.tenant))
        if meta is None:
            raise KeyError_("tenant index key is missing")
        (version,) = struct.unpack(">I", meta[:4])
        try:
            index_key = keks[version].open(meta[4:], _index_key_aad(self.tenant, version))
        except (KeyError, DecryptionError):
            raise KeyError_("tenant index key does not unwrap") from None
        with self._lock:
            self._keks = keks
            self._index_key = index_key
            self._by_lookup.clear()
            self._by_id.clear()

    @property
    def kek_version(self) -> int:
        return max(self._keks)

    def index_subkey(self, purpose: str) -> bytes:
        """A secret derived from the index key for one purpose (e.g. one search parameter)."""
        return hmac.new(self._index_key, b"fhirvault-subkey\x00" + purpose.encode(), hashlib.sha256).digest()

    # -- data keys --------------------------------------------------------------
    def _lookup(self, compartment: str) -> bytes:
        return hmac.new(self._index_key, b"compartment\x00" + compartment.encode(), hashlib.sha256).digest()

    def _remember(self, key: DataKey, lookup: bytes | None = None) -> None:
        with self._lock:
            self._by_id[key.key_id] = key
            self._by_id.move_to_end(key.key_id)
            if lookup is not None:
                self._by_lookup[lookup] = key
            for cache in (self._by_id, self._by_lookup):
                while len(cache) > _CACHE_MAX:
                    cache.popitem(last=False)  # type: ignore[call-arg]

    def _open_row(self, row: WrappedKey) -> tuple[bytes, str]:
        kek = self._keks.get(row.kek_version)
        if kek is None:
            raise KeyError_("data key is wrapped by an unknown tenant key version")
        try:
            raw = kek.open(row.wrapped, _data_key_aad(self.tenant, row.key_id, row.kek_version))
            compartment = kek.open(row.compartment, _compartment_aad(self.tenant, row.key_id, row.kek_version))
        except DecryptionError:
            raise KeyError_("data key does not unwrap") from None
        return raw, compartment.decode()

    def _unwrap(self, row: WrappedKey) -> DataKey:
        raw, compartment = self._open_row(row)
        return DataKey(row.key_id, Aead(raw), compartment)

    def compartment_lookup(self, compartment: str) -> bytes:
        """The HMAC naming a compartment in the store (data_keys.lookup, lifecycle state)."""
        return self._lookup(compartment)

    def existing(self, compartment: str) -> str | None:
        """The compartment's data key id, if it has one (never creates it)."""
        cached = self.cached_for(compartment)
        if cached is not None:
            return cached.key_id
        row = self._store.data_key_by_lookup(self.tenant, self._lookup(compartment))
        return row.key_id if row is not None else None

    def compartments(self) -> dict[str, str]:
        """Every data key of the tenant: key id -> compartment name (the retention job's census)."""
        rows = self._store.write_sync("keys.census", lambda tx: tx.all_data_keys(self.tenant))
        return {row.key_id: self._open_row(row)[1] for row in rows}

    def forget_keys(self, key_ids: frozenset[str] | None) -> None:
        """Another process destroyed these keys (None: any may have been): drop them from the caches."""
        if key_ids is None:
            with self._lock:
                self._by_id.clear()
                self._by_lookup.clear()
            return
        for key_id in key_ids:
            self.forget(key_id)

    def forget(self, key_id: str, lookup: bytes | None = None) -> None:
        """Drop a destroyed key from the caches (erasure)."""
        with self._lock:
            self._by_id.pop(key_id, None)
            if lookup is not None:
                self._by_lookup.pop(lookup, None)
            for found, key in list(self._by_lookup.items()):
                if key.key_id == key_id:
                    del self._by_lookup[found]

    def cached_for(self, compartment: str) -> DataKey | None:
        with self._lock:
            return self._by_lookup.get(self._lookup(compartment))

    def get_or_create_in_tx(self, tx: WriteTx, compartment: str) -> tuple[DataKey, bytes]:
        """Find or create the compartment's data key inside a write transaction.

        The caller caches the result with ``remember`` only once the transaction
        committed, so a rolled-back key never serves as if it existed.
        """
        lookup = self._lookup(compartment)
        row = tx.data_key_by_lookup(self.tenant, lookup)
        if row is not None:
            return self._unwrap(row), lookup
        version = self.kek_version
        kek = self._keks[version]
        key_id = "dk-" + secrets.token_hex(12)
        raw = new_key()
        wrapped = WrappedKey(
            key_id,
            kek.seal(raw, _data_key_aad(self.tenant, key_id, version)),
            version,
            kek.seal(compartment.encode(), _compartment_aad(self.tenant, key_id, version)),
        )
        try:
            tx.insert_data_key(self.tenant, lookup, wrapped, self._clock.now_ms())
        except VersionConflict:  # another server process created this compartment's key meanwhile: use it
            row = tx.data_key_by_lookup(self.tenant, lookup)
            if row is None:
                raise
            return self._unwrap(row), lookup
        return DataKey(key_id, Aead(raw), compartment), lookup

    def remember(self, key: DataKey, lookup: bytes) -> None:
        self._remember(key, lookup)

    async def for_compartment(self, compartment: str) -> DataKey:
        cached = self.cached_for(compartment)
        if cached is not None:
            return cached
        key, lookup = await self._store.write("keys.data-key", lambda tx: self.get_or_create_in_tx(tx, compartment))
        self._remember(key, lookup)
        return key

    def for_compartment_sync(self, compartment: str) -> DataKey:
        cached = self.cached_for(compartment)
        if cached is not None:
            return cached
        key, lookup = self._store.write_sync("keys.data-key", lambda tx: self.get_or_create_in_tx(tx, compartment))
        self._remember(key, lookup)
        return key

    def by_id(self, key_id: str) -> DataKey:
        with self._lock:
            key = self._by_id.get(key_id)
        if key is not None:
            return key
        row = self._store.data_key(self.tenant, key_id)
        if row is None:
            raise KeyError_("data key not found (destroyed or never created)")
        key = self._unwrap(row)
        self._remember(key)
        return key

    # -- rotation ---------------------------------------------------------------
    def rotate_tenant_key(self) -> int:
        """New tenant key version; re-wraps every data key and the index key. Returns the version."""

        def rotate(tx: WriteTx) -> int:
            version = max(r.version for r in tx.tenant_keys(self.tenant)) + 1
            kek_raw = new_key()
            kek = Aead(kek_raw)
            root_id, wrapped = self._root.wrap(kek_raw, _tenant_key_aad(self.tenant, version))
            tx.insert_tenant_key(TenantKeyRow(self.tenant, version, wrapped, root_id), self._clock.now_ms())
            for row in tx.all_data_keys(self.tenant):
                raw, compartment = self._open_row(row)
                tx.rewrap_data_key(
                    row.key_id,
                    kek.seal(raw, _data_key_aad(self.tenant, row.key_id, version)),
                    kek.seal(compartment.encode(), _compartment_aad(self.tenant, row.key_id, version)),
                    version,
                )
            tx.set_meta(_index_meta_name(self.tenant),
                        struct.pack(">I", version) + kek.seal(self._index_key, _index_key_aad(self.tenant, version)))
            return version

        version = self._store.write_sync("keys.rotate-tenant", rotate)
        self.load()
        return version

    def rewrap_tenant_keys(self, root: RootKeyProvider) -> int:
        """Re-wrap every tenant key of this store under ``root``'s active key (root rotation)."""

        def rewrap(tx: WriteTx) -> int:
            rows = tx.tenant_keys(self.tenant)
            for row in rows:
                aad = _tenant_key_aad(row.tenant, row.version)
                raw = self._root.unwrap(row.root_key_id, row.wrapped, aad)
                root_id, wrapped = root.wrap(raw, aad)
                tx.replace_tenant_key(TenantKeyRow(row.tenant, row.version, wrapped, root_id))
            return len(rows)

        count = self._store.write_sync("keys.rotate-root", rewrap)
        self._root = root
        self.load()
        return count
