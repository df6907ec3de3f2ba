"""Ports: what the services need from the outside world, as Protocols.

Adapters (SQLite now, PostgreSQL later, key files, KMS/HSM…) implement them;
services only ever see these names. Every store write runs inside ``write()``,
whose callable receives a ``WriteTx``: one database transaction, committed and
synced to disk before ``write()`` returns (group commit shares the sync among
concurrent writers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

SEARCH_TAG_BYTES = 8  # truncated HMAC-SHA256 blind-index tags (see docs/security-model.md)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC."""
        ...


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One encrypted resource version as the store keeps it. Only routing data is in clear."""

    type: str
    id: str
    version: int
    last_updated_ms: int
    deleted: bool
    key_id: str
    blob: bytes  # AEAD envelope of the resource JSON (empty for a deletion marker)
    seq: int = 0  # store-wide order of writes, assigned by the store


@dataclass(frozen=True, slots=True)
class WrappedKey:
    key_id: str
    wrapped: bytes  # data key wrapped under a tenant key version
    kek_version: int
    compartment: bytes  # AEAD envelope of the compartment name under the same KEK


@dataclass(frozen=True, slots=True)
class TenantKeyRow:
    tenant: str
    version: int
    wrapped: bytes  # tenant key wrapped by the root key provider
    root_key_id: str
    created_ms: int = field(default=0, compare=False)  # for the key-age metric


@dataclass(frozen=True, slots=True)
class ClientRow:
    client_id: str
    tenant: str
    name: str
    secret_hash: str | None  # Argon2id; None for private_key_jwt-only clients
    scopes: str
    jwks: str | None  # public JWK Set (JSON) for private_key_jwt
    created_ms: int
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    tenant: str
    type: str | None = None
    id: str | None = None
    types: frozenset[str] | None = None  # restrict system history to these types
    since_ms: int | None = None
    before_seq: int | None = None  # page cursor: only versions with seq < before_seq
    limit: int = 50


@dataclass(frozen=True, slots=True)
class SearchQuery:
    tenant: str
    types: tuple[str, ...]
    tag_groups: tuple[tuple[bytes, ...], ...] = ()  # AND of groups, OR within a group
    after_rk: int | None = None
    before_rk: int | None = None
    descending: bool = False
    limit: int = 100
    ids: tuple[str, ...] | None = None  # restrict to these resource ids (``_id``)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One entry of the audit log as stored: leaf ``seq - 1`` of the Merkle tree."""

    seq: int
    tenant: str
    ts_ms: int
    tags: bytes  # concatenated blind-index tags (SEARCH_TAG_BYTES each)
    blob: bytes  # AEAD ciphertext of the record


@dataclass(frozen=True, slots=True)
class AuditCheckpoint:
    """A signed tree head: the log had ``size`` entries with this root at ``ts_ms``."""

    size: int
    ts_ms: int
    root: bytes
    key_id: str
    signature: bytes
    witnessed: bool = False  # also published to the witnesses
    proof_from: int = 0  # previous witnessed size (0: none)
    proof: bytes = b""  # concatenated consistency proof hashes from proof_from


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Audit entries of a tenant, newest or oldest first, optionally only those carrying one of ``tags``."""

    tenant: str
    tags: tuple[bytes, ...] = ()
    after_seq: int = 0
    before_seq: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    descending: bool = False
    limit: int = 100


class WriteTx(Protocol):
    """One open write transaction. Used only inside ``ResourceStore.write``."""

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None: ...
    def insert_version(self, tenant: str, version: StoredVersion) -> int: ...
    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None: ...
    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None: ...
    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None: ...
    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None: ...
    def all_data_keys(self, tenant: str) -> list[WrappedKey]: ...
    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None: ...
    def replace_tenant_key(self, row: TenantKeyRow) -> None: ...
    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]: ...
    def set_meta(self, name: str, value: bytes) -> None: ...
    def get_meta(self, name: str) -> bytes | None: ...
    def meta_names(self) -> list[str]: ...
    def insert_client(self, row: ClientRow) -> None: ...
    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool: ...
    def append_audit(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes], tags: bytes = b"") -> int:
        """Append an entry: ``seal(seq)`` is called with the entry's sequence number and returns
        the ciphertext (so the encryption can bind the position). Returns the seq."""
        ...

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this job's changes are durable (never if the job or the commit fails).

        Async callers get it on their event loop, before their ``write`` returns."""
        ...

    def add_audit_nodes(self, nodes: list[tuple[int, int, bytes]]) -> None: ...
    def add_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...


class ResourceStore(Protocol):
    async def write(self, name: str, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn`` in a transaction; return once it is committed and durable."""
        ...

    def write_sync(self, name: str, fn: Callable[[WriteTx], T]) -> T:
        """Same as ``write`` for callers without an event loop (CLI, start-up)."""
        ...

    def read_current(self, tenant: str, type: str, id: str) -> StoredVersion | None: ...
    def read_version(self, tenant: str, type: str, id: str, version: int) -> StoredVersion | None: ...
    def history(self, query: HistoryQuery) -> list[StoredVersion]: ...
    def history_count(self, query: HistoryQuery) -> int: ...
    def search(self, query: SearchQuery) -> list[tuple[int, StoredVersion]]: ...
    def count_current(self, tenant: str, type: str) -> int: ...
    def max_rk(self) -> int: ...
    def max_seq(self) -> int: ...
    def data_key(self, tenant: str, key_id: str) -> WrappedKey | None: ...
    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]: ...
    def get_meta(self, name: str) -> bytes | None: ...
    def client(self, client_id: str) -> ClientRow | None: ...
    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]: ...
    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        """Entries of every tenant in log order (what the Merkle tree covers)."""
        ...

    def audit_find(self, query: AuditQuery) -> list[AuditRow]: ...
    def audit_size(self) -> int: ...
    def audit_node(self, level: int, index: int) -> bytes | None: ...
    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]: ...
    def latest_audit_checkpoint(self) -> AuditCheckpoint | None: ...
    def close(self) -> None: ...


class RootKeyProvider(Protocol):
    """The top of the key hierarchy (key file, HSM, KMS). Never hands out the root key."""

    @property
    def active_key_id(self) -> str: ...
    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]: ...
    def unwrap(self, key_id: str, blob: bytes, aad: bytes) -> bytes: ...


class AuditLog(Protocol):
    def record(self, tx: WriteTx, event: Any) -> None:
        """Append one audit event inside the caller's transaction."""
        ...


