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


class VersionConflict(Exception):
    """Another process stored this resource version (or data key) first, in a store shared by
    processes: the transaction is still usable; re-read, and retry or use what the other stored."""


class StoreUnavailable(Exception):
    """The database cannot be reached (or is read-only: a standby) for now; the store reconnects.

    ``outcome_unknown`` is False when nothing of the write was committed (it failed before its
    COMMIT was sent, or the store learned the COMMIT did not happen), True when the connection
    broke during COMMIT and the store could not learn whether it committed (see
    docs/postgresql.md "Failover and reconnection"). ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, *, outcome_unknown: bool = False, retry_after: int = 1) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after


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
    allowed_sources: str | None = None  # space-separated CIDRs the client may call from; None: anywhere


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


# -- identity: users, SMART apps, login sessions, authorization codes, refresh tokens --
@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str  # opaque, stable ("u-…"): the token's sub and the audit trail's user
    tenant: str
    username: str  # normalised (lower case), unique per tenant
    password_hash: str | None  # Argon2id; None for federated-only users
    role: str
    fhir_user: str | None  # e.g. Practitioner/123, Patient/abc
    organization: str | None
    clearances: str  # space-separated confidentiality codes (R V)
    totp: bytes | None  # AEAD envelope of the TOTP secret
    totp_last_step: int  # last accepted TOTP time step (replay protection)
    disabled: bool
    failures: int  # consecutive failed logins
    locked_until_ms: int  # back-off; -1 = locked until an admin unlocks
    created_ms: int


@dataclass(frozen=True, slots=True)
class AppRow:
    """Authorization-code settings of a client (SMART app): exact redirect URIs, public or not."""

    client_id: str
    redirect_uris: tuple[str, ...]
    public: bool


@dataclass(frozen=True, slots=True)
class LoginSessionRow:
    session_id: str  # SHA-256 of the browser cookie; the tokens' sid
    user_id: str
    created_ms: int
    last_seen_ms: int
    amr: str  # space-separated: pwd otp fed
    ended_ms: int = 0


@dataclass(frozen=True, slots=True)
class AuthCodeRow:
    code_hash: bytes
    family_id: str  # every token issued from this code shares it (revoked together on replay)
    client_id: str
    user_id: str
    session_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    nonce: str | None
    patient: str | None
    auth_time_ms: int
    expires_ms: int
    used: bool = False


@dataclass(frozen=True, slots=True)
class RefreshTokenRow:
    token_hash: bytes
    family_id: str
    client_id: str
    user_id: str
    session_id: str
    scope: str
    patient: str | None
    auth_time_ms: int
    expires_ms: int
    created_ms: int
    used: bool = False  # rotated away: presenting it again is a reuse
    revoked: bool = False


# -- break-the-glass: emergency access grants and their review (see services/break_glass.py) --
@dataclass(frozen=True, slots=True)
class BreakGlassRow:
    grant_id: str
    tenant: str
    user_id: str
    patient_id: str
    created_ms: int
    expires_ms: int
    status: str  # open (awaiting review) | closed (reviewed)
    key_id: str  # the tenant data key sealing ``blob``
    blob: bytes  # AEAD of the JSON details: reason, purpose, role, review decision and note


# -- compliance registers: incidents, data-subject requests (see services/registers.py) --
@dataclass(frozen=True, slots=True)
class RegisterRow:
    tenant: str
    kind: str  # incident | request
    entry_id: str
    created_ms: int
    updated_ms: int
    status: str
    due_ms: int | None  # the legal deadline (72-hour notification, one-month answer); None once not due
    key_id: str  # the tenant data key sealing ``blob``
    blob: bytes  # AEAD of the JSON details (may name a person: never stored in clear)


# -- subscriptions: the outbox of committed writes and the durable delivery queue (services/subscriptions.py) --
@dataclass(frozen=True, slots=True)
class ChangeRow:
    """A committed resource write, queued in its own transaction for the subscription matcher."""

    id: int
    tenant: str
    type: str
    rid: str
    version: int
    created_ms: int


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One notification to send: routing data only, the content is read (and re-authorised) when sent."""

    id: int  # 0: not stored yet
    tenant: str
    subscription_id: str
    kind: str  # notify | heartbeat
    type: str  # the resource notified ("" for a heartbeat)
    rid: str
    version: int
    attempts: int
    due_ms: int
    created_ms: int


class WriteTx(Protocol):
    """One open write transaction. Used only inside ``ResourceStore.write``."""

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None: ...
    def insert_version(self, tenant: str, version: StoredVersion) -> int: ...
    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None: ...
    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None: ...
    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None: ...
    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None: ...
    def all_data_keys(self, tenant: str) -> list[WrappedKey]: ...
    def erase_key(self, tenant: str, key_id: str,
                  known: tuple[int, list[tuple[int, str, str]]] | None = None) -> tuple[int, int]:
        """Crypto-shredding of one compartment: delete the data key, every version sealed under it, the
        current rows whose version it sealed and their search tags. Returns (resources, versions).

        ``known``: (the store's max seq before the read, ``key_versions``) read beforehand off the write
        path, so the transaction touches those rows by key and only searches the versions written since
        (a store with one writer at a time uses it to stay short; others may search everything again)."""
        ...

    def destroy_tenant_keys(self, tenant: str) -> tuple[int, int]:
        """Delete every tenant key version and data key of ``tenant`` (tenant purge); returns their counts."""
        ...

    def delete_meta(self, name: str) -> None: ...
    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None: ...
    def replace_tenant_key(self, row: TenantKeyRow) -> None: ...
    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]: ...
    def set_meta(self, name: str, value: bytes) -> None: ...
    def get_meta(self, name: str) -> bytes | None: ...
    def meta_names(self) -> list[str]: ...

    def insert_client(self, row: ClientRow) -> None: ...
    def client_for_update(self, client_id: str) -> ClientRow | None: ...
    def update_client(self, row: ClientRow) -> None:
        """Replace an existing client's name, secret hash, scopes, JWK Set and disabled flag."""
        ...

    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool: ...
    def append_audit(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes],
                     tags: bytes = b"") -> Callable[[], int]:
        """Append an entry: ``seal(seq)`` is called with the entry's sequence number and returns
        the ciphertext (so the encryption can bind the position).

        A store may place the entry only at the end of the transaction (PostgreSQL does, to hold the
        log's cross-process lock briefly) and call ``seal`` then, so it must not depend on the job's
        later state. Returns a function giving the seq, valid once the write has committed (in an
        ``on_commit`` callback or after ``write`` returned)."""
        ...

    def serialize(self, key: str) -> bool:
        """Hold a lock on ``key`` until this transaction ends, against the writers of every process
        sharing the database (call it before the job's first audit entry).

        True when such writers can exist (PostgreSQL): the caller must re-check, inside the job, what it
        read before the transaction. False when the store has one writer (SQLite, memory): jobs already
        run one at a time, so an in-process lock around the read and the write is enough."""
        ...

    def invalidate(self, kind: str, key: str) -> None:
        """Tell the other processes sharing the database, at COMMIT, that what they cache under
        (``kind``, ``key``) changed (services/coherence.py). A no-op for single-process stores."""
        ...

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this job's changes are durable (never if the job or the commit fails).

        Async callers get it on their event loop, before their ``write`` returns."""
        ...

    def add_audit_nodes(self, nodes: list[tuple[int, int, bytes]]) -> None: ...
    def add_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...

    # -- identity --
    def insert_user(self, row: UserRow) -> None: ...
    def update_user(self, row: UserRow) -> None: ...
    def user_for_update(self, user_id: str) -> UserRow | None: ...
    def link_identity(self, provider: str, issuer: str, subject: str, user_id: str) -> None: ...
    def upsert_app(self, row: AppRow) -> None: ...
    def insert_login_session(self, row: LoginSessionRow) -> None: ...
    def touch_login_session(self, session_id: str, now_ms: int) -> None: ...
    def end_login_session(self, session_id: str, now_ms: int) -> None: ...
    def insert_code(self, row: AuthCodeRow) -> None: ...
    def consume_code(self, code_hash: bytes, now_ms: int) -> AuthCodeRow | None:
        """The code as it was (``used`` tells a replay) and mark it used; expired codes are purged."""
        ...

    def insert_refresh(self, row: RefreshTokenRow) -> None: ...
    def consume_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        """The refresh token as it was and mark it used (rotation)."""
        ...

    def record_issued(self, jti: str, family_id: str, session_id: str, expires_ms: int) -> None: ...
    def revoke_tokens(self, now_ms: int, *, family_id: str | None = None, session_id: str | None = None) -> int:
        """Revoke the refresh tokens and the unexpired access tokens of a family or a session."""
        ...

    def revoke_refresh(self, token_hash: bytes) -> RefreshTokenRow | None: ...
    def revoke_jti(self, jti: str, expires_ms: int, now_ms: int) -> None: ...
    def end_user_sessions(self, user_id: str, now_ms: int) -> int:
        """End every live session of a user and revoke their tokens (account disabled)."""
        ...

    # -- break-the-glass --
    def put_break_glass(self, row: BreakGlassRow) -> None:
        """Insert or replace a grant (a review replaces its status and details)."""
        ...

    # -- compliance registers --
    def put_register_entry(self, row: RegisterRow) -> None:
        """Insert or replace a register entry (an update replaces its status, deadline and details)."""
        ...

    def register_entry_for_update(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        """The entry, locked until the end of the transaction where the engine locks rows."""
        ...

    # -- subscriptions --
    def add_change(self, tenant: str, type: str, rid: str, version: int, now_ms: int) -> None:
        """Queue a resource write for the subscription matcher (commits or vanishes with the write)."""
        ...

    def remove_changes(self, ids: list[int]) -> None: ...
    def put_delivery(self, row: DeliveryRow) -> None:
        """Insert (``row.id == 0``) or replace a queued notification."""
        ...

    def remove_delivery(self, delivery_id: int) -> None: ...


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
    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None: ...
    def key_versions(self, tenant: str, key_id: str) -> list[tuple[int, str, str]]:
        """(seq, type, id) of every version sealed under ``key_id``."""
        ...

    def key_usage(self, tenant: str, key_id: str) -> list[tuple[str, str, int, int]]:
        """The resources with versions sealed under ``key_id``: (type, id, versions, newest last_updated)."""
        ...

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(resources, versions) the tenant holds."""
        ...

    def key_activity(self, tenant: str) -> dict[str, tuple[int, int]]:
        """Per data key id: (versions sealed under it, their newest last_updated); one pass for retention."""
        ...

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]: ...
    def get_meta(self, name: str) -> bytes | None: ...
    def meta_with_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every meta row whose name starts with ``prefix``, by name (an index range, not a scan)."""
        ...

    def client(self, client_id: str) -> ClientRow | None: ...
    def clients(self, tenant: str) -> list[ClientRow]:
        """Every OAuth client of a tenant, oldest first."""
        ...

    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]: ...
    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        """Entries of every tenant in log order (what the Merkle tree covers)."""
        ...

    def audit_find(self, query: AuditQuery) -> list[AuditRow]: ...
    def audit_size(self) -> int: ...
    def audit_node(self, level: int, index: int) -> bytes | None: ...
    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]: ...
    def latest_audit_checkpoint(self) -> AuditCheckpoint | None: ...
    # -- identity --
    def user(self, user_id: str) -> UserRow | None: ...
    def user_by_username(self, tenant: str, username: str) -> UserRow | None: ...
    def users(self, tenant: str) -> list[UserRow]: ...
    def linked_user(self, provider: str, issuer: str, subject: str) -> str | None: ...
    def app(self, client_id: str) -> AppRow | None: ...
    def login_session(self, session_id: str) -> LoginSessionRow | None: ...
    def refresh_token(self, token_hash: bytes) -> RefreshTokenRow | None: ...
    def revoked_jtis(self, after_seq: int, now_ms: int) -> list[tuple[int, str, int]]:
        """Revoked access-token ids not yet expired, with seq > after_seq: (seq, jti, expires_ms)."""
        ...

    # -- break-the-glass --
    def break_glass(self, tenant: str, grant_id: str) -> BreakGlassRow | None: ...
    def break_glass_rows(self, tenant: str, *, status: str | None = None, user_id: str | None = None,
                         expires_after_ms: int | None = None, limit: int = 500) -> list[BreakGlassRow]:
        """Grants, newest first, filtered by review status, user, and/or still running after a time."""
        ...

    # -- compliance registers --
    def register_entry(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None: ...
    def register_entries(self, tenant: str, kind: str, *, status: str | None = None,
                         limit: int = 1000) -> list[RegisterRow]:
        """Entries of one register, newest first, optionally of one status."""
    # -- subscriptions --
    def subscription_changes(self, limit: int) -> list[ChangeRow]:
        """The oldest queued writes for the subscription matcher."""
        ...

    def due_deliveries(self, now_ms: int, limit: int) -> list[DeliveryRow]:
        """Queued notifications due at ``now_ms``, oldest due first."""
        ...

    def subscription_backlog(self) -> tuple[int, int]:
        """(writes waiting for the matcher, notifications waiting to be sent)."""
        ...

    def close(self) -> None: ...


class ChangeFeed(Protocol):
    """What other processes changed (services/coherence.py); only stores shared by processes have one."""

    def changes_since(self, seq: int | None) -> tuple[int, list[tuple[str, str]] | None]:
        """(head, the (kind, key) rows after ``seq``), or (head, None): the rows are unknown, drop all."""
        ...


class SchemaError(Exception):
    """The database schema cannot be brought to this release's version (one line for the operator)."""


class SchemaTooNew(SchemaError):
    """The database was migrated by a newer fhirvault than this one: opening it could corrupt it."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"database schema version {found} is newer than this fhirvault ({known}): upgrade fhirvault")
        self.found = found
        self.known = known


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step; version N takes the database from N-1 to N."""

    version: int
    description: str


class SchemaMigrator(Protocol):
    """Versioned schema migrations of a store's database (``fhirvault migrate``).

    Each step runs in its own transaction with the update of the recorded version, and is
    idempotent (a database that already has a step's change is marked, not altered).
    """

    @property
    def latest(self) -> int:
        """The schema version this code creates and reads."""
        ...

    def current(self) -> int:
        """The version recorded in the database (0: empty database)."""
        ...

    def pending(self) -> list[Migration]:
        """The steps ``apply`` would run; raises SchemaTooNew for a database newer than the code."""
        ...

    def apply(self) -> list[Migration]:
        """Run the pending steps in order and return them; raises SchemaTooNew like ``pending``."""
        ...


class Leadership(Protocol):
    """Cluster singletons (the audit checkpointer…): one process of the cluster does the work."""

    def lead(self, role: str) -> bool:
        """True while this process holds ``role``. Call it before each round of work: it takes the
        role when it is free, and answers False once it has been lost (e.g. the connection dropped)."""
        ...

    def fence(self, tx: WriteTx, role: str) -> None:
        """Inside a write transaction: raise ``LostLeadership`` unless this process still holds
        ``role``, so a former leader cannot commit the singleton's write after losing the role."""
        ...

    def close(self) -> None: ...


class LostLeadership(Exception):
    """This process no longer holds a cluster singleton's role (raised by ``Leadership.fence``)."""


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


