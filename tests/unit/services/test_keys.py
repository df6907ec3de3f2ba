"""KeyRing behaviour on every store + root key provider pair (test_keys.py keeps the key-file checks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.memory_keys import MemoryRootKeyProvider
from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.container import SystemClock
from fhirvault.ports import ResourceStore
from fhirvault.services.keys import KeyError_, KeyRing, patient_compartment

Root = KeyFileProvider | MemoryRootKeyProvider


@dataclass
class Setup:
    store: ResourceStore
    root: Root
    reopen_root: Callable[[], Root]  # the root key as a restart would find it
    stranger: Callable[[], Root]  # some other root key

    def __post_init__(self) -> None:
        self.ring = KeyRing(self.store, self.root, "default", SystemClock())


@pytest.fixture(params=["sqlite+keyfile", "memory"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    if request.param == "memory":
        mem = MemoryRootKeyProvider()
        s = Setup(MemoryStore(), mem, lambda: mem, MemoryRootKeyProvider)
    else:
        key_file = tmp_path / "root.key"
        s = Setup(SqliteStore(tmp_path / "db.sqlite3"), KeyFileProvider.create(key_file),
                  lambda: KeyFileProvider.load(key_file), lambda: KeyFileProvider.create(tmp_path / "other.key"))
    s.ring.initialise()
    yield s
    s.store.close()


def _reloaded(s: Setup) -> KeyRing:
    ring = KeyRing(s.store, s.reopen_root(), "default", SystemClock())
    ring.load()
    return ring


def test_initialise_is_idempotent(setup: Setup) -> None:
    rows = setup.store.tenant_keys("default")
    setup.ring.initialise()
    assert setup.store.tenant_keys("default") == rows and len(rows) == 1


def test_one_key_per_compartment_stable_across_reload(setup: Setup) -> None:
    keys = setup.ring
    a = keys.for_compartment_sync(patient_compartment("a"))
    b = keys.for_compartment_sync(patient_compartment("b"))
    assert a.key_id != b.key_id
    blob = a.aead.seal(b"secret", b"ad")
    fresh = _reloaded(setup)
    assert fresh.for_compartment_sync(patient_compartment("a")).key_id == a.key_id
    assert fresh.by_id(a.key_id).aead.open(blob, b"ad") == b"secret"
    assert fresh.by_id(a.key_id).compartment == "patient/a"


def test_tenant_rotation_rewraps_without_reencrypting(setup: Setup) -> None:
    keys, store = setup.ring, setup.store
    k = keys.for_compartment_sync(patient_compartment("p1"))
    blob = k.aead.seal(b"data", b"")
    before = store.data_key("default", k.key_id)
    assert keys.rotate_tenant_key() == 2
    after = store.data_key("default", k.key_id)
    assert before is not None and after is not None
    assert after.kek_version == 2 and after.wrapped != before.wrapped
    reloaded = _reloaded(setup)
    assert reloaded.by_id(k.key_id).aead.open(blob, b"") == b"data"
    assert reloaded.for_compartment_sync(patient_compartment("p1")).key_id == k.key_id


def test_root_rotation_and_wrong_root(setup: Setup) -> None:
    keys, store, root = setup.ring, setup.store, setup.root
    k = keys.for_compartment_sync("tenant")
    blob = k.aead.seal(b"data", b"")
    old = root.active_key_id
    new = root.begin_rotation()
    assert keys.rewrap_tenant_keys(root) == 1
    root.retire(old)
    assert root.key_ids == (new,)
    assert [r.root_key_id for r in store.tenant_keys("default")] == [new]
    reloaded = _reloaded(setup)
    assert reloaded.by_id(k.key_id).aead.open(blob, b"") == b"data"
    with pytest.raises(KeyError_):
        KeyRing(store, setup.stranger(), "default", SystemClock()).load()
