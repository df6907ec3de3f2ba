"""ResourceStore in process memory, with the semantics of SqliteStore.

For tests and throw-away servers. Jobs run one at a time under a lock. Each
``_Tx`` mutation records its inverse in an undo log; a job that raises has its
log replayed backwards, so it leaves no trace while the jobs before and after
it keep their writes (as SqliteStore's SAVEPOINT per job does). Reads take the
same lock, so another thread never sees a job half done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

from fhirvault.ports import (
    SEARCH_TAG_BYTES,
    AppRow,
    AuditCheckpoint,
    AuditQuery,
    AuditRow,
    AuthCodeRow,
    BreakGlassRow,
    ChangeRow,
    ClientRow,
    DeliveryRow,
    HistoryQuery,
    LoginSessionRow,
    RefreshTokenRow,
    RegisterRow,
    SearchQuery,
    StoredVersion,
    TenantKeyRow,
    UserRow,
    WrappedKey,
)

if TYPE_CHECKING:
    from fhirvault.ports import ResourceStore, WriteTx

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
X = TypeVar("X")


class ConstraintError(Exception):
    """A uniqueness rule was broken (SqliteStore raises sqlite3.IntegrityError)."""


@dataclass
class _Tables:
    # seq -> (tenant, version); insertion order is seq order, never reordered.
    versions: dict[int, tuple[str, StoredVersion]] = field(default_factory=dict)
    version_seq: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    current: dict[tuple[str, str, str], int] = field(default_factory=dict)
    data_keys: dict[str, tuple[str, WrappedKey]] = field(default_factory=dict)  # key_id -> (tenant, key)
    data_key_ids: dict[tuple[str, bytes], str] = field(default_factory=dict)  # (tenant, lookup) -> key_id
    tenant_keys: dict[tuple[str, int], TenantKeyRow] = field(default_factory=dict)
    meta: dict[str, bytes] = field(default_factory=dict)
    clients: dict[str, ClientRow] = field(default_factory=dict)
    jti: dict[str, int] = field(default_factory=dict)
    audit: list[AuditRow] = field(default_factory=list)  # seq order; seq == index + 1
    audit_nodes: dict[tuple[int, int], bytes] = field(default_factory=dict)
    audit_checkpoints: dict[int, AuditCheckpoint] = field(default_factory=dict)
    # search: resource key (rk) assigned at creation, and each resource's tags
    rks: dict[tuple[str, str, str], int] = field(default_factory=dict)
    tags: dict[int, frozenset[bytes]] = field(default_factory=dict)
    tagged: dict[bytes, frozenset[int]] = field(default_factory=dict)  # tag -> rks
    # -- break-the-glass --
    break_glass: dict[str, BreakGlassRow] = field(default_factory=dict)
    registers: dict[tuple[str, str, str], RegisterRow] = field(default_factory=dict)  # (tenant, kind, id)
    # -- identity --
    users: dict[str, UserRow] = field(default_factory=dict)
    links: dict[tuple[str, str, str], str] = field(default_factory=dict)
    apps: dict[str, AppRow] = field(default_factory=dict)
    login_sessions: dict[str, LoginSessionRow] = field(default_factory=dict)
    codes: dict[bytes, AuthCodeRow] = field(default_factory=dict)
    refresh: dict[bytes, RefreshTokenRow] = field(default_factory=dict)
    issued: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # jti -> (family, session, exp)
    revoked: dict[str, tuple[int, int]] = field(default_factory=dict)  # jti -> (seq, exp)
    revoked_seq: int = 0
    # -- subscriptions: id -> row; ids are never reused --
    changes: dict[int, ChangeRow] = field(default_factory=dict)
    deliveries: dict[int, DeliveryRow] = field(default_factory=dict)
    queue_ids: list[int] = field(default_factory=lambda: [0])


def _limited(rows: Iterable[X], limit: int) -> list[X]:
    # SQLite's LIMIT: a negative limit means no limit.
    return list(islice(rows, limit if limit >= 0 else None))


def _matches(q: HistoryQuery, tenant: str, v: StoredVersion) -> bool:
    return (
        tenant == q.tenant
        and (q.type is None or v.type == q.type)
        and (q.id is None or v.id == q.id)
        and (q.types is None or v.type in q.types)
        and (q.since_ms is None or v.last_updated_ms >= q.since_ms)
        and (q.before_seq is None or v.seq < q.before_seq)
    )


def _tenant_keys(t: _Tables, tenant: str) -> list[TenantKeyRow]:
    return sorted((r for (tn, _), r in t.tenant_keys.items() if tn == tenant), key=lambda r: r.version)


def _current(t: _Tables, tenant: str, type: str, id: str) -> StoredVersion | None:
    seq = t.current.get((tenant, type, id))
    return None if seq is None else t.versions[seq][1]


class _Tx:
    """WriteTx over the tables; every change first logs how to undo it."""

    __slots__ = ("_t", "committed", "undo")

    def __init__(self, tables: _Tables) -> None:
        self._t = tables
        self.undo: list[Callable[[], object]] = []
        self.committed: list[Callable[[], None]] = []

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.committed.append(fn)

    def serialize(self, key: str) -> bool:
        return False  # one writer: jobs already run one at a time

    def invalidate(self, kind: str, key: str) -> None:
        pass  # one process: its caches are invalidated by on_commit callbacks

    def _set(self, table: dict[K, V], key: K, value: V) -> None:
        if key in table:
            old = table[key]
            self.undo.append(lambda: table.__setitem__(key, old))
        else:
            self.undo.append(lambda: table.pop(key))
        table[key] = value

    def _delete(self, table: dict[K, V], key: K) -> None:
        old = table.pop(key)
        self.undo.append(lambda: table.__setitem__(key, old))

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        return _current(self._t, tenant, type, id)

    def insert_version(self, tenant: str, version: StoredVersion) -> int:
        t = self._t
        vkey = (tenant, version.type, version.id, version.version)
        if vkey in t.version_seq:
            raise ConstraintError(f"version {vkey} already exists")
        seq = next(reversed(t.versions), 0) + 1  # like SQLite's rowid: max + 1
        self._set(t.versions, seq, (tenant, dataclasses.replace(version, seq=seq)))
        self._set(t.version_seq, vkey, seq)
        self._set(t.current, (tenant, version.type, version.id), seq)
        if (tenant, version.type, version.id) not in t.rks:
            self._set(t.rks, (tenant, version.type, version.id), max(t.rks.values(), default=0) + 1)
        return seq

    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None:
        t = self._t
        rk = t.rks.get((tenant, type, id))
        if rk is None:
            raise LookupError("set_search_tags on a resource that has no version")
        old, new = t.tags.get(rk, frozenset()), frozenset(tags)
        for tag in old - new:
            self._set(t.tagged, tag, t.tagged[tag] - {rk})
        for tag in new - old:
            self._set(t.tagged, tag, t.tagged.get(tag, frozenset()) | {rk})
        self._set(t.tags, rk, new)

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        key_id = self._t.data_key_ids.get((tenant, lookup))
        return None if key_id is None else self._t.data_keys[key_id][1]

    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None:
        t = self._t
        if key.key_id in t.data_keys or (tenant, lookup) in t.data_key_ids:
            raise ConstraintError("data key id or (tenant, lookup) already exists")
        self._set(t.data_keys, key.key_id, (tenant, key))
        self._set(t.data_key_ids, (tenant, lookup), key.key_id)

    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None:
        row = self._t.data_keys.get(key_id)
        if row is not None:  # an unknown id changes nothing, like SQL UPDATE
            new = WrappedKey(key_id, wrapped, kek_version, compartment)
            self._set(self._t.data_keys, key_id, (row[0], new))

    def all_data_keys(self, tenant: str) -> list[WrappedKey]:
        return [k for tn, k in self._t.data_keys.values() if tn == tenant]

    def erase_key(self, tenant: str, key_id: str,
                  known: tuple[int, list[tuple[int, str, str]]] | None = None) -> tuple[int, int]:
        t = self._t
        seqs = [seq for seq, (tn, v) in t.versions.items() if tn == tenant and v.key_id == key_id]
        resources = 0
        for where, seq in list(t.current.items()):
            if seq in seqs:
                resources += 1
                self._delete(t.current, where)
                rk = t.rks.get(where)
                if rk is not None:
                    for tag in t.tags.get(rk, frozenset()):
                        self._set(t.tagged, tag, t.tagged[tag] - {rk})
                    self._set(t.tags, rk, frozenset())
        for seq in seqs:
            _tn, v = t.versions[seq]
            self._delete(t.version_seq, (tenant, v.type, v.id, v.version))
            self._delete(t.versions, seq)
        if key_id in t.data_keys and t.data_keys[key_id][0] == tenant:
            self._delete(t.data_keys, key_id)
            for ref, kid in list(t.data_key_ids.items()):
                if kid == key_id:
                    self._delete(t.data_key_ids, ref)
        return resources, len(seqs)

    def destroy_tenant_keys(self, tenant: str) -> tuple[int, int]:
        t = self._t
        keks = [k for k in t.tenant_keys if k[0] == tenant]
        for k in keks:
            self._delete(t.tenant_keys, k)
        dks = [kid for kid, (tn, _) in t.data_keys.items() if tn == tenant]
        for kid in dks:
            self._delete(t.data_keys, kid)
        for ref in [r for r in t.data_key_ids if r[0] == tenant]:
            self._delete(t.data_key_ids, ref)
        return len(keks), len(dks)

    def delete_meta(self, name: str) -> None:
        if name in self._t.meta:
            self._delete(self._t.meta, name)

    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None:
        if (row.tenant, row.version) in self._t.tenant_keys:
            raise ConstraintError(f"tenant key {row.tenant} v{row.version} already exists")
        self._set(self._t.tenant_keys, (row.tenant, row.version), dataclasses.replace(row, created_ms=created_ms))

    def replace_tenant_key(self, row: TenantKeyRow) -> None:
        if (row.tenant, row.version) in self._t.tenant_keys:
            self._set(self._t.tenant_keys, (row.tenant, row.version), row)

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return _tenant_keys(self._t, tenant)

    def get_meta(self, name: str) -> bytes | None:
        return self._t.meta.get(name)

    def meta_names(self) -> list[str]:
        return sorted(self._t.meta)

    def set_meta(self, name: str, value: bytes) -> None:
        self._set(self._t.meta, name, value)

    def insert_client(self, row: ClientRow) -> None:
        if row.client_id in self._t.clients:
            raise ConstraintError(f"client {row.client_id} already exists")
        self._set(self._t.clients, row.client_id, row)

    def client_for_update(self, client_id: str) -> ClientRow | None:
        return self._t.clients.get(client_id)

    def update_client(self, row: ClientRow) -> None:
        old = self._t.clients.get(row.client_id)
        if old is not None:  # created_ms and tenant stay as registered
            self._set(self._t.clients, row.client_id,
                      dataclasses.replace(row, tenant=old.tenant, created_ms=old.created_ms))

    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool:
        seen = self._t.jti
        for old in [j for j, exp in seen.items() if exp < now_ms]:
            self._delete(seen, old)
        if jti in seen:
            return False
        self._set(seen, jti, expires_ms)
        return True

    def append_audit(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes],
                     tags: bytes = b"") -> Callable[[], int]:
        audit = self._t.audit
        seq = len(audit) + 1
        audit.append(AuditRow(seq, tenant, ts_ms, tags, seal(seq)))
        self.undo.append(audit.pop)
        return lambda: seq

    def add_audit_nodes(self, nodes: list[tuple[int, int, bytes]]) -> None:
        for level, index, digest in nodes:
            if (level, index) not in self._t.audit_nodes:
                self._set(self._t.audit_nodes, (level, index), digest)

    def add_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        if checkpoint.size in self._t.audit_checkpoints:
            raise ConstraintError("checkpoint already recorded")
        self._set(self._t.audit_checkpoints, checkpoint.size, checkpoint)


    # -- break-the-glass --
    def put_break_glass(self, row: BreakGlassRow) -> None:
        self._set(self._t.break_glass, row.grant_id, row)

    # -- compliance registers --
    def put_register_entry(self, row: RegisterRow) -> None:
        self._set(self._t.registers, (row.tenant, row.kind, row.entry_id), row)

    def register_entry_for_update(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        return self._t.registers.get((tenant, kind, entry_id))

    # -- subscriptions --
    def _next_id(self) -> int:
        ids = self._t.queue_ids
        ids[0] += 1
        return ids[0]

    def add_change(self, tenant: str, type: str, rid: str, version: int, now_ms: int) -> None:
        key = self._next_id()
        self._set(self._t.changes, key, ChangeRow(key, tenant, type, rid, version, now_ms))

    def remove_changes(self, ids: list[int]) -> None:
        for key in ids:
            old = self._t.changes.pop(key, None)
            if old is not None:
                self.undo.append(functools.partial(self._t.changes.__setitem__, key, old))

    def put_delivery(self, row: DeliveryRow) -> None:
        if row.id == 0:
            row = dataclasses.replace(row, id=self._next_id())
        self._set(self._t.deliveries, row.id, row)

    def remove_delivery(self, delivery_id: int) -> None:
        if delivery_id in self._t.deliveries:
            old = self._t.deliveries.pop(delivery_id)
            self.undo.append(lambda: self._t.deliveries.__setitem__(delivery_id, old))

    # -- identity --
    def insert_user(self, row: UserRow) -> None:
        if row.user_id in self._t.users or any(
                u.tenant == row.tenant and u.username == row.username for u in self._t.users.values()):
            raise ConstraintError("user already exists")
        self._set(self._t.users, row.user_id, row)

    def update_user(self, row: UserRow) -> None:
        self._set(self._t.users, row.user_id, row)

    def user_for_update(self, user_id: str) -> UserRow | None:
        return self._t.users.get(user_id)

    def link_identity(self, provider: str, issuer: str, subject: str, user_id: str) -> None:
        self._set(self._t.links, (provider, issuer, subject), user_id)

    def upsert_app(self, row: AppRow) -> None:
        self._set(self._t.apps, row.client_id, row)

    def insert_login_session(self, row: LoginSessionRow) -> None:
        if row.session_id in self._t.login_sessions:
            raise ConstraintError("session already exists")
        self._set(self._t.login_sessions, row.session_id, row)

    def touch_login_session(self, session_id: str, now_ms: int) -> None:
        row = self._t.login_sessions.get(session_id)
        if row is not None:
            self._set(self._t.login_sessions, session_id,
                      dataclasses.replace(row, last_seen_ms=max(row.last_seen_ms, now_ms)))

    def end_login_session(self, session_id: str, now_ms: int) -> None:
        row = self._t.login_sessions.get(session_id)
        if row is not None and row.ended_ms == 0:
            self._set(self._t.login_sessions, session_id, dataclasses.replace(row, ended_ms=now_ms))

    def insert_code(self, row: AuthCodeRow) -> None:
        if row.code_hash in self._t.codes:
            raise ConstraintError("code already exists")
        self._set(self._t.codes, row.code_hash, row)

    def consume_code(self, code_hash: bytes, now_ms: int) -> AuthCodeRow | None:
        for old in [h for h, c in self._t.codes.items() if c.expires_ms < now_ms - 3_600_000]:
            self._delete(self._t.codes, old)
        row = self._t.codes.get(code_hash)
        if row is not None:
            self._set(self._t.codes, code_hash, dataclasses.replace(row, used=True))
        return row

    def insert_refresh(self, row: RefreshTokenRow) -> None:
        if row.token_hash in self._t.refresh:
            raise ConstraintError("refresh token already exists")
        self._set(self._t.refresh, row.token_hash, row)

    def consume_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._t.refresh.get(token_hash)
        if row is not None:
            self._set(self._t.refresh, token_hash, dataclasses.replace(row, used=True))
        return row

    def record_issued(self, jti: str, family_id: str, session_id: str, expires_ms: int) -> None:
        if jti in self._t.issued:
            raise ConstraintError("jti already recorded")
        self._set(self._t.issued, jti, (family_id, session_id, expires_ms))

    def _add_revoked(self, jti: str, expires_ms: int) -> bool:
        if jti in self._t.revoked:
            return False
        seq = self._t.revoked_seq + 1
        old_seq = self._t.revoked_seq
        self.undo.append(lambda: setattr(self._t, "revoked_seq", old_seq))
        self._t.revoked_seq = seq
        self._set(self._t.revoked, jti, (seq, expires_ms))
        return True

    def revoke_tokens(self, now_ms: int, *, family_id: str | None = None, session_id: str | None = None) -> int:
        if family_id is None and session_id is None:
            return 0
        n = 0
        for h, r in list(self._t.refresh.items()):
            match = r.family_id == family_id if family_id is not None else r.session_id == session_id
            if match and not r.revoked:
                self._set(self._t.refresh, h, dataclasses.replace(r, revoked=True))
                n += 1
        for jti, (fam, sid, exp) in list(self._t.issued.items()):
            match = fam == family_id if family_id is not None else sid == session_id
            if match and exp >= now_ms and self._add_revoked(jti, exp):
                n += 1
        return n

    def revoke_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._t.refresh.get(token_hash)
        if row is not None:
            self._set(self._t.refresh, token_hash, dataclasses.replace(row, revoked=True))
        return row

    def revoke_jti(self, jti: str, expires_ms: int, now_ms: int) -> None:
        self._add_revoked(jti, expires_ms)

    def end_user_sessions(self, user_id: str, now_ms: int) -> int:
        ids = [r.session_id for r in self._t.login_sessions.values() if r.user_id == user_id and r.ended_ms == 0]
        for sid in ids:
            self.end_login_session(sid, now_ms)
            self.revoke_tokens(now_ms, session_id=sid)
        return len(ids)

def _run_callback(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a commit hook must not turn a durable write into a failure
        logging.getLogger("fhirvault.store").exception("commit callback failed")


class MemoryStore:
    """The in-memory store: nothing survives the process."""

    def __init__(self) -> None:
        self._t = _Tables()
        # Reentrant: a job may read through the store (e.g. KeyRing.by_id) and
        # then sees its own uncommitted writes, where SqliteStore would not.
        self._lock = threading.RLock()
        self._in_job = False
        self._closed = False

    # -- writes -------------------------------------------------------------
    def _run(self, fn: Callable[[WriteTx], T]) -> T:
        """Run one job; the caller holds the lock."""
        if self._closed:
            raise RuntimeError("store is closed")
        if self._in_job:
            raise RuntimeError("a write job cannot start another write")
        tx = _Tx(self._t)
        self._in_job = True
        try:
            value = fn(tx)
            for callback in tx.committed:
                _run_callback(callback)
            return value
        except BaseException as exc:
            for undo in reversed(tx.undo):
                undo()
            if isinstance(exc, StopIteration):
                # It cannot cross a coroutine or an asyncio Future (PEP 479);
                # turn it into the RuntimeError a generator would raise.
                raise RuntimeError("write job raised StopIteration") from exc
            raise
        finally:
            self._in_job = False

    async def write(self, name: str, fn: Callable[[WriteTx], T]) -> T:
        # Uncontended (the usual case): run inline, jobs are short. If another
        # thread holds the store, wait for it in a worker, not on the event loop.
        if self._lock.acquire(blocking=False):
            try:
                return self._run(fn)
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.write_sync, name, fn)

    def write_sync(self, name: str, fn: Callable[[WriteTx], T]) -> T:
        with self._lock:
            return self._run(fn)

    # -- reads --------------------------------------------------------------
    def read_current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        with self._lock:
            return _current(self._t, tenant, type, id)

    def read_version(self, tenant: str, type: str, id: str, version: int) -> StoredVersion | None:
        with self._lock:
            seq = self._t.version_seq.get((tenant, type, id, version))
            return None if seq is None else self._t.versions[seq][1]

    def _history(self, q: HistoryQuery) -> Iterator[StoredVersion]:
        return (v for tn, v in reversed(self._t.versions.values()) if _matches(q, tn, v))

    def history(self, query: HistoryQuery) -> list[StoredVersion]:
        with self._lock:
            return _limited(self._history(query), query.limit)

    def history_count(self, query: HistoryQuery) -> int:
        with self._lock:
            return sum(1 for _ in self._history(query))

    def search(self, q: SearchQuery) -> list[tuple[int, StoredVersion]]:
        with self._lock:
            t = self._t
            rows: list[tuple[int, StoredVersion]] = []
            for (tenant, type, id), rk in t.rks.items():
                if tenant != q.tenant or type not in q.types:
                    continue
                if (q.after_rk is not None and rk <= q.after_rk) or (q.before_rk is not None and rk >= q.before_rk):
                    continue
                if q.ids is not None and id not in q.ids:
                    continue
                if not all(any(rk in t.tagged.get(tag, ()) for tag in group) for group in q.tag_groups):
                    continue
                v = _current(t, tenant, type, id)
                if v is not None and not v.deleted:
                    rows.append((rk, v))
            rows.sort(key=lambda r: r[0], reverse=q.descending)
            return _limited(rows, q.limit)

    def count_current(self, tenant: str, type: str) -> int:
        with self._lock:
            live = (_current(self._t, tn, tp, id) for (tn, tp, id) in self._t.rks if tn == tenant and tp == type)
            return sum(1 for v in live if v is not None and not v.deleted)

    def max_rk(self) -> int:
        with self._lock:
            return max(self._t.rks.values(), default=0)

    def max_seq(self) -> int:
        with self._lock:
            return next(reversed(self._t.versions), 0)

    def data_key(self, tenant: str, key_id: str) -> WrappedKey | None:
        with self._lock:
            row = self._t.data_keys.get(key_id)
            return row[1] if row is not None and row[0] == tenant else None

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        with self._lock:
            key_id = self._t.data_key_ids.get((tenant, lookup))
            return None if key_id is None else self._t.data_keys[key_id][1]

    def key_versions(self, tenant: str, key_id: str) -> list[tuple[int, str, str]]:
        with self._lock:
            return [(seq, v.type, v.id) for seq, (tn, v) in self._t.versions.items()
                    if tn == tenant and v.key_id == key_id]

    def key_usage(self, tenant: str, key_id: str) -> list[tuple[str, str, int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        with self._lock:
            for tn, v in self._t.versions.values():
                if tn == tenant and v.key_id == key_id:
                    n, newest = out.get((v.type, v.id), (0, 0))
                    out[(v.type, v.id)] = (n + 1, max(newest, v.last_updated_ms))
        return [(tp, id, n, newest) for (tp, id), (n, newest) in out.items()]

    def key_activity(self, tenant: str) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for tn, v in self._t.versions.values():
                if tn == tenant:
                    n, newest = out.get(v.key_id, (0, 0))
                    out[v.key_id] = (n + 1, max(newest, v.last_updated_ms))
        return out

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        with self._lock:
            return (sum(1 for k in self._t.current if k[0] == tenant),
                    sum(1 for tn, _v in self._t.versions.values() if tn == tenant))

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        with self._lock:
            return _tenant_keys(self._t, tenant)

    def get_meta(self, name: str) -> bytes | None:
        with self._lock:
            return self._t.meta.get(name)

    def meta_with_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return sorted((k, v) for k, v in self._t.meta.items() if k.startswith(prefix))

    def client(self, client_id: str) -> ClientRow | None:
        with self._lock:
            return self._t.clients.get(client_id)

    def clients(self, tenant: str) -> list[ClientRow]:
        with self._lock:
            rows = [c for c in self._t.clients.values() if c.tenant == tenant]
        return sorted(rows, key=lambda c: (c.created_ms, c.client_id))

    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]:
        with self._lock:
            rows = ((r.seq, r.ts_ms, r.blob) for r in self._t.audit[after_seq:] if r.tenant == tenant)
            return _limited(rows, limit)

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        with self._lock:
            return _limited(self._t.audit[max(after_seq, 0):], limit)

    def audit_find(self, q: AuditQuery) -> list[AuditRow]:
        wanted = set(q.tags)
        step = SEARCH_TAG_BYTES

        def keep(r: AuditRow) -> bool:
            return (r.tenant == q.tenant and r.seq > q.after_seq
                    and (q.before_seq is None or r.seq < q.before_seq)
                    and (q.since_ms is None or r.ts_ms >= q.since_ms)
                    and (q.until_ms is None or r.ts_ms <= q.until_ms)
                    and (not wanted or any(r.tags[i : i + step] in wanted for i in range(0, len(r.tags), step))))

        with self._lock:
            rows = reversed(self._t.audit) if q.descending else iter(self._t.audit)
            return _limited((r for r in rows if keep(r)), q.limit)

    def audit_size(self) -> int:
        with self._lock:
            return len(self._t.audit)

    def audit_node(self, level: int, index: int) -> bytes | None:
        with self._lock:
            return self._t.audit_nodes.get((level, index))

    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        with self._lock:
            return _limited((c for s, c in sorted(self._t.audit_checkpoints.items()) if s > after_size), limit)

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None:
        with self._lock:
            cps = self._t.audit_checkpoints
            return cps[max(cps)] if cps else None

    # -- break-the-glass --
    def break_glass(self, tenant: str, grant_id: str) -> BreakGlassRow | None:
        with self._lock:
            row = self._t.break_glass.get(grant_id)
            return row if row is not None and row.tenant == tenant else None

    def break_glass_rows(self, tenant: str, *, status: str | None = None, user_id: str | None = None,
                         expires_after_ms: int | None = None, limit: int = 500) -> list[BreakGlassRow]:
        with self._lock:
            rows = [r for r in self._t.break_glass.values() if r.tenant == tenant
                    and (status is None or r.status == status) and (user_id is None or r.user_id == user_id)
                    and (expires_after_ms is None or r.expires_ms > expires_after_ms)]
        return sorted(rows, key=lambda r: r.created_ms, reverse=True)[:limit]

    # -- compliance registers --
    def register_entry(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        with self._lock:
            return self._t.registers.get((tenant, kind, entry_id))

    def register_entries(self, tenant: str, kind: str, *, status: str | None = None,
                         limit: int = 1000) -> list[RegisterRow]:
        with self._lock:
            rows = [r for (t, k, _), r in self._t.registers.items() if t == tenant and k == kind
                    and (status is None or r.status == status)]
        return sorted(rows, key=lambda r: (-r.created_ms, r.entry_id))[:limit]

    # -- identity --
    def user(self, user_id: str) -> UserRow | None:
        with self._lock:
            return self._t.users.get(user_id)

    def user_by_username(self, tenant: str, username: str) -> UserRow | None:
        with self._lock:
            return next((u for u in self._t.users.values() if u.tenant == tenant and u.username == username), None)

    def users(self, tenant: str) -> list[UserRow]:
        with self._lock:
            return sorted((u for u in self._t.users.values() if u.tenant == tenant), key=lambda u: u.username)

    def linked_user(self, provider: str, issuer: str, subject: str) -> str | None:
        with self._lock:
            return self._t.links.get((provider, issuer, subject))

    def app(self, client_id: str) -> AppRow | None:
        with self._lock:
            return self._t.apps.get(client_id)

    def login_session(self, session_id: str) -> LoginSessionRow | None:
        with self._lock:
            return self._t.login_sessions.get(session_id)

    def refresh_token(self, token_hash: bytes) -> RefreshTokenRow | None:
        with self._lock:
            return self._t.refresh.get(token_hash)

    def revoked_jtis(self, after_seq: int, now_ms: int) -> list[tuple[int, str, int]]:
        with self._lock:
            rows = [(seq, jti, exp) for jti, (seq, exp) in self._t.revoked.items() if seq > after_seq and exp >= now_ms]
        return sorted(rows)

    def subscription_changes(self, limit: int) -> list[ChangeRow]:
        with self._lock:
            return [self._t.changes[k] for k in sorted(self._t.changes)[:limit]]

    def due_deliveries(self, now_ms: int, limit: int) -> list[DeliveryRow]:
        with self._lock:
            due = sorted((r for r in self._t.deliveries.values() if r.due_ms <= now_ms), key=lambda r: (r.due_ms, r.id))
        return due[:limit]

    def subscription_backlog(self) -> tuple[int, int]:
        with self._lock:
            return len(self._t.changes), len(self._t.deliveries)

    def close(self) -> None:
        with self._lock:  # waits for a running job; later writes raise
            self._closed = True


if TYPE_CHECKING:
    _store_conforms: ResourceStore = MemoryStore()
    _tx_conforms: WriteTx = _Tx(_Tables())
