"""The one place where adapters are chosen from settings and wired into services."""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.config import Settings
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import resource_types
from fhirvault.domain.validation import Validator
from fhirvault.ports import Clock, ResourceStore
from fhirvault.services.audit import TableAuditLog
from fhirvault.services.auth import AuthService
from fhirvault.services.keys import AUDIT_COMPARTMENT, KeyRing
from fhirvault.services.repository import Repository
from fhirvault.services.search_index import SearchIndex

INSTANCE_META = "instance-id"


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


@dataclass
class Container:
    settings: Settings
    clock: Clock
    store: ResourceStore
    root: KeyFileProvider
    keys: KeyRing
    auth: AuthService
    audit: TableAuditLog
    repository: Repository
    validator: Validator

    def close(self) -> None:
        self.store.close()


def open_store(settings: Settings) -> SqliteStore:
    return SqliteStore(settings.database_path)


def issuer_for(store: ResourceStore) -> str:
    instance = store.get_meta(INSTANCE_META)
    if instance is None:
        raise RuntimeError("this data directory was not initialised; run 'fhirvault init'")
    return "urn:fhirvault:" + instance.decode()


def build(settings: Settings, clock: Clock | None = None) -> Container:
    clock = clock or SystemClock()
    root = KeyFileProvider.load(settings.root_key_path)
    store = open_store(settings)
    try:
        keys = KeyRing(store, root, settings.tenant, clock)
        keys.load()
        audit = TableAuditLog(settings.tenant, keys.for_compartment_sync(AUDIT_COMPARTMENT))
        auth = AuthService(store, root, clock, issuer=issuer_for(store), tenant=settings.tenant,
                           token_ttl_seconds=settings.token_ttl_seconds)
        validator = Validator.default()
        repository = Repository(store, keys, audit, validator, clock, SearchIndex(keys), tenant=settings.tenant,
                                allow_unknown_elements=settings.validation == "lenient")
    except BaseException:
        store.close()
        raise
    return Container(settings, clock, store, root, keys, auth, audit, repository, validator)


def capability_bytes(base_url: str, token_url: str, clock: Clock) -> bytes:
    from fhirvault.fhir.capability import capability_statement

    doc = capability_statement(sorted(resource_types()), base_url=base_url, token_url=token_url,
                               published_ms_instant=instant(clock.now_ms()))
    return orjson.dumps(doc)
