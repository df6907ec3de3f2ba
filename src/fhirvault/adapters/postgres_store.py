"""ResourceStore on PostgreSQL (psycopg 3), with group commit.

Same shape as the SQLite store: one writer thread per process owns a dedicated
write connection and runs every job waiting in its queue inside one transaction
(each under its own SAVEPOINT, so one failure undoes only its job), then COMMITs
with ``synchronous_commit=on`` — the WAL is flushed before any caller hears
back. Async callers only await a future: the event loop never blocks on the
database. Reads come from a connection pool (autocommit, read-only sessions),
so they never wait for the writer.

Several processes may share one database. A transaction's audit entries wait
in the transaction object and are written together at its end (``_Tx.flush_audit``):
only then is the log's counter row (``audit.audit_head``) locked, and it is held
to the COMMIT, so leaf indexes are gap-free and in commit order across all of
them, while the lock covers one UPDATE, one INSERT and the COMMIT (its WAL flush
included: synchronous_commit stays on), not the batch's jobs.
Cross-process critical sections (conditional create) use transaction advisory
locks, taken while the jobs run, hence before that row lock, and by one job of a
transaction at most (see ``_Tx.serialize``), so no two transactions wait on each
other in opposite orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from fhirvault.adapters import postgres_failover as failover
from fhirvault.adapters.postgres_schema import (
    APP_GRANTS,
    APP_ROLE,
    MIGRATIONS,
    SCHEMA_VERSION,
)

# Row mapping and job delivery are the SQLite store's: the same columns, the same outcomes.
from fhirvault.adapters.sqlite_store import (
    _BG_COLUMNS,
    _CLIENT_COLUMNS,
    _CODE_COLUMNS,
    _REFRESH_COLUMNS,
    _REG_COLUMNS,
    _USER_COLUMNS,
    _break_glass,
    _checkpoint,
    _client,
    _code,
    _deliver,
    _refresh,
    _register,
    _run_callbacks,
    _settle,
    _user,
)
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
    LostLeadership,
    Migration,
    RefreshTokenRow,
    RegisterRow,
    SchemaError,
    SchemaTooNew,
    SearchQuery,
    StoredVersion,
    StoreUnavailable,
    TenantKeyRow,
    UserRow,
    VersionConflict,
    WrappedKey,
    WriteTx,
)
from fhirvault.services.coherence import REVOCATIONS

T = TypeVar("T")
log = logging.getLogger("fhirvault.store")

_MAX_BATCH = 512
# Writer connections per process, each with its own thread and transaction, taking jobs from one
# queue: a job is mostly round trips to the server, so several overlap them (see docs/postgresql.md).
WRITERS = 4
_COHERENCE_PRUNE_EVERY = 1000  # every this many seqs, drop log rows older than the last _COHERENCE_KEEP
_COHERENCE_KEEP = 10_000
_COHERENCE_READ_MAX = 5_000  # a process further behind than this drops all its caches instead
_PROBE = 2000  # index entries counted per criterion to pick the one that drives a search
_SEEK_TAGS = 8  # a non-driving criterion of up to this many tags is checked by index seeks, a larger one in c.tags
_IN_TAG_LIST = ("EXISTS (SELECT 1 FROM generate_series(1, length(c.tags), 8) i"
                " WHERE substring(c.tags FROM i FOR 8) = ANY(%s::bytea[]))")
assert SEARCH_TAG_BYTES == 8, "_IN_TAG_LIST slices c.tags in 8-byte tags"
_MIGRATION_LOCK = 0x66_68_69_72_76_61_75_6C  # "fhirvaul": one schema migration at a time per database

_VERSION_COLUMNS = "type, id, version, last_updated, deleted, key_id, blob, seq"
# Statements are built from constants only; every value is a bound parameter.
_SELECT_VERSIONS = f"SELECT {_VERSION_COLUMNS} FROM resource_versions"  # noqa: S608
_SELECT_CURRENT = (
    f"{_SELECT_VERSIONS} WHERE seq = (SELECT seq FROM resources_current WHERE tenant=%s AND type=%s AND id=%s)"  # noqa: S608
)
# A resource's tag list stored and the index moved to it in one round trip: `o` is the row as the
# statement started (old tags), entries only in the old list go, entries only in the new one come.
_SET_SEARCH_TAGS = (
    "WITH o AS (SELECT rk, tags FROM resources_current WHERE tenant=%s AND type=%s AND id=%s),"
    " old AS (SELECT substring(o.tags FROM g FOR %s) AS tag FROM o, generate_series(1, length(o.tags), %s) g),"
    " u AS (UPDATE resources_current c SET tags=%s FROM o WHERE c.rk=o.rk AND c.tags IS DISTINCT FROM %s),"
    # (the pairs are looked up by the primary key: `rk = scalar AND tag = ANY(array)`)
    " d AS (DELETE FROM search_tags WHERE rk = (SELECT rk FROM o)"
    " AND tag = ANY(ARRAY(SELECT tag FROM old WHERE NOT tag = ANY(%s::bytea[])))),"
    " i AS (INSERT INTO search_tags (tag, rk) SELECT t, o.rk FROM o, unnest(%s::bytea[]) t"
    " WHERE t NOT IN (SELECT tag FROM old) ON CONFLICT DO NOTHING)"
    " SELECT (SELECT rk FROM o)")
_AUDIT_COLUMNS = "seq, tenant, ts_ms, tags, blob"
_SELECT_CHECKPOINTS = ("SELECT size, ts_ms, root, key_id, signature, witnessed, proof_from, proof"
                       " FROM audit.audit_checkpoints")
# The newest row stays, so its seq is never reused (other processes poll by seq).
_PURGE_REVOKED = "DELETE FROM revoked_jtis WHERE expires_ms < %s AND seq < (SELECT max(seq) FROM revoked_jtis)"


def _marks(n: int) -> str:
    return ",".join(["%s"] * n)


def _version(r: tuple[Any, ...]) -> StoredVersion:
    return StoredVersion(r[0], r[1], r[2], r[3], bool(r[4]), r[5], bytes(r[6]), r[7])


def _audit_row(r: tuple[Any, ...]) -> AuditRow:
    return AuditRow(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]))


def _user_values(u: UserRow) -> tuple[Any, ...]:
    return (u.user_id, u.tenant, u.username, u.password_hash, u.role, u.fhir_user, u.organization, u.clearances,
            u.totp, u.totp_last_step, u.disabled, u.failures, u.locked_until_ms, u.created_ms)


def _wrapped(r: tuple[Any, ...]) -> WrappedKey:
    return WrappedKey(r[0], bytes(r[1]), r[2], bytes(r[3]))


def _tenant_key(r: tuple[Any, ...]) -> TenantKeyRow:
    return TenantKeyRow(r[0], r[1], bytes(r[2]), r[3], r[4])


def _has_nul(args: Any) -> bool:
    return any(isinstance(a, str) and "\x00" in a for a in args)


def lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for a name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _duplicate(what: str) -> pg_errors.UniqueViolation:
    # Raised by the store itself (ON CONFLICT DO NOTHING found a row), so the transaction stays
    # usable, as after SQLite's refused INSERT: the caller may catch it and go on.
    return pg_errors.UniqueViolation(f"{what} already exists")


class _VersionTaken(pg_errors.UniqueViolation, VersionConflict):
    """A concurrent writer (another process) stored this version or data key first: the caller re-reads."""


class _Restart(Exception):
    """The job must start a fresh transaction (an earlier job of this one holds a lock it could wait on)."""


class _PendingAudit:
    """An audit entry waiting for the end of its batch; called, it gives the seq the entry got."""

    __slots__ = ("seal", "seq", "tags", "tenant", "ts_ms")

    def __init__(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes], tags: bytes) -> None:
        self.tenant, self.ts_ms, self.seal, self.tags = tenant, ts_ms, seal, tags
        self.seq: int | None = None

    def __call__(self) -> int:
        if self.seq is None:
            raise RuntimeError("an audit entry's seq is known once its transaction has committed")
        return self.seq


class _Tx:
    """WriteTx over the writer connection."""

    __slots__ = ("_c", "audit", "committed", "head_locked", "in_savepoint", "invalidations", "job_locks",
                 "job_took_head", "locked", "pending")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._c = conn
        self.committed: list[Callable[[], None]] = []
        self.audit: list[_PendingAudit] = []  # this transaction's entries, written by flush_audit
        self.invalidations: list[tuple[str, str]] = []  # (kind, key) for the other processes' caches
        self.locked: set[str] = set()  # advisory locks this transaction holds (serialize)
        self.job_locks = False  # taken by the job running now
        self.head_locked = False  # the audit head's row lock, taken early (_lock_head) or by flush_audit
        self.job_took_head = False
        # BEGIN and the savepoints wait here and go with the next statement, in one round trip: a job
        # that only appends audit entries (an audited read) then costs none.
        self.pending: list[bytes] = [b"BEGIN"]
        self.in_savepoint = False  # the job's savepoint has been sent (a failure rolls back to it)

    @property
    def begun(self) -> bool:
        return b"BEGIN" not in self.pending

    def next_job(self) -> None:
        if self.in_savepoint:
            self.pending.append(b"RELEASE SAVEPOINT job")
            self.in_savepoint = False
        if b"SAVEPOINT job" not in self.pending:
            self.pending.append(b"SAVEPOINT job")

    def _x(self, sql: str, args: Any = None) -> psycopg.Cursor[Any]:
        if not self.pending:
            return self._c.execute(sql, args)  # type: ignore[arg-type]  # statements are module constants
        pending, self.pending = self.pending, []
        self.in_savepoint = self.in_savepoint or b"SAVEPOINT job" in pending
        with self._c.pipeline():
            for statement in pending:
                self._c.execute(statement)
            return self._c.execute(sql, args)  # type: ignore[arg-type]

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.committed.append(fn)

    def holds_advisory_lock(self, pid: int, backend_start: str, key: int) -> bool:
        """Whether session (pid, start) holds the session advisory lock ``key`` (Leadership.fence)."""
        row = self._x("SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                      " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid = %s"
                      " AND a.backend_start::text = %s AND l.classid::bigint = %s AND l.objid::bigint = %s"
                      " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                      (pid, backend_start, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
        return bool(row and row[0])

    def _lock_head(self) -> None:
        """Hold the audit head's row lock from now to COMMIT: what a job writes next is then in commit
        order across processes (revocations, which other processes poll by seq). Rare jobs only."""
        if not self.head_locked:
            self._x("SELECT size FROM audit.audit_head FOR UPDATE")
            self.head_locked = self.job_took_head = True

    def flush_audit(self) -> None:
        """Just before COMMIT: write the batch's audit entries, each sealed with its final seq.

        The head's row lock is taken here rather than at the first append, so what other processes'
        writers wait for is this UPDATE, one INSERT and the COMMIT, not the batch's jobs."""
        if not self.audit:
            return
        n = len(self.audit)
        row = self._x("UPDATE audit.audit_head SET size = size + %s RETURNING size - %s", (n, n)).fetchone()
        assert row is not None
        self.head_locked = True
        first = int(row[0]) + 1
        step = SEARCH_TAG_BYTES
        blobs: list[bytes] = []
        tag_tags: list[bytes] = []
        tag_seqs: list[int] = []
        for seq, e in enumerate(self.audit, first):
            e.seq = seq
            blobs.append(e.seal(seq))
            for tag in {e.tags[i : i + step] for i in range(0, len(e.tags), step)}:
                tag_tags.append(tag)
                tag_seqs.append(seq)
        self._x(
            "WITH e AS (INSERT INTO audit.audit_log (seq, tenant, ts_ms, tags, blob)"
            " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bytea[], %s::bytea[]))"
            " INSERT INTO audit.audit_index (tag, seq) SELECT * FROM unnest(%s::bytea[], %s::bigint[])",
            (list(range(first, first + n)), [e.tenant for e in self.audit], [e.ts_ms for e in self.audit],
             [e.tags for e in self.audit], blobs, tag_tags, tag_seqs))

    def invalidate(self, kind: str, key: str) -> None:
        self.invalidations.append((kind, key))

    def flush_invalidations(self) -> None:
        """Just before COMMIT: publish the batch's invalidations under one new seq (see COHERENCE_SCHEMA).

        The head's row lock is the last lock a transaction takes, so it never waits while holding it."""
        if not self.invalidations:
            return
        row = self._x("UPDATE coherence_head SET seq = seq + 1 RETURNING seq").fetchone()
        assert row is not None
        seq = int(row[0])
        kinds, keys = zip(*sorted(set(self.invalidations)), strict=True)
        self._x("INSERT INTO coherence_log (seq, kind, key) SELECT %s, * FROM unnest(%s::text[], %s::text[])",
                (seq, list(kinds), list(keys)))
        if seq % _COHERENCE_PRUNE_EVERY == 0:
            self._x("DELETE FROM coherence_log WHERE seq <= %s", (seq - _COHERENCE_KEEP,))

    def serialize(self, key: str) -> bool:
        """Wait for, then hold until COMMIT, a database lock on ``key`` shared by every process.

        One job's locks per transaction: a transaction holding an earlier job's lock could wait here
        for one that another transaction holds while that one waits for ours. Such a job starts the
        next transaction instead, as does one that follows a revocation (which took the audit head's
        lock early: its holder must never wait for an advisory lock). Otherwise the head is locked
        only after every job ran (flush_audit), so advisory locks always come first."""
        if self.job_took_head:
            raise RuntimeError("serialize() must come before the job's revocations")
        if self.head_locked or (self.locked and not self.job_locks):
            raise _Restart
        self._x("SELECT pg_advisory_xact_lock(%s)", (lock_key("fhirvault:" + key),))
        self.locked.add(key)
        self.job_locks = True
        return True

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._x(_SELECT_CURRENT, (tenant, type, id)).fetchone()
        return _version(row) if row else None

    def insert_version(self, tenant: str, v: StoredVersion) -> int:
        # One round trip: the version, and the current pointer moved to it.
        row = self._x(
            "WITH v AS (INSERT INTO resource_versions (tenant, type, id, version, last_updated, deleted, key_id, blob)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING seq, tenant, type, id, deleted),"
            " c AS (INSERT INTO resources_current (tenant, type, id, seq, deleted)"
            " SELECT tenant, type, id, seq, deleted FROM v"
            " ON CONFLICT (tenant, type, id) DO UPDATE SET seq=excluded.seq, deleted=excluded.deleted)"
            " SELECT seq FROM v",
            (tenant, v.type, v.id, v.version, v.last_updated_ms, v.deleted, v.key_id, v.blob),
        ).fetchone()
        if row is None:
            raise _VersionTaken(f"version {v.type}/{v.id}/{v.version} already exists")
        return int(row[0])

    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None:
        """Replace a resource's tags in the index, in this transaction (searchable at COMMIT)."""
        new = sorted(set(tags))
        joined, step = b"".join(new), SEARCH_TAG_BYTES
        row = self._x(_SET_SEARCH_TAGS, (tenant, type, id, step, step, joined, joined, new, new)).fetchone()
        if row is None or row[0] is None:
            raise LookupError("set_search_tags on a resource that has no version")

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        row = self._x("SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=%s AND lookup=%s",
                      (tenant, lookup)).fetchone()
        return _wrapped(row) if row else None

    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None:
        cur = self._x(
            "INSERT INTO data_keys (key_id, tenant, lookup, wrapped, kek_version, compartment, created_ms)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (key.key_id, tenant, lookup, key.wrapped, key.kek_version, key.compartment, created_ms),
        )
        if cur.rowcount != 1:
            raise _VersionTaken("data key id or (tenant, lookup) already exists")

    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None:
        self._x("UPDATE data_keys SET wrapped=%s, compartment=%s, kek_version=%s WHERE key_id=%s",
                (wrapped, compartment, kek_version, key_id))

    def all_data_keys(self, tenant: str) -> list[WrappedKey]:
        rows = self._x("SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=%s",
                       (tenant,)).fetchall()
        return [_wrapped(r) for r in rows]

    def erase_key(self, tenant: str, key_id: str,
                  known: tuple[int, list[tuple[int, str, str]]] | None = None) -> tuple[int, int]:
        # ``known`` is not used: with several writers seqs do not commit in order, so everything is searched
        # again here (PostgreSQL's other writers do not wait for this transaction).
        row = self._x(
            "WITH c AS (DELETE FROM resources_current WHERE seq IN (SELECT seq FROM resource_versions"
            " WHERE tenant=%s AND key_id=%s) RETURNING rk, tags),"
            " t AS (DELETE FROM search_tags s USING c, LATERAL (SELECT substring(c.tags FROM i FOR 8) AS tag"
            " FROM generate_series(1, length(c.tags), 8) i) x WHERE s.tag = x.tag AND s.rk = c.rk),"
            " v AS (DELETE FROM resource_versions WHERE tenant=%s AND key_id=%s RETURNING 1),"
            " k AS (DELETE FROM data_keys WHERE tenant=%s AND key_id=%s)"
            " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM v)",
            (tenant, key_id, tenant, key_id, tenant, key_id)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def destroy_tenant_keys(self, tenant: str) -> tuple[int, int]:
        keks = self._x("DELETE FROM tenant_keys WHERE tenant=%s", (tenant,)).rowcount
        dks = self._x("DELETE FROM data_keys WHERE tenant=%s", (tenant,)).rowcount
        return keks, dks

    def delete_meta(self, name: str) -> None:
        self._x("DELETE FROM meta WHERE name=%s", (name,))

    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None:
        cur = self._x("INSERT INTO tenant_keys (tenant, version, wrapped, root_key_id, created_ms)"
                      " VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                      (row.tenant, row.version, row.wrapped, row.root_key_id, created_ms))
        if cur.rowcount != 1:
            raise _duplicate(f"tenant key {row.tenant} v{row.version}")

    def replace_tenant_key(self, row: TenantKeyRow) -> None:
        self._x("UPDATE tenant_keys SET wrapped=%s, root_key_id=%s WHERE tenant=%s AND version=%s",
                (row.wrapped, row.root_key_id, row.tenant, row.version))

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        rows = self._x(_TENANT_KEYS, (tenant,)).fetchall()
        return [_tenant_key(r) for r in rows]

    def get_meta(self, name: str) -> bytes | None:
        row = self._x("SELECT value FROM meta WHERE name=%s", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def meta_names(self) -> list[str]:
        return [r[0] for r in self._x("SELECT name FROM meta ORDER BY name").fetchall()]

    def set_meta(self, name: str, value: bytes) -> None:
        self._x("INSERT INTO meta (name, value) VALUES (%s,%s) ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                (name, value))

    def insert_client(self, row: ClientRow) -> None:
        cur = self._x(
            f"INSERT INTO clients ({_CLIENT_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",  # noqa: S608
            (row.client_id, row.tenant, row.name, row.secret_hash, row.scopes, row.jwks, row.created_ms,
             row.disabled, row.allowed_sources))
        if cur.rowcount != 1:
            raise _duplicate(f"client {row.client_id}")

    def client_for_update(self, client_id: str) -> ClientRow | None:
        row = self._x(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id=%s FOR UPDATE",  # noqa: S608
                      (client_id,)).fetchone()
        return _client(row) if row else None

    def update_client(self, row: ClientRow) -> None:
        self._x("UPDATE clients SET name=%s, secret_hash=%s, scopes=%s, jwks=%s, disabled=%s, allowed_sources=%s"
                " WHERE client_id=%s",
                (row.name, row.secret_hash, row.scopes, row.jwks, row.disabled, row.allowed_sources, row.client_id))

    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool:
        self._x("DELETE FROM seen_jti WHERE expires_ms < %s", (now_ms,))
        cur = self._x("INSERT INTO seen_jti (jti, expires_ms) VALUES (%s,%s) ON CONFLICT DO NOTHING", (jti, expires_ms))
        return cur.rowcount == 1

    def append_audit(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes],
                     tags: bytes = b"") -> Callable[[], int]:
        entry = _PendingAudit(tenant, ts_ms, seal, tags)
        self.audit.append(entry)
        return entry

    def add_audit_nodes(self, nodes: list[tuple[int, int, bytes]]) -> None:
        if nodes:
            self._x("INSERT INTO audit.audit_nodes (level, idx, hash)"
                    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bytea[]) ON CONFLICT DO NOTHING",
                    ([n[0] for n in nodes], [n[1] for n in nodes], [n[2] for n in nodes]))

    def add_audit_checkpoint(self, cp: AuditCheckpoint) -> None:
        cur = self._x(
            "INSERT INTO audit.audit_checkpoints (size, ts_ms, root, key_id, signature, witnessed, proof_from, proof)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (cp.size, cp.ts_ms, cp.root, cp.key_id, cp.signature, cp.witnessed, cp.proof_from, cp.proof))
        if cur.rowcount != 1:
            raise _duplicate(f"audit checkpoint {cp.size}")

    # -- break-the-glass --
    def put_break_glass(self, row: BreakGlassRow) -> None:
        self._x(f"INSERT INTO break_glass ({_BG_COLUMNS}) VALUES ({_marks(9)})"  # noqa: S608
                " ON CONFLICT (grant_id) DO UPDATE SET tenant=excluded.tenant, user_id=excluded.user_id,"
                " patient_id=excluded.patient_id, created_ms=excluded.created_ms, expires_ms=excluded.expires_ms,"
                " status=excluded.status, key_id=excluded.key_id, blob=excluded.blob",
                (row.grant_id, row.tenant, row.user_id, row.patient_id, row.created_ms, row.expires_ms,
                 row.status, row.key_id, row.blob))

    # -- compliance registers --
    def put_register_entry(self, row: RegisterRow) -> None:
        self._x(f"INSERT INTO register_entries ({_REG_COLUMNS}) VALUES ({_marks(9)})"  # noqa: S608
                " ON CONFLICT (tenant, kind, entry_id) DO UPDATE SET created_ms=excluded.created_ms,"
                " updated_ms=excluded.updated_ms, status=excluded.status, due_ms=excluded.due_ms,"
                " key_id=excluded.key_id, blob=excluded.blob",
                (row.tenant, row.kind, row.entry_id, row.created_ms, row.updated_ms, row.status, row.due_ms,
                 row.key_id, row.blob))

    def register_entry_for_update(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        row = self._x(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE tenant=%s AND kind=%s"  # noqa: S608
                      " AND entry_id=%s FOR UPDATE", (tenant, kind, entry_id)).fetchone()
        return _register(row) if row else None

    # -- identity --
    def insert_user(self, row: UserRow) -> None:
        cur = self._x(f"INSERT INTO users ({_USER_COLUMNS}) VALUES ({_marks(14)}) ON CONFLICT DO NOTHING",  # noqa: S608
                      _user_values(row))
        if cur.rowcount != 1:
            raise _duplicate("user")

    def update_user(self, row: UserRow) -> None:
        # REPLACE semantics: the row with this id, or with this (tenant, username), becomes this one.
        self._x("DELETE FROM users WHERE user_id=%s OR (tenant=%s AND username=%s)",
                (row.user_id, row.tenant, row.username))
        self._x(f"INSERT INTO users ({_USER_COLUMNS}) VALUES ({_marks(14)})", _user_values(row))  # noqa: S608

    def user_for_update(self, user_id: str) -> UserRow | None:
        row = self._x(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id=%s FOR UPDATE", (user_id,)).fetchone()  # noqa: S608
        return _user(row) if row else None

    def link_identity(self, provider: str, issuer: str, subject: str, user_id: str) -> None:
        self._x("INSERT INTO federated_links (provider, issuer, subject, user_id) VALUES (%s,%s,%s,%s)"
                " ON CONFLICT (provider, issuer, subject) DO UPDATE SET user_id=excluded.user_id",
                (provider, issuer, subject, user_id))

    def upsert_app(self, row: AppRow) -> None:
        self._x("INSERT INTO oauth_apps (client_id, redirect_uris, public) VALUES (%s,%s,%s)"
                " ON CONFLICT (client_id) DO UPDATE SET redirect_uris=excluded.redirect_uris, public=excluded.public",
                (row.client_id, orjson.dumps(list(row.redirect_uris)).decode(), row.public))

    def insert_login_session(self, row: LoginSessionRow) -> None:
        cur = self._x("INSERT INTO login_sessions (session_id, user_id, created_ms, last_seen_ms, amr, ended_ms)"
                      " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                      (row.session_id, row.user_id, row.created_ms, row.last_seen_ms, row.amr, row.ended_ms))
        if cur.rowcount != 1:
            raise _duplicate("session")

    def touch_login_session(self, session_id: str, now_ms: int) -> None:
        self._x("UPDATE login_sessions SET last_seen_ms=greatest(last_seen_ms, %s) WHERE session_id=%s",
                (now_ms, session_id))

    def end_login_session(self, session_id: str, now_ms: int) -> None:
        self._x("UPDATE login_sessions SET ended_ms=%s WHERE session_id=%s AND ended_ms=0", (now_ms, session_id))

    def insert_code(self, row: AuthCodeRow) -> None:
        cur = self._x(f"INSERT INTO auth_codes ({_CODE_COLUMNS}) VALUES ({_marks(13)}) ON CONFLICT DO NOTHING",  # noqa: S608
                      (row.code_hash, row.family_id, row.client_id, row.user_id, row.session_id, row.redirect_uri,
                       row.scope, row.code_challenge, row.nonce, row.patient, row.auth_time_ms, row.expires_ms,
                       row.used))
        if cur.rowcount != 1:
            raise _duplicate("code")

    def consume_code(self, code_hash: bytes, now_ms: int) -> AuthCodeRow | None:
        # Used codes are kept an hour past expiry so a late replay still revokes its tokens.
        self._x("DELETE FROM auth_codes WHERE expires_ms < %s", (now_ms - 3_600_000,))
        row = self._x(f"SELECT {_CODE_COLUMNS} FROM auth_codes WHERE code_hash=%s FOR UPDATE",  # noqa: S608
                      (code_hash,)).fetchone()
        if row is None:
            return None
        self._x("UPDATE auth_codes SET used=true WHERE code_hash=%s", (code_hash,))
        return _code(row)

    def insert_refresh(self, row: RefreshTokenRow) -> None:
        cur = self._x(f"INSERT INTO refresh_tokens ({_REFRESH_COLUMNS}) VALUES ({_marks(12)})"  # noqa: S608
                      " ON CONFLICT DO NOTHING",
                      (row.token_hash, row.family_id, row.client_id, row.user_id, row.session_id, row.scope,
                       row.patient, row.auth_time_ms, row.expires_ms, row.created_ms, row.used, row.revoked))
        if cur.rowcount != 1:
            raise _duplicate("refresh token")

    def _refresh_for_update(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._x(f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE token_hash=%s FOR UPDATE",  # noqa: S608
                      (token_hash,)).fetchone()
        return _refresh(row) if row else None

    def consume_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        found = self._refresh_for_update(token_hash)
        if found is not None:
            self._x("UPDATE refresh_tokens SET used=true WHERE token_hash=%s", (token_hash,))
        return found

    def record_issued(self, jti: str, family_id: str, session_id: str, expires_ms: int) -> None:
        self._x("INSERT INTO issued_tokens (jti, family_id, session_id, expires_ms) VALUES (%s,%s,%s,%s)",
                (jti, family_id, session_id, expires_ms))

    def revoke_tokens(self, now_ms: int, *, family_id: str | None = None, session_id: str | None = None) -> int:
        column, value = ("family_id", family_id) if family_id is not None else ("session_id", session_id)
        if value is None:
            return 0
        self._lock_head()  # revoked_jtis.seq in commit order (other processes poll by seq)
        self._x("DELETE FROM issued_tokens WHERE expires_ms < %s", (now_ms,))
        self._x(_PURGE_REVOKED, (now_ms,))
        n = self._x(f"UPDATE refresh_tokens SET revoked=true WHERE {column}=%s AND NOT revoked",  # noqa: S608
                    (value,)).rowcount
        added = self._x(f"INSERT INTO revoked_jtis (jti, expires_ms) SELECT jti, expires_ms FROM issued_tokens"  # noqa: S608
                        f" WHERE {column}=%s ORDER BY jti ON CONFLICT DO NOTHING", (value,)).rowcount
        if added:
            self.invalidate(REVOCATIONS, "")
        return int(n + added)

    def revoke_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        found = self._refresh_for_update(token_hash)
        if found is not None:
            self._x("UPDATE refresh_tokens SET revoked=true WHERE token_hash=%s", (token_hash,))
        return found

    def revoke_jti(self, jti: str, expires_ms: int, now_ms: int) -> None:
        self._lock_head()
        self._x(_PURGE_REVOKED, (now_ms,))
        self._x("INSERT INTO revoked_jtis (jti, expires_ms) VALUES (%s,%s) ON CONFLICT DO NOTHING", (jti, expires_ms))
        self.invalidate(REVOCATIONS, "")

    def end_user_sessions(self, user_id: str, now_ms: int) -> int:
        ids = [r[0] for r in self._x("SELECT session_id FROM login_sessions WHERE user_id=%s AND ended_ms=0",
                                     (user_id,)).fetchall()]
        for sid in ids:
            self.end_login_session(sid, now_ms)
            self.revoke_tokens(now_ms, session_id=sid)
        return len(ids)

    # -- subscriptions --
    def add_change(self, tenant: str, type: str, rid: str, version: int, now_ms: int) -> None:
        self._x("INSERT INTO subscription_changes (tenant, type, rid, version, created_ms) VALUES (%s,%s,%s,%s,%s)",
                (tenant, type, rid, version, now_ms))

    def remove_changes(self, ids: list[int]) -> None:
        self._x("DELETE FROM subscription_changes WHERE id = ANY(%s)", (ids,))

    def put_delivery(self, row: DeliveryRow) -> None:
        values = (row.tenant, row.subscription_id, row.kind, row.type, row.rid, row.version, row.attempts, row.due_ms,
                  row.created_ms)
        if row.id == 0:
            self._x(_INSERT_DELIVERY, values)
        else:
            self._x(_REPLACE_DELIVERY, (row.id, *values))

    def remove_delivery(self, delivery_id: int) -> None:
        self._x("DELETE FROM subscription_deliveries WHERE id=%s", (delivery_id,))


_DELIVERY_COLUMNS = "tenant, subscription_id, kind, type, rid, version, attempts, due_ms, created_ms"
_INSERT_DELIVERY = f"INSERT INTO subscription_deliveries ({_DELIVERY_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"  # noqa: S608
_REPLACE_DELIVERY = (
    f"INSERT INTO subscription_deliveries (id, {_DELIVERY_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"  # noqa: S608
    " ON CONFLICT (id) DO UPDATE SET attempts=excluded.attempts, due_ms=excluded.due_ms"
)
_TENANT_KEYS = "SELECT tenant, version, wrapped, root_key_id, created_ms FROM tenant_keys WHERE tenant=%s ORDER BY version"

_Job = tuple[str, Callable[[Any], Any], Any, asyncio.AbstractEventLoop | None]
_STOP = object()
_AGAIN = object()  # _attempt_batch: the session died before COMMIT, run the batch again


def _configure_reader(conn: psycopg.Connection[Any]) -> None:
    failover.reject_standby(conn)
    conn.execute("SET default_transaction_read_only = on")


class PostgresStore:
    """ResourceStore on a PostgreSQL database (``postgresql://user@host/db``)."""

    def __init__(self, url: str, *, read_pool_size: int = 8, writers: int = WRITERS) -> None:
        self._url = failover.conninfo(url)  # time-outs and keepalives added (a password stays inside)
        migrate(self._url)
        self._pool = ConnectionPool(self._url, min_size=1, max_size=read_pool_size, open=True,
                                    name="fhirvault-read", timeout=failover.READ_WAIT,
                                    # The pool's back-off grows to minutes; give up within seconds instead,
                                    # so the next read asks for a new session at once (on demand).
                                    reconnect_timeout=failover.RECONNECT_WAIT,
                                    kwargs={"autocommit": True, "application_name": "fhirvault-read"},
                                    configure=_configure_reader)
        self._writer_conns: list[psycopg.Connection[Any]] = []
        self._servers: list[tuple[Any, ...]] = []  # each writer session's server identity (commit_outcome)
        try:
            for _ in range(max(1, writers)):
                conn, server = failover.connect_writer(self._url)
                self._writer_conns.append(conn)
                self._servers.append(server)
        except BaseException:
            for conn in self._writer_conns:
                conn.close()
            self._pool.close()
            raise
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lifecycle = threading.Lock()
        self.writers = len(self._writer_conns)
        self._threads = [threading.Thread(target=self._run_writer, args=(slot,), name=f"fhirvault-pg-writer-{slot}",
                                          daemon=True) for slot in range(len(self._writer_conns))]
        for thread in self._threads:
            thread.start()
        self._head_conn: psycopg.Connection[Any] | None = None  # coherence head reads (changes_since)
        self._head_lock = threading.Lock()
        self.commits = 0  # transactions committed (for tests and metrics)
        self.batched_jobs = 0

    def leadership(self) -> PostgresLeadership:
        return PostgresLeadership(self._url)

    # -- writes -------------------------------------------------------------
    def _run_writer(self, slot: int) -> None:
        pending: list[_Job] = []
        stop = False
        while pending or not stop:
            if not pending:
                first = self._queue.get()
                if first is _STOP:
                    break
                pending = [first]
            while len(pending) < _MAX_BATCH and not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    pending.append(item)
            pending = self._commit_batch(pending, slot)
        with contextlib.suppress(psycopg.Error):
            self._writer_conns[slot].close()

    def _commit_batch(self, batch: list[_Job], slot: int = 0) -> list[_Job]:
        """Run and commit a prefix of ``batch`` on writer ``slot``; return the jobs left for the next transaction.

        A session found dead before COMMIT was sent (an idle writer after a restart or failover: each
        of the writers finds out with its next batch) committed nothing, so the batch runs once more on
        a new session, as a job restarted by _Restart does; a second loss answers 503."""
        left = self._attempt_batch(batch, slot, last=False)
        if left is _AGAIN:
            left = self._attempt_batch(batch, slot, last=True)
        assert isinstance(left, list)
        return left

    def _attempt_batch(self, batch: list[_Job], slot: int, *, last: bool) -> Any:
        try:
            conn = self._writer_connection(slot)
        except StoreUnavailable as exc:
            self._finish(batch, [(False, exc)] * len(batch), [[] for _ in batch])
            return []
        xid: int | None = None
        tx = _Tx(conn)
        outcomes: list[tuple[bool, Any]] = []
        callbacks: list[list[Callable[[], None]]] = []
        done = len(batch)
        try:
            # BEGIN and each job's SAVEPOINT go with its first statement (_Tx.pending); COMMIT releases
            # the last savepoint.
            for n, (_name, fn, _fut, _loop) in enumerate(batch):
                if tx.head_locked:  # by a revocation: no job may wait for a row lock while holding it
                    done = n
                    break
                tx.next_job()
                tx.committed = []
                tx.job_locks = tx.job_took_head = False
                appended = len(tx.audit)
                published = len(tx.invalidations)
                try:
                    value = fn(tx)
                except _Restart:
                    if tx.in_savepoint:
                        conn.execute(b"ROLLBACK TO SAVEPOINT job")
                    del tx.audit[appended:]
                    del tx.invalidations[published:]
                    done = n
                    break
                except BaseException as exc:  # the job's own failure: undo only its work
                    if isinstance(exc, psycopg.Error) and failover.connection_lost(exc, conn):
                        raise  # the whole batch fails (or the database is read-only now)
                    if tx.in_savepoint:  # (otherwise the job sent nothing)
                        conn.execute(b"ROLLBACK TO SAVEPOINT job")
                    # Locks taken by this job went with its savepoint (only one job per transaction
                    # takes advisory locks, so they were all its own).
                    if tx.job_locks:
                        tx.locked = set()
                    if tx.job_took_head:
                        tx.head_locked = False
                    del tx.audit[appended:]
                    del tx.invalidations[published:]
                    if isinstance(exc, StopIteration):  # futures refuse it (PEP 479 does the same)
                        wrapped = RuntimeError("write job raised StopIteration")
                        wrapped.__cause__ = exc
                        exc = wrapped
                    outcomes.append((False, exc))
                    callbacks.append([])
                else:
                    outcomes.append((True, value))
                    callbacks.append(tx.committed)
            tx.flush_audit()
            tx.flush_invalidations()
            if tx.begun:
                xid = failover.transaction_id(conn)
                conn.execute(b"COMMIT")
        except Exception as exc:  # the batch or its COMMIT failed: find out whether anything is durable
            if not last and xid is None and failover.connection_lost(exc, conn):
                log.warning("database session lost before COMMIT: batch run again", extra={"jobs": len(batch)})
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                return _AGAIN
            failure = self._batch_failed(exc, conn, xid, slot, begun=tx.begun)
            if failure is not None:
                self._finish(batch, [(False, failure)] * len(batch), [[] for _ in batch])
                return []
        self.commits += 1
        self.batched_jobs += done
        self._finish(batch[:done], outcomes, callbacks)
        return batch[done:]

    # -- connection loss (see postgres_failover) --
    def _writer_connection(self, slot: int) -> psycopg.Connection[Any]:
        """Writer ``slot``'s session, reconnected (with back-off, bounded) when it broke."""
        conn = self._writer_conns[slot]
        if not (conn.broken or conn.closed):
            return conn
        self._writer_conns[slot], self._servers[slot] = failover.reconnect_writer(self._url, lambda: self._closed)
        return self._writer_conns[slot]

    def _batch_failed(self, exc: Exception, conn: psycopg.Connection[Any], xid: int | None, slot: int, *,
                      begun: bool = True) -> Exception | None:
        """What the batch's callers hear when it failed with ``exc``; None if it committed after all.

        ``xid`` is set once COMMIT was about to be sent: if the session broke then, the new
        session asks the server what became of the transaction (never a success it cannot prove)."""
        if not failover.connection_lost(exc, conn):  # a statement failed: the session is fine
            log.error("write batch failed", extra={"error": type(exc).__name__})
            if begun:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            return exc
        log.error("database connection lost", extra={"error": type(exc).__name__})
        with contextlib.suppress(psycopg.Error):
            conn.close()  # a read-only (standby) session too: the next batch reconnects to the primary
        if xid is None:
            return StoreUnavailable(failover.UNAVAILABLE)
        server = self._servers[slot]
        try:
            fresh = self._writer_connection(slot)
            committed = failover.commit_outcome(fresh, xid, self._servers[slot] == server)
        except (StoreUnavailable, psycopg.Error):
            committed = None
        log.warning("write batch outcome after connection loss",
                    extra={"outcome": {True: "committed", False: "not committed", None: "unknown"}[committed]})
        if committed:
            return None
        if committed is None:
            return StoreUnavailable(failover.UNKNOWN, outcome_unknown=True)
        return StoreUnavailable(failover.UNAVAILABLE)

    @staticmethod
    def _finish(batch: list[_Job], outcomes: list[tuple[bool, Any]], callbacks: list[list[Callable[[], None]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, bool, Any, list[Callable[[], None]]]]] = {}
        for (_name, _fn, fut, loop), (ok, value), hooks in zip(batch, outcomes, callbacks, strict=True):
            if loop is None:
                _run_callbacks(hooks)
                _deliver(fut, ok, value)
            else:
                by_loop.setdefault(loop, []).append((fut, ok, value, hooks))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, items)

    def _enqueue(self, job: _Job) -> None:
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("store is closed")
            self._queue.put(job)

    async def write(self, name: str, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._enqueue((name, fn, fut, loop))
        return await fut

    def write_sync(self, name: str, fn: Callable[[Any], T]) -> T:
        fut: Future[T] = Future()
        self._enqueue((name, fn, fut, None))
        return fut.result()

    # -- reads --------------------------------------------------------------
    # PostgreSQL text cannot hold NUL, so no stored value has one: a lookup by such a string
    # (a login name from a form, say) finds nothing, as in SQLite, instead of failing.
    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None:
        if _has_nul(args):
            return None
        return self._read(lambda c: c.execute(sql, args).fetchone())  # type: ignore[arg-type]  # module constants

    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
        if _has_nul(args):
            return []
        return self._read(lambda c: c.execute(sql, args).fetchall())  # type: ignore[arg-type]

    def _read(self, run: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``run`` on a pooled session; after a restart or failover the pool's sessions are dead:
        drop them and try once more on a new one, then StoreUnavailable (503)."""
        for attempt in (1, 2):
            try:
                with self._pool.connection() as c:
                    return run(c)
            except psycopg.OperationalError as exc:  # PoolTimeout too: no session within READ_WAIT
                if attempt == 2 or isinstance(exc, PoolTimeout):
                    log.error("database unavailable for reads", extra={"error": type(exc).__name__})
                    raise StoreUnavailable(failover.UNAVAILABLE) from exc
                self._pool.check()  # the pool discards the broken session; find its dead siblings too
        raise AssertionError("unreachable")

    def _int(self, sql: str, args: Any = ()) -> int:
        row = self._one(sql, args)
        return 0 if row is None else int(row[0])

    def read_current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._one(_SELECT_CURRENT, (tenant, type, id))
        return _version(row) if row else None

    def read_version(self, tenant: str, type: str, id: str, version: int) -> StoredVersion | None:
        row = self._one(f"{_SELECT_VERSIONS} WHERE tenant=%s AND type=%s AND id=%s AND version=%s",
                        (tenant, type, id, version))
        return _version(row) if row else None

    @staticmethod
    def _history_where(q: HistoryQuery) -> tuple[str, list[Any]]:
        clauses = ["tenant=%s"]
        args: list[Any] = [q.tenant]
        for clause, value in (("type=%s", q.type), ("id=%s", q.id),
                              ("type = ANY(%s)", None if q.types is None else sorted(q.types)),
                              ("last_updated >= %s", q.since_ms), ("seq < %s", q.before_seq)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        return " AND ".join(clauses), args

    def history(self, query: HistoryQuery) -> list[StoredVersion]:
        where, args = self._history_where(query)
        rows = self._all(f"{_SELECT_VERSIONS} WHERE {where} ORDER BY seq DESC LIMIT %s", [*args, query.limit])
        return [_version(r) for r in rows]

    def history_count(self, query: HistoryQuery) -> int:
        where, args = self._history_where(query)
        return self._int(f"SELECT count(*) FROM resource_versions WHERE {where}", args)  # noqa: S608

    def search(self, q: SearchQuery) -> list[tuple[int, StoredVersion]]:
        """Current, non-deleted versions of ``q.types`` whose tags satisfy every group, in rk order."""
        clauses = ["c.tenant=%s", "c.type = ANY(%s)", "NOT c.deleted"]
        args: list[Any] = [q.tenant, list(q.types)]
        for clause, value in (("c.rk > %s", q.after_rk), ("c.rk < %s", q.before_rk),
                              ("c.id = ANY(%s)", None if q.ids is None else list(q.ids))):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        # AND of ORs, one group per criterion: the most selective group drives (a bounded count of
        # its index entries), the others are checked per candidate: a small group by seeks on (tag, rk),
        # one per tag; a large one (a date or number range: dozens of block tags) in the candidate's own
        # tag list, c.tags, which is one 8-byte slice after another (with 52 tags the seeks cost 70 index
        # pages per candidate, and a population query has thousands of candidates).
        for n, group in enumerate(self._by_selectivity(q.tag_groups)):
            if n == 0:
                clauses.append("c.rk IN (SELECT rk FROM search_tags WHERE tag = ANY(%s))")
            elif len(group) <= _SEEK_TAGS:
                clauses.append("EXISTS (SELECT 1 FROM search_tags s WHERE s.tag = ANY(%s) AND s.rk = c.rk)")
            else:
                clauses.append(_IN_TAG_LIST)
            args.append(list(group))
        order = "DESC" if q.descending else "ASC"
        sql = ("SELECT c.rk, v.type, v.id, v.version, v.last_updated, v.deleted, v.key_id, v.blob, v.seq"  # noqa: S608
               f" FROM resources_current c JOIN resource_versions v ON v.seq = c.seq WHERE {' AND '.join(clauses)}"
               f" ORDER BY c.rk {order} LIMIT %s")
        return [(r[0], _version(r[1:])) for r in self._all(sql, [*args, q.limit])]

    def _by_selectivity(self, groups: tuple[tuple[bytes, ...], ...]) -> list[tuple[bytes, ...]]:
        if len(groups) < 2:
            return list(groups)
        sql = f"SELECT count(*) FROM (SELECT 1 FROM search_tags WHERE tag = ANY(%s) LIMIT {_PROBE}) s"  # noqa: S608
        return sorted(groups, key=lambda g: self._int(sql, (list(g),)))

    def count_current(self, tenant: str, type: str) -> int:
        return self._int("SELECT count(*) FROM resources_current WHERE tenant=%s AND type=%s AND NOT deleted",
                         (tenant, type))

    def max_rk(self) -> int:
        return self._int("SELECT coalesce(max(rk), 0) FROM resources_current")

    def max_seq(self) -> int:
        return self._int("SELECT coalesce(max(seq), 0) FROM resource_versions")

    def data_key(self, tenant: str, key_id: str) -> WrappedKey | None:
        row = self._one("SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=%s AND key_id=%s",
                        (tenant, key_id))
        return _wrapped(row) if row else None

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        row = self._one("SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=%s AND lookup=%s",
                        (tenant, lookup))
        return _wrapped(row) if row else None

    def key_versions(self, tenant: str, key_id: str) -> list[tuple[int, str, str]]:
        rows = self._all("SELECT seq, type, id FROM resource_versions WHERE tenant=%s AND key_id=%s", (tenant, key_id))
        return [(int(r[0]), r[1], r[2]) for r in rows]

    def key_usage(self, tenant: str, key_id: str) -> list[tuple[str, str, int, int]]:
        rows = self._all("SELECT type, id, count(*), max(last_updated) FROM resource_versions"
                         " WHERE tenant=%s AND key_id=%s GROUP BY type, id", (tenant, key_id))
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    def key_activity(self, tenant: str) -> dict[str, tuple[int, int]]:
        rows = self._all("SELECT key_id, count(*), max(last_updated) FROM resource_versions"
                         " WHERE tenant=%s GROUP BY key_id", (tenant,))
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        return (self._int("SELECT count(*) FROM resources_current WHERE tenant=%s", (tenant,)),
                self._int("SELECT count(*) FROM resource_versions WHERE tenant=%s", (tenant,)))

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return [_tenant_key(r) for r in self._all(_TENANT_KEYS, (tenant,))]

    def get_meta(self, name: str) -> bytes | None:
        row = self._one("SELECT value FROM meta WHERE name=%s", (name,))
        return bytes(row[0]) if row else None

    def meta_with_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        # starts_with, not a range: a range depends on the database's collation. The table is small.
        rows = self._all("SELECT name, value FROM meta WHERE starts_with(name, %s)", (prefix,))
        return sorted((str(r[0]), bytes(r[1])) for r in rows)

    def client(self, client_id: str) -> ClientRow | None:
        row = self._one(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id=%s", (client_id,))  # noqa: S608
        return _client(row) if row else None

    def clients(self, tenant: str) -> list[ClientRow]:
        rows = self._all(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE tenant=%s"  # noqa: S608
                         " ORDER BY created_ms, client_id", (tenant,))
        return [_client(r) for r in rows]

    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]:
        rows = self._all("SELECT seq, ts_ms, blob FROM audit.audit_log WHERE tenant=%s AND seq > %s"
                         " ORDER BY seq LIMIT %s", (tenant, after_seq, limit))
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        rows = self._all(f"SELECT {_AUDIT_COLUMNS} FROM audit.audit_log WHERE seq > %s ORDER BY seq LIMIT %s",  # noqa: S608
                         (after_seq, limit))
        return [_audit_row(r) for r in rows]

    def audit_find(self, q: AuditQuery) -> list[AuditRow]:
        clauses = ["l.tenant = %s", "l.seq > %s"]
        args: list[Any] = [q.tenant, q.after_seq]
        for clause, value in (("l.seq < %s", q.before_seq), ("l.ts_ms >= %s", q.since_ms),
                              ("l.ts_ms <= %s", q.until_ms),
                              ("l.seq IN (SELECT seq FROM audit.audit_index WHERE tag = ANY(%s))",
                               list(q.tags) if q.tags else None)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        order = "DESC" if q.descending else "ASC"
        sql = (f"SELECT {_AUDIT_COLUMNS} FROM audit.audit_log l"  # noqa: S608
               f" WHERE {' AND '.join(clauses)} ORDER BY l.seq {order} LIMIT %s")
        return [_audit_row(r) for r in self._all(sql, [*args, q.limit])]

    def audit_size(self) -> int:
        return self._int("SELECT coalesce(max(seq), 0) FROM audit.audit_log")

    def audit_node(self, level: int, index: int) -> bytes | None:
        row = self._one("SELECT hash FROM audit.audit_nodes WHERE level=%s AND idx=%s", (level, index))
        return bytes(row[0]) if row else None

    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        rows = self._all(_SELECT_CHECKPOINTS + " WHERE size > %s ORDER BY size LIMIT %s", (after_size, limit))
        return [_checkpoint(r) for r in rows]

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None:
        row = self._one(_SELECT_CHECKPOINTS + " ORDER BY size DESC LIMIT 1")
        return _checkpoint(row) if row else None

    # -- break-the-glass --
    def break_glass(self, tenant: str, grant_id: str) -> BreakGlassRow | None:
        row = self._one(f"SELECT {_BG_COLUMNS} FROM break_glass WHERE tenant=%s AND grant_id=%s",  # noqa: S608
                        (tenant, grant_id))
        return _break_glass(row) if row else None

    def break_glass_rows(self, tenant: str, *, status: str | None = None, user_id: str | None = None,
                         expires_after_ms: int | None = None, limit: int = 500) -> list[BreakGlassRow]:
        where: list[str] = ["tenant=%s"]
        args: list[str | int] = [tenant]
        for clause, value in (("status=%s", status), ("user_id=%s", user_id), ("expires_ms>%s", expires_after_ms)):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = self._all(f"SELECT {_BG_COLUMNS} FROM break_glass WHERE {' AND '.join(where)}"  # noqa: S608
                         " ORDER BY created_ms DESC LIMIT %s", (*args, limit))
        return [_break_glass(r) for r in rows]

    # -- compliance registers --
    def register_entry(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        row = self._one(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE tenant=%s AND kind=%s"  # noqa: S608
                        " AND entry_id=%s", (tenant, kind, entry_id))
        return _register(row) if row else None

    def register_entries(self, tenant: str, kind: str, *, status: str | None = None,
                         limit: int = 1000) -> list[RegisterRow]:
        where, args = ("tenant=%s AND kind=%s AND status=%s", (tenant, kind, status)) if status is not None \
            else ("tenant=%s AND kind=%s", (tenant, kind))
        rows = self._all(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE {where}"  # noqa: S608
                         " ORDER BY created_ms DESC, entry_id LIMIT %s", (*args, limit))
        return [_register(r) for r in rows]

    # -- identity --
    def user(self, user_id: str) -> UserRow | None:
        row = self._one(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id=%s", (user_id,))  # noqa: S608
        return _user(row) if row else None

    def user_by_username(self, tenant: str, username: str) -> UserRow | None:
        row = self._one(f"SELECT {_USER_COLUMNS} FROM users WHERE tenant=%s AND username=%s",  # noqa: S608
                        (tenant, username))
        return _user(row) if row else None

    def users(self, tenant: str) -> list[UserRow]:
        rows = self._all(f"SELECT {_USER_COLUMNS} FROM users WHERE tenant=%s ORDER BY username", (tenant,))  # noqa: S608
        return [_user(r) for r in rows]

    def linked_user(self, provider: str, issuer: str, subject: str) -> str | None:
        row = self._one("SELECT user_id FROM federated_links WHERE provider=%s AND issuer=%s AND subject=%s",
                        (provider, issuer, subject))
        return str(row[0]) if row else None

    def app(self, client_id: str) -> AppRow | None:
        row = self._one("SELECT client_id, redirect_uris, public FROM oauth_apps WHERE client_id=%s", (client_id,))
        return AppRow(row[0], tuple(orjson.loads(row[1])), bool(row[2])) if row else None

    def login_session(self, session_id: str) -> LoginSessionRow | None:
        row = self._one("SELECT session_id, user_id, created_ms, last_seen_ms, amr, ended_ms FROM login_sessions"
                        " WHERE session_id=%s", (session_id,))
        return LoginSessionRow(*row) if row else None

    def refresh_token(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._one(f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE token_hash=%s", (token_hash,))  # noqa: S608
        return _refresh(row) if row else None

    # -- subscriptions --
    def subscription_changes(self, limit: int) -> list[ChangeRow]:
        rows = self._all("SELECT id, tenant, type, rid, version, created_ms FROM subscription_changes"
                         " ORDER BY id LIMIT %s", (limit,))
        return [ChangeRow(*r) for r in rows]

    def due_deliveries(self, now_ms: int, limit: int) -> list[DeliveryRow]:
        rows = self._all(f"SELECT id, {_DELIVERY_COLUMNS} FROM subscription_deliveries"  # noqa: S608
                         " WHERE due_ms <= %s ORDER BY due_ms, id LIMIT %s", (now_ms, limit))
        return [DeliveryRow(*r) for r in rows]

    def subscription_backlog(self) -> tuple[int, int]:
        row = self._one("SELECT (SELECT count(*) FROM subscription_changes),"
                        " (SELECT count(*) FROM subscription_deliveries)")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def changes_since(self, seq: int | None) -> tuple[int, list[tuple[str, str]] | None]:
        """The coherence head, and the (kind, key) rows published after ``seq`` up to it.

        Called at every authenticated request: when nothing changed it costs one primary-key read of
        a one-row table on a dedicated connection (no pool checkout). None instead of the rows when
        they cannot all be given (no ``seq`` yet, pruned, too many): the caller drops everything."""
        head = self._coherence_head()
        if head == seq or seq is None:
            return head, [] if head == seq else None
        rows = self._all("SELECT seq, kind, key FROM coherence_log WHERE seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
                         (seq, head, _COHERENCE_READ_MAX))
        if not rows or int(rows[0][0]) != seq + 1 or len(rows) >= _COHERENCE_READ_MAX:
            return head, None
        return head, [(str(r[1]), str(r[2])) for r in rows]

    def _coherence_head(self) -> int:
        with self._head_lock:
            for attempt in (1, 2):  # the session may have died with a restarted server: one new one
                try:
                    conn = self._head_conn
                    if conn is None or conn.closed or conn.broken:
                        conn = self._head_conn = psycopg.connect(self._url, autocommit=True,
                                                                 application_name="fhirvault-coherence")
                        failover.reject_standby(conn)
                    row = conn.execute("SELECT seq FROM coherence_head").fetchone()
                    break
                except psycopg.Error as exc:
                    if self._head_conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            self._head_conn.close()
                    self._head_conn = None
                    if not isinstance(exc, psycopg.OperationalError):
                        raise
                    if attempt == 2:
                        raise StoreUnavailable(failover.UNAVAILABLE) from exc
        assert row is not None
        return int(row[0])

    def revoked_jtis(self, after_seq: int, now_ms: int) -> list[tuple[int, str, int]]:
        rows = self._all("SELECT seq, jti, expires_ms FROM revoked_jtis WHERE seq > %s AND expires_ms >= %s"
                         " ORDER BY seq", (after_seq, now_ms))
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def close(self) -> None:
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=30)
        self._pool.close()
        with self._head_lock:
            if self._head_conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._head_conn.close()
                self._head_conn = None


# -- schema -------------------------------------------------------------------------
def migrate(url: str) -> list[Migration]:
    """Apply the pending numbered migrations (the owner role's job) and return them.

    A database already at this version is left alone, so the application role, which may
    not create anything, can start on it. Each step commits with its version update; a session
    advisory lock keeps several processes starting at once from racing on the DDL.
    """
    done: list[Migration] = []
    with psycopg.connect(url, autocommit=True, application_name="fhirvault-migrate") as c:
        c.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            version = _check_version(c)
            for migration, ddl in MIGRATIONS[version:]:
                if migration.version == 2:  # version 1 databases may predate some of its tables: all IF NOT EXISTS
                    ddl = MIGRATIONS[0][1] + ddl
                with c.transaction():
                    try:
                        c.execute(ddl.encode())
                    except pg_errors.InsufficientPrivilege as exc:  # the application role, no DDL rights
                        raise SchemaError(
                            f"database schema needs migration {migration.version} ({migration.description}) and "
                            "this role may not change the schema: run 'fhirvault migrate' with the owner role's "
                            "database_url first") from exc
                    c.execute("INSERT INTO meta (name, value) VALUES ('schema_version', %s)"
                              " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                              (str(migration.version).encode(),))
                log.info("applied schema migration %d: %s", migration.version, migration.description)
                done.append(migration)
            _grant_app_role(c)
        finally:
            c.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return done


def pending_migrations(url: str) -> list[Migration]:
    with psycopg.connect(url, autocommit=True, application_name="fhirvault-migrate") as c:
        return [m for m, _ in MIGRATIONS[_check_version(c):]]


def _check_version(c: psycopg.Connection[Any]) -> int:
    version = schema_version(c)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(version, SCHEMA_VERSION)
    return version


def schema_version(c: psycopg.Connection[Any]) -> int:
    """The recorded version; 0 for an empty database."""
    if not c.execute("SELECT to_regclass('public.meta') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return 0
    found = c.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    return int(bytes(found[0])) if found else 0


class PostgresMigrator:
    """SchemaMigrator for a PostgreSQL database, without starting a store (``fhirvault migrate``)."""

    latest = SCHEMA_VERSION

    def __init__(self, url: str) -> None:
        self._url = url

    def current(self) -> int:
        with psycopg.connect(self._url, autocommit=True, application_name="fhirvault-migrate") as c:
            return schema_version(c)

    def pending(self) -> list[Migration]:
        return pending_migrations(self._url)

    def apply(self) -> list[Migration]:
        return migrate(self._url)


def _grant_app_role(c: psycopg.Connection[Any]) -> None:
    """As the tables' owner: create the application role if allowed, and give it its privileges."""
    row = c.execute(
        "SELECT (SELECT tableowner FROM pg_tables WHERE schemaname='public' AND tablename='meta') = current_user,"
        " EXISTS (SELECT 1 FROM pg_roles WHERE rolname=%s),"
        " (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname=current_user)", (APP_ROLE,)).fetchone()
    assert row is not None
    owner, exists, may_create = row
    if not owner or not (exists or may_create):
        return
    with c.transaction():
        if not exists:
            c.execute(f"CREATE ROLE {APP_ROLE} NOLOGIN".encode())
        c.execute(APP_GRANTS.encode())


# -- cluster singletons ------------------------------------------------------------
class PostgresLeadership:
    """Leader election by session advisory lock on a dedicated connection.

    ``pg_try_advisory_lock`` is held as long as the session lives; if the connection
    drops (network, server restart, failover) the lock goes with it and another process can
    take the role, so every ``lead`` call re-checks the connection. A process that vanished
    without closing its socket loses the session to the server's TCP keepalives (~11 s).
    ``fence`` re-checks, inside a singleton's write transaction, that this very session still
    holds the lock: a former leader that has not noticed yet cannot commit.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._session: tuple[int, str] | None = None  # (backend pid, backend start) holding the locks
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, application_name="fhirvault-leader")
        try:
            failover.reject_standby(conn)  # a standby takes advisory locks too, but no one would see them
            conn.execute(failover.SERVER_KEEPALIVES.encode())
            row = conn.execute("SELECT pid, backend_start::text FROM pg_stat_activity"
                               " WHERE pid = pg_backend_pid()").fetchone()
        except BaseException:
            conn.close()
            raise
        assert row is not None
        self._session = (int(row[0]), str(row[1]))
        return conn

    def lead(self, role: str) -> bool:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    if self._held:
                        log.warning("leadership lost with its database session", extra={"roles": sorted(self._held)})
                    self._held.clear()
                    self._conn = self._connect()
                if role in self._held:
                    self._conn.execute("SELECT 1")  # still connected: still the leader
                    return True
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key("leader:" + role),)).fetchone()
                if row and row[0]:
                    self._held.add(role)
                    log.info("leadership taken", extra={"role": role})
                    return True
                return False
            except psycopg.Error as exc:
                log.warning("leader election: database unavailable", extra={"error": type(exc).__name__})
                self._held.clear()
                if self._conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        self._conn.close()
                self._conn = None
                return False

    def fence(self, tx: WriteTx, role: str) -> None:
        """Raise LostLeadership unless our leadership session holds ``role``'s lock right now.

        Run in the singleton's write transaction (another session: the writer's), so the check
        and the write commit together or not at all."""
        session = self._session
        if not isinstance(tx, _Tx) or session is None or role not in self._held:
            raise LostLeadership(role)
        key = lock_key("leader:" + role)
        row = tx.holds_advisory_lock(session[0], session[1], key)
        if not row:
            raise LostLeadership(role)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    # Released now, not when the server notices the closed socket.
                    self._conn.execute("SELECT pg_advisory_unlock_all()")
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None
            self._held.clear()
