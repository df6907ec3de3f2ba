"""ResourceStore on SQLite in WAL mode, with group commit.

One writer thread owns the process's write connection. Callers hand it closures;
it runs every closure waiting in the queue inside one ``BEGIN IMMEDIATE`` …
``COMMIT`` (each under its own SAVEPOINT, so one failure does not undo the
others), and only then wakes the callers. Several processes may share the file
(``serve --workers N``, the CLI): their writers take the write lock in turn
(``WriteGate``), and what one process must know of another's writes is in the
database (pending search tags, ``coherence_log``, the audit position). ``synchronous=FULL`` makes SQLite
fsync the WAL at every commit, so an acknowledged write survives a crash or a
power cut; batching is what lets many writers share one fsync.

Reads use one connection per thread and never block on the writer (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from fhirvault.adapters import sqlite_migrations
from fhirvault.adapters.files import create_private
from fhirvault.adapters.sqlite_locks import FileLeadership, WriteGate
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
    Migration,
    RefreshTokenRow,
    RegisterRow,
    SearchQuery,
    StoredVersion,
    TenantKeyRow,
    UserRow,
    WrappedKey,
)
from fhirvault.services.coherence import REVOCATIONS

T = TypeVar("T")
log = logging.getLogger("fhirvault.store")

_MAX_BATCH = 512
_PROBE = 2000  # index entries counted per criterion to pick the one that drives a search
_VERSION_COLUMNS = "type, id, version, last_updated, deleted, key_id, blob, seq"
# Statements are built from constants only; every value is a bound parameter.
_SELECT_VERSIONS = f"SELECT {_VERSION_COLUMNS} FROM resource_versions"  # noqa: S608
_SELECT_CURRENT = (
    f"{_SELECT_VERSIONS} WHERE seq = (SELECT seq FROM resources_current WHERE tenant=? AND type=? AND id=?)"  # noqa: S608
)


def _version(row: tuple[Any, ...]) -> StoredVersion:
    return StoredVersion(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])


# The audit file is the one place a hostile DBA is expected: read every column as the type it must
# have (a row rewritten as text must fail verification, not crash the reader).
_AUDIT_COLUMNS = "seq, CAST(tenant AS BLOB), CAST(ts_ms AS INTEGER), CAST(tags AS BLOB), CAST(blob AS BLOB)"


def _audit_row(r: tuple[Any, ...]) -> AuditRow:
    return AuditRow(r[0], bytes(r[1]).decode("utf-8", "replace"), r[2], bytes(r[3]), bytes(r[4]))


_SELECT_CHECKPOINTS = ("SELECT size, ts_ms, root, key_id, signature, witnessed, proof_from, proof"
                       " FROM audit_checkpoints")


def _checkpoint(r: tuple[Any, ...]) -> AuditCheckpoint:
    return AuditCheckpoint(r[0], r[1], bytes(r[2]), r[3], bytes(r[4]), bool(r[5]), r[6], bytes(r[7]))


# -- break-the-glass --
_BG_COLUMNS = "grant_id, tenant, user_id, patient_id, created_ms, expires_ms, status, key_id, blob"


def _break_glass(r: tuple[Any, ...]) -> BreakGlassRow:
    return BreakGlassRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]))


# -- compliance registers --
_REG_COLUMNS = "tenant, kind, entry_id, created_ms, updated_ms, status, due_ms, key_id, blob"


def _register(r: tuple[Any, ...]) -> RegisterRow:
    return RegisterRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]))


# -- identity --
_USER_COLUMNS = ("user_id, tenant, username, password_hash, role, fhir_user, organization, clearances, totp,"
                 " totp_last_step, disabled, failures, locked_until_ms, created_ms")
# The newest row stays, so its seq is never reused (other processes poll by seq).
_CLIENT_COLUMNS = "client_id, tenant, name, secret_hash, scopes, jwks, created_ms, disabled, allowed_sources"


def _client(row: Sequence[Any]) -> ClientRow:
    return ClientRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])


_PURGE_REVOKED = "DELETE FROM revoked_jtis WHERE expires_ms < ? AND seq < (SELECT max(seq) FROM revoked_jtis)"
_CODE_COLUMNS = ("code_hash, family_id, client_id, user_id, session_id, redirect_uri, scope, code_challenge,"
                 " nonce, patient, auth_time_ms, expires_ms, used")
_REFRESH_COLUMNS = ("token_hash, family_id, client_id, user_id, session_id, scope, patient, auth_time_ms,"
                    " expires_ms, created_ms, used, revoked")


def _user(r: tuple[Any, ...]) -> UserRow:
    return UserRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]) if r[8] is not None else None,
                   r[9], bool(r[10]), r[11], r[12], r[13])


def _user_values(u: UserRow) -> tuple[Any, ...]:
    return (u.user_id, u.tenant, u.username, u.password_hash, u.role, u.fhir_user, u.organization, u.clearances,
            u.totp, u.totp_last_step, int(u.disabled), u.failures, u.locked_until_ms, u.created_ms)


def _code(r: tuple[Any, ...]) -> AuthCodeRow:
    return AuthCodeRow(bytes(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], bool(r[12]))


def _refresh(r: tuple[Any, ...]) -> RefreshTokenRow:
    return RefreshTokenRow(bytes(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], bool(r[10]),
                           bool(r[11]))


def _app(r: tuple[Any, ...]) -> AppRow:
    return AppRow(r[0], tuple(orjson.loads(r[1])), bool(r[2]))


def _connect(path: Path) -> sqlite3.Connection:
    # One file holds the clinical tables and the audit log: a write and its audit entry share one commit.
    if not path.exists():
        create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed, not left behind
    # The search index is keyed by random tags, so writes touch pages all over it: keep them cached.
    conn.execute("PRAGMA cache_size=-262144")  # KiB: 256 MiB for the writer
    # Checkpoint every ~80 MiB of WAL instead of 4 MiB: a page rewritten by many commits
    # is copied back to the database once, not after every batch.
    conn.execute("PRAGMA wal_autocheckpoint=20000")
    return conn


_DELIVERY_COLUMNS = "tenant, subscription_id, kind, type, rid, version, attempts, due_ms, created_ms"
_INSERT_DELIVERY = f"INSERT INTO subscription_deliveries ({_DELIVERY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"  # noqa: S608
_REPLACE_DELIVERY = f"INSERT OR REPLACE INTO subscription_deliveries (id, {_DELIVERY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"  # noqa: S608


class _Tx:
    """WriteTx over the writer connection."""

    __slots__ = ("_c", "audit_next", "committed", "index_rows", "invalidations")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn
        self.index_rows = 0  # tags the current job left for the next index flush
        self.committed: list[Callable[[], None]] = []  # the current job's on_commit callbacks
        self.invalidations: list[tuple[str, str]] = []  # the current job's (kind, key) for other processes
        self.audit_next: int | None = None  # next audit seq (None: read it from the table)

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.committed.append(fn)

    def serialize(self, key: str) -> bool:
        # Every transaction of every process holds the database's write lock from BEGIN IMMEDIATE:
        # a re-check here sees all that was committed before, by any process.
        return True

    def invalidate(self, kind: str, key: str) -> None:
        self.invalidations.append((kind, key))  # published in coherence_log by the batch (see SqliteStore)

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._c.execute(
            _SELECT_CURRENT,
            (tenant, type, id),
        ).fetchone()
        return _version(row) if row else None

    def insert_version(self, tenant: str, v: StoredVersion) -> int:
        cur = self._c.execute(
            "INSERT INTO resource_versions (tenant, type, id, version, last_updated, deleted, key_id, blob)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (tenant, v.type, v.id, v.version, v.last_updated_ms, int(v.deleted), v.key_id, v.blob),
        )
        seq = cur.lastrowid
        assert seq is not None
        self._c.execute(
            "INSERT INTO resources_current (tenant, type, id, seq, deleted) VALUES (?,?,?,?,?)"
            " ON CONFLICT (tenant, type, id) DO UPDATE SET seq=excluded.seq, deleted=excluded.deleted",
            (tenant, v.type, v.id, seq, int(v.deleted)),
        )
        return seq

    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None:
        """Record a resource's new tags. The tag list is durable now (in resources_current), and
        searched there until the search_tags rows follow at the next index flush (_DeferredIndex)."""
        row = self._c.execute(
            "SELECT rk, tags FROM resources_current WHERE tenant=? AND type=? AND id=?", (tenant, type, id)
        ).fetchone()
        if row is None:
            raise LookupError("set_search_tags on a resource that has no version")
        rk, old = row
        new = b"".join(sorted(set(tags)))
        if old == new:
            return
        self._c.execute("UPDATE resources_current SET tags=? WHERE rk=?", (new, rk))
        # Already dirty: its row keeps the tags search_tags holds, which the flush replaces.
        self._c.execute("INSERT INTO index_dirty (rk, flushed) VALUES (?,?) ON CONFLICT (rk) DO NOTHING", (rk, old))
        self.index_rows += len(new) // SEARCH_TAG_BYTES

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        row = self._c.execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=? AND lookup=?",
            (tenant, lookup),
        ).fetchone()
        return WrappedKey(*row) if row else None

    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None:
        self._c.execute(
            "INSERT INTO data_keys (key_id, tenant, lookup, wrapped, kek_version, compartment, created_ms)"
            " VALUES (?,?,?,?,?,?,?)",
            (key.key_id, tenant, lookup, key.wrapped, key.kek_version, key.compartment, created_ms),
        )

    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None:
        self._c.execute(
            "UPDATE data_keys SET wrapped=?, compartment=?, kek_version=? WHERE key_id=?",
            (wrapped, compartment, kek_version, key_id),
        )

    def all_data_keys(self, tenant: str) -> list[WrappedKey]:
        rows = self._c.execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=?", (tenant,)
        ).fetchall()
        return [WrappedKey(*r) for r in rows]

    def erase_key(self, tenant: str, key_id: str,
                  known: tuple[int, list[tuple[int, str, str]]] | None = None) -> tuple[int, int]:
        c = self._c
        if known is None:  # a full scan (no index on key_id): callers on the live path pass ``known``
            known = (0, [])
        since, listed = known
        # The versions sealed under the key: those read before, and those written since (a seq range).
        found = listed + c.execute("SELECT seq, type, id FROM resource_versions WHERE seq > ? AND tenant=? AND"
                                   " key_id=?", (since, tenant, key_id)).fetchall()
        seqs = {seq for seq, _t, _i in found}
        rows = []
        for rtype, rid in sorted({(t, i) for _s, t, i in found}):
            row = c.execute("SELECT c.rk, c.seq, c.tags, d.flushed FROM resources_current c LEFT JOIN index_dirty d"
                            " ON d.rk = c.rk WHERE c.tenant=? AND c.type=? AND c.id=?", (tenant, rtype, rid)).fetchone()
            if row is not None and row[1] in seqs:  # its current version is sealed under the key
                rows.append((row[0], row[2], row[3]))
        rks = [(r[0],) for r in rows]
        # The tags in search_tags (flushed) and those pending (tags) go now, not at the next index flush.
        gone = sorted({(bytes(b)[i:i + SEARCH_TAG_BYTES], rk) for rk, tags, flushed in rows
                       for b in (tags or b"", flushed or b"") for i in range(0, len(bytes(b)), SEARCH_TAG_BYTES)})
        _delete_tags(c, gone)
        _chunked(c, "DELETE FROM index_dirty WHERE rk IN (VALUES {})", rks)
        _chunked(c, "DELETE FROM resources_current WHERE rk IN (VALUES {})", rks)
        before = c.total_changes
        _chunked(c, "DELETE FROM resource_versions WHERE seq IN (VALUES {})", [(seq,) for seq in sorted(seqs)])
        versions = c.total_changes - before
        c.execute("DELETE FROM data_keys WHERE tenant=? AND key_id=?", (tenant, key_id))
        return len(rks), versions

    def destroy_tenant_keys(self, tenant: str) -> tuple[int, int]:
        keks = self._c.execute("DELETE FROM tenant_keys WHERE tenant=?", (tenant,)).rowcount
        dks = self._c.execute("DELETE FROM data_keys WHERE tenant=?", (tenant,)).rowcount
        return keks, dks

    def delete_meta(self, name: str) -> None:
        self._c.execute("DELETE FROM meta WHERE name=?", (name,))

    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None:
        self._c.execute(
            "INSERT INTO tenant_keys (tenant, version, wrapped, root_key_id, created_ms) VALUES (?,?,?,?,?)",
            (row.tenant, row.version, row.wrapped, row.root_key_id, created_ms),
        )

    def replace_tenant_key(self, row: TenantKeyRow) -> None:
        self._c.execute(
            "UPDATE tenant_keys SET wrapped=?, root_key_id=? WHERE tenant=? AND version=?",
            (row.wrapped, row.root_key_id, row.tenant, row.version),
        )

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return _tenant_keys(self._c, tenant)

    def get_meta(self, name: str) -> bytes | None:
        row = self._c.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def meta_names(self) -> list[str]:
        return [r[0] for r in self._c.execute("SELECT name FROM meta ORDER BY name")]

    def set_meta(self, name: str, value: bytes) -> None:
        self._c.execute(
            "INSERT INTO meta (name, value) VALUES (?,?) ON CONFLICT (name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    def insert_client(self, row: ClientRow) -> None:
        self._c.execute(
            "INSERT INTO clients (client_id, tenant, name, secret_hash, scopes, jwks, created_ms, disabled,"
            " allowed_sources) VALUES (?,?,?,?,?,?,?,?,?)",
            (row.client_id, row.tenant, row.name, row.secret_hash, row.scopes, row.jwks,
             row.created_ms, int(row.disabled), row.allowed_sources),
        )

    def client_for_update(self, client_id: str) -> ClientRow | None:
        row = self._c.execute(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id=?", (client_id,)).fetchone()  # noqa: S608
        return _client(row) if row else None

    def update_client(self, row: ClientRow) -> None:
        self._c.execute(
            "UPDATE clients SET name=?, secret_hash=?, scopes=?, jwks=?, disabled=?, allowed_sources=? WHERE client_id=?",
            (row.name, row.secret_hash, row.scopes, row.jwks, int(row.disabled), row.allowed_sources, row.client_id),
        )

    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool:
        self._c.execute("DELETE FROM seen_jti WHERE expires_ms < ?", (now_ms,))
        cur = self._c.execute(
            "INSERT INTO seen_jti (jti, expires_ms) VALUES (?,?) ON CONFLICT DO NOTHING", (jti, expires_ms)
        )
        return cur.rowcount == 1

    def append_audit(self, tenant: str, ts_ms: int, seal: Callable[[int], bytes],
                     tags: bytes = b"") -> Callable[[], int]:
        # The writer thread is the only appender: the next seq is kept here, and forgotten whenever
        # a job or a batch rolls back (see SqliteStore._commit_batch).
        for attempt in (1, 2):
            if self.audit_next is None:
                self.audit_next = int(
                    self._c.execute("SELECT coalesce(max(seq), 0) + 1 FROM audit_log").fetchone()[0])
            seq = self.audit_next
            try:
                self._c.execute("INSERT INTO audit_log (seq, tenant, ts_ms, tags, blob) VALUES (?,?,?,?,?)",
                                (seq, tenant, ts_ms, tags, seal(seq)))
            except sqlite3.IntegrityError:
                # Another process (a CLI command on the live data directory) appended meanwhile.
                self.audit_next = None
                if attempt == 2:
                    raise
                continue
            break
        self.audit_next = seq + 1
        if tags:
            step = SEARCH_TAG_BYTES
            rows = [v for i in range(0, len(tags), step) for v in (tags[i : i + step], seq)]
            values = ",".join(["(?,?)"] * (len(rows) // 2))
            self._c.execute(f"INSERT OR IGNORE INTO audit_index (tag, seq) VALUES {values}", rows)  # noqa: S608
        return lambda: seq

    def add_audit_nodes(self, nodes: list[tuple[int, int, bytes]]) -> None:
        self._c.executemany("INSERT OR IGNORE INTO audit_nodes (level, idx, hash) VALUES (?,?,?)", nodes)

    def add_audit_checkpoint(self, cp: AuditCheckpoint) -> None:
        self._c.execute(
            "INSERT INTO audit_checkpoints (size, ts_ms, root, key_id, signature, witnessed, proof_from, proof)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (cp.size, cp.ts_ms, cp.root, cp.key_id, cp.signature, int(cp.witnessed), cp.proof_from, cp.proof),
        )


    # -- break-the-glass --
    def put_break_glass(self, row: BreakGlassRow) -> None:
        self._c.execute(f"REPLACE INTO break_glass ({_BG_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        (row.grant_id, row.tenant, row.user_id, row.patient_id, row.created_ms, row.expires_ms,
                         row.status, row.key_id, row.blob))

    # -- compliance registers --
    def put_register_entry(self, row: RegisterRow) -> None:
        self._c.execute(f"REPLACE INTO register_entries ({_REG_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        (row.tenant, row.kind, row.entry_id, row.created_ms, row.updated_ms, row.status, row.due_ms,
                         row.key_id, row.blob))

    def register_entry_for_update(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        row = self._c.execute(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE tenant=? AND kind=?"  # noqa: S608
                              " AND entry_id=?", (tenant, kind, entry_id)).fetchone()
        return _register(row) if row else None

    # -- identity --
    def insert_user(self, row: UserRow) -> None:
        self._c.execute(f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        _user_values(row))

    def update_user(self, row: UserRow) -> None:
        self._c.execute(f"REPLACE INTO users ({_USER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        _user_values(row))

    def user_for_update(self, user_id: str) -> UserRow | None:
        row = self._c.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id=?", (user_id,)).fetchone()  # noqa: S608
        return _user(row) if row else None

    def link_identity(self, provider: str, issuer: str, subject: str, user_id: str) -> None:
        self._c.execute("REPLACE INTO federated_links (provider, issuer, subject, user_id) VALUES (?,?,?,?)",
                        (provider, issuer, subject, user_id))

    def upsert_app(self, row: AppRow) -> None:
        self._c.execute("REPLACE INTO oauth_apps (client_id, redirect_uris, public) VALUES (?,?,?)",
                        (row.client_id, orjson.dumps(list(row.redirect_uris)).decode(), int(row.public)))

    def insert_login_session(self, row: LoginSessionRow) -> None:
        self._c.execute("INSERT INTO login_sessions (session_id, user_id, created_ms, last_seen_ms, amr, ended_ms)"
                        " VALUES (?,?,?,?,?,?)",
                        (row.session_id, row.user_id, row.created_ms, row.last_seen_ms, row.amr, row.ended_ms))

    def touch_login_session(self, session_id: str, now_ms: int) -> None:
        self._c.execute("UPDATE login_sessions SET last_seen_ms=max(last_seen_ms, ?) WHERE session_id=?",
                        (now_ms, session_id))

    def end_login_session(self, session_id: str, now_ms: int) -> None:
        self._c.execute("UPDATE login_sessions SET ended_ms=? WHERE session_id=? AND ended_ms=0", (now_ms, session_id))

    def insert_code(self, row: AuthCodeRow) -> None:
        self._c.execute(f"INSERT INTO auth_codes ({_CODE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        (row.code_hash, row.family_id, row.client_id, row.user_id, row.session_id, row.redirect_uri,
                         row.scope, row.code_challenge, row.nonce, row.patient, row.auth_time_ms, row.expires_ms,
                         int(row.used)))

    def consume_code(self, code_hash: bytes, now_ms: int) -> AuthCodeRow | None:
        # Used codes are kept an hour past expiry so a late replay still revokes its tokens.
        self._c.execute("DELETE FROM auth_codes WHERE expires_ms < ?", (now_ms - 3_600_000,))
        row = self._c.execute(f"SELECT {_CODE_COLUMNS} FROM auth_codes WHERE code_hash=?",  # noqa: S608
                              (code_hash,)).fetchone()
        if row is None:
            return None
        self._c.execute("UPDATE auth_codes SET used=1 WHERE code_hash=?", (code_hash,))
        return _code(row)

    def insert_refresh(self, row: RefreshTokenRow) -> None:
        self._c.execute(f"INSERT INTO refresh_tokens ({_REFRESH_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                        (row.token_hash, row.family_id, row.client_id, row.user_id, row.session_id, row.scope,
                         row.patient, row.auth_time_ms, row.expires_ms, row.created_ms, int(row.used),
                         int(row.revoked)))

    def consume_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._c.execute(f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE token_hash=?",  # noqa: S608
                              (token_hash,)).fetchone()
        if row is None:
            return None
        self._c.execute("UPDATE refresh_tokens SET used=1 WHERE token_hash=?", (token_hash,))
        return _refresh(row)

    def record_issued(self, jti: str, family_id: str, session_id: str, expires_ms: int) -> None:
        self._c.execute("INSERT INTO issued_tokens (jti, family_id, session_id, expires_ms) VALUES (?,?,?,?)",
                        (jti, family_id, session_id, expires_ms))

    def revoke_tokens(self, now_ms: int, *, family_id: str | None = None, session_id: str | None = None) -> int:
        column, value = ("family_id", family_id) if family_id is not None else ("session_id", session_id)
        if value is None:
            return 0
        self._c.execute("DELETE FROM issued_tokens WHERE expires_ms < ?", (now_ms,))
        self._c.execute(_PURGE_REVOKED, (now_ms,))
        n = self._c.execute(f"UPDATE refresh_tokens SET revoked=1 WHERE {column}=? AND revoked=0",  # noqa: S608
                            (value,)).rowcount
        added = self._c.execute(
            f"INSERT OR IGNORE INTO revoked_jtis (jti, expires_ms) SELECT jti, expires_ms FROM issued_tokens"  # noqa: S608
            f" WHERE {column}=?", (value,)).rowcount
        if added:
            self.invalidate(REVOCATIONS, "")  # the other processes read revoked_jtis at their next request
        return int(n + added)

    def revoke_refresh(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._c.execute(f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE token_hash=?",  # noqa: S608
                              (token_hash,)).fetchone()
        if row is None:
            return None
        self._c.execute("UPDATE refresh_tokens SET revoked=1 WHERE token_hash=?", (token_hash,))
        return _refresh(row)

    def revoke_jti(self, jti: str, expires_ms: int, now_ms: int) -> None:
        self._c.execute(_PURGE_REVOKED, (now_ms,))
        self._c.execute("INSERT OR IGNORE INTO revoked_jtis (jti, expires_ms) VALUES (?,?)", (jti, expires_ms))
        self.invalidate(REVOCATIONS, "")

    def end_user_sessions(self, user_id: str, now_ms: int) -> int:
        ids = [r[0] for r in self._c.execute("SELECT session_id FROM login_sessions WHERE user_id=? AND ended_ms=0",
                                             (user_id,)).fetchall()]
        for sid in ids:
            self.end_login_session(sid, now_ms)
            self.revoke_tokens(now_ms, session_id=sid)
        return len(ids)

    # -- subscriptions --
    def add_change(self, tenant: str, type: str, rid: str, version: int, now_ms: int) -> None:
        self._c.execute("INSERT INTO subscription_changes (tenant, type, rid, version, created_ms) VALUES (?,?,?,?,?)",
                        (tenant, type, rid, version, now_ms))

    def remove_changes(self, ids: list[int]) -> None:
        self._c.executemany("DELETE FROM subscription_changes WHERE id=?", [(i,) for i in ids])

    def put_delivery(self, row: DeliveryRow) -> None:
        values = (row.tenant, row.subscription_id, row.kind, row.type, row.rid, row.version, row.attempts, row.due_ms,
                  row.created_ms)
        if row.id == 0:
            self._c.execute(_INSERT_DELIVERY, values)
        else:
            self._c.execute(_REPLACE_DELIVERY, (row.id, *values))

    def remove_delivery(self, delivery_id: int) -> None:
        self._c.execute("DELETE FROM subscription_deliveries WHERE id=?", (delivery_id,))


def _tenant_keys(conn: sqlite3.Connection, tenant: str) -> list[TenantKeyRow]:
    rows = conn.execute(
        "SELECT tenant, version, wrapped, root_key_id, created_ms FROM tenant_keys WHERE tenant=? ORDER BY version",
        (tenant,),
    ).fetchall()
    return [TenantKeyRow(*r) for r in rows]


# A job: its name, the closure, and where to deliver the outcome: a thread
# future (sync callers) or an asyncio future with its loop (async callers).
_INDEX_FLUSH_S = 1.0  # the search_tags table catches up at least this often
_INDEX_FLUSH_ROWS = 200_000  # ... or when this many tag changes are pending
_FLUSH_SLICE = 8_000  # index rows per flush transaction, between two write batches


def _chunked(conn: sqlite3.Connection, template: str, rows: list[tuple[Any, ...]], chunk: int = 500) -> None:
    """Run ``template`` (with ``{}`` for a VALUES list) over rows, a few hundred rows per statement.

    One statement per row would release and re-take the GIL per row, which is slow
    while the event-loop thread is busy.
    """
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        width = len(part[0])
        one = "(" + ",".join("?" * width) + ")"
        conn.execute(template.format(",".join([one] * len(part))), [v for row in part for v in row])


def _delete_tags(conn: sqlite3.Connection, rows: list[tuple[bytes, int]], chunk: int = 500) -> None:
    """Delete (tag, rk) pairs a few hundred per statement.

    ``(tag, rk) IN (VALUES …)`` alone makes SQLite scan the whole index (its planner does not use a
    row-value IN list on a WITHOUT ROWID primary key): the extra ``tag IN (…)`` turns it into key seeks,
    58 ms → 3 ms per 500 rows on a 400,000-row index.
    """
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        tags = ",".join("?" * len(part))
        pairs = ",".join(["(?,?)"] * len(part))
        conn.execute(f"DELETE FROM search_tags WHERE tag IN ({tags}) AND (tag, rk) IN (VALUES {pairs})",  # noqa: S608
                     [t for t, _ in part] + [v for row in part for v in row])


@dataclass
class _Flush:
    changes: dict[int, bytes]  # rk -> the tags this flush writes (resources_current.tags when planned)
    gone: list[tuple[bytes, int]]
    added: list[tuple[bytes, int]]
    gone_at: int = 0
    added_at: int = 0
    ms: float = 0.0


_PLAN_MAX = 20_000  # resources per flush


class _DeferredIndex:
    """Search tags written in large, infrequent transactions, by one process at a time.

    Tags are random keys: each one dirties a random page of the index, and SQLite's
    WAL rewrites every dirty page at every commit. Writing them with each group
    commit made a create cost ~140-700 KiB of WAL. So a write transaction only
    records the resource's new tag list (in ``resources_current``) and marks it in
    ``index_dirty`` with the tags ``search_tags`` holds for it; the ``search_tags``
    rows are applied about once a second in one sorted pass. Until then searches
    also match the tag lists of the dirty resources (``_pending_rks``), so every
    process's searches see every committed write, and a crash loses nothing.

    Only the holder of the ``search-index`` lock flushes (several server processes
    may share the database): two flushers working from different snapshots could
    remove a tag the other re-added. Tags an update removed may linger for a moment:
    they only add candidates, which search always decrypts and verifies.
    """

    def __init__(self, leadership: FileLeadership) -> None:
        self._leadership = leadership
        self._rows = 0  # tags this process left dirty since the last flush
        self._since = time.monotonic()
        self._job: _Flush | None = None

    @staticmethod
    def _split(blob: bytes | None) -> set[bytes]:
        blob = blob or b""
        return {blob[i : i + SEARCH_TAG_BYTES] for i in range(0, len(blob), SEARCH_TAG_BYTES)}

    def stage(self, rows: int) -> None:
        self._rows += rows

    def due(self) -> bool:
        if self._job is not None:
            return True
        if self._rows < _INDEX_FLUSH_ROWS and time.monotonic() - self._since < _INDEX_FLUSH_S:
            return False
        self._since, self._rows = time.monotonic(), 0
        return self._leadership.lead("search-index")

    def _plan(self, conn: sqlite3.Connection) -> _Flush | None:
        rows = conn.execute("SELECT d.rk, d.flushed, c.tags FROM index_dirty d LEFT JOIN resources_current c"
                            " ON c.rk = d.rk ORDER BY d.rk LIMIT ?", (_PLAN_MAX,)).fetchall()
        if not rows:
            return None
        changes: dict[int, bytes] = {}
        gone: list[tuple[bytes, int]] = []
        added: list[tuple[bytes, int]] = []
        for rk, flushed, latest in rows:
            latest = bytes(latest or b"")
            changes[rk] = latest
            before, after = self._split(flushed), self._split(latest)  # flushed NULL: unknown, add them all
            gone += [(t, rk) for t in before - after]
            added += [(t, rk) for t in after - before]
        gone.sort()
        added.sort()  # sorted keys: each slice covers its own key range, each index page is written once
        return _Flush(changes, gone, added)

    def step(self, conn: sqlite3.Connection, gate: WriteGate, budget: int = _FLUSH_SLICE) -> bool:
        """Apply the next slice (at most ``budget`` rows) of a flush; True when nothing is left.

        Slices keep each write transaction short, so writers never wait long behind the
        index. Until the last slice commits, the flushed resources stay in ``index_dirty``,
        so searches find them either way.
        """
        if self._job is None:
            if not self.due():
                return True
            self._job = self._plan(conn)
            if self._job is None:
                return True
        job = self._job
        started = time.perf_counter()
        gone = job.gone[job.gone_at : job.gone_at + budget]
        added = job.added[job.added_at : job.added_at + max(0, budget - len(gone))]
        last = job.gone_at + len(gone) >= len(job.gone) and job.added_at + len(added) >= len(job.added)
        try:
            with gate.held():
                conn.execute("BEGIN IMMEDIATE")
                if gone:
                    _delete_tags(conn, gone)
                if added:
                    _chunked(conn, "INSERT OR IGNORE INTO search_tags (tag, rk) VALUES {}", added)
                if last:
                    self._finish(conn, job.changes)
                conn.execute("COMMIT")
        except sqlite3.Error:
            log.exception("search index flush failed; will retry")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False
        job.gone_at += len(gone)
        job.added_at += len(added)
        job.ms += (time.perf_counter() - started) * 1000
        if not last:
            return False
        self._job = None
        log.debug("search index flushed", extra={"resources": len(job.changes), "added": len(job.added),
                                                 "removed": len(job.gone), "ms": round(job.ms, 1)})
        return True

    @staticmethod
    def _finish(conn: sqlite3.Connection, changes: dict[int, bytes]) -> None:
        """Under the write lock: resources not changed since the plan are clean; the others stay dirty,
        from the tags just written."""
        rks = sorted(changes)
        moved: list[tuple[bytes, int]] = []
        for i in range(0, len(rks), 500):
            part = rks[i : i + 500]
            sql = f"SELECT rk, tags FROM resources_current WHERE rk IN ({','.join('?' * len(part))})"  # noqa: S608
            moved += [(changes[rk], rk) for rk, tags in conn.execute(sql, part) if bytes(tags) != changes[rk]]
        conn.executemany("UPDATE index_dirty SET flushed=? WHERE rk=?", moved)
        still = {rk for _t, rk in moved}
        _chunked(conn, "DELETE FROM index_dirty WHERE rk IN (VALUES {})", [(rk,) for rk in rks if rk not in still])

    def flush(self, conn: sqlite3.Connection, gate: WriteGate) -> None:
        """Apply what is pending now (idle time, shutdown), if this process is the one that flushes.

        One plan's worth: whatever is left stays dirty (and searchable) for the next flush, by any process."""
        self._since = -math.inf  # due now
        while True:
            before = (id(self._job), self._job.gone_at, self._job.added_at) if self._job else None
            if self.step(conn, gate, budget=_FLUSH_SLICE * 10):
                return
            after = (id(self._job), self._job.gone_at, self._job.added_at) if self._job else None
            if after == before:
                return  # the slice failed (logged): try again later


# Search: a resource whose tags are not in search_tags yet matches on its tag list (``instr`` may also
# match across two tags: one more candidate, verified like any other). The driving criterion lists the
# few dirty resources (CROSS JOIN: from index_dirty, never a scan of resources_current); the others
# test the candidate row.
def _pending_rks(tags: int) -> str:
    return ("SELECT d.rk FROM index_dirty d CROSS JOIN resources_current p ON p.rk = d.rk WHERE "  # noqa: S608
            + " OR ".join(["instr(p.tags, ?) > 0"] * tags))


def _pending_row(tags: int) -> str:
    return ("(EXISTS (SELECT 1 FROM index_dirty d WHERE d.rk = c.rk) AND ("  # noqa: S608
            + " OR ".join(["instr(c.tags, ?) > 0"] * tags) + "))")


_COHERENCE_KEEP = 10_000  # coherence_log seqs kept; a process further behind drops all its caches
_COHERENCE_READ_MAX = 1000


def _publish(conn: sqlite3.Connection, invalidations: list[tuple[str, str]]) -> None:
    """Inside the batch, under the write lock: its invalidations under one new seq, in commit order."""
    seq = int(conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM coherence_log").fetchone()[0])
    conn.executemany("INSERT INTO coherence_log (seq, kind, key) VALUES (?,?,?)",
                     [(seq, kind, key) for kind, key in sorted(set(invalidations))])
    if seq % 100 == 0:
        conn.execute("DELETE FROM coherence_log WHERE seq <= ?", (seq - _COHERENCE_KEEP,))


_Job = tuple[str, Callable[[Any], Any], Any, asyncio.AbstractEventLoop | None]
_STOP = object()


def _deliver(fut: Any, ok: bool, value: Any) -> None:
    if fut.cancelled():  # the caller went away; the write itself is committed regardless
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _run_callbacks(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:  # a commit hook must not turn a durable write into a failure
            log.exception("commit callback failed")


def _settle(outcomes: list[tuple[Any, bool, Any, list[Callable[[], None]]]]) -> None:
    """Deliver a batch's outcomes on the event loop: one wake-up per batch, not per job."""
    for fut, ok, value, hooks in outcomes:
        _run_callbacks(hooks)
        try:
            _deliver(fut, ok, value)
        except Exception:  # never strand the rest of the batch
            log.exception("could not deliver a write outcome")


class SqliteMigrator:
    """SchemaMigrator for a SQLite data directory, without starting a store (``fhirvault migrate``)."""

    latest = sqlite_migrations.LATEST

    def __init__(self, path: Path, audit_path: Path | None = None) -> None:
        self.path = path
        # where releases before migration 3 kept the audit log (merged into the main file by it)
        self.audit_path = audit_path or path.with_name(sqlite_migrations.LEGACY_AUDIT)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = _connect(self.path)
        try:
            return fn(conn)
        finally:
            conn.close()

    def current(self) -> int:
        return self._run(sqlite_migrations.current_version)

    def pending(self) -> list[Migration]:
        return self._run(sqlite_migrations.pending)

    def apply(self) -> list[Migration]:
        return self._run(lambda conn: sqlite_migrations.apply(conn, self.audit_path))


class SqliteStore:
    """The embedded default store: one SQLite file in WAL mode."""

    def __init__(self, path: Path, audit_path: Path | None = None) -> None:
        self.path = path
        # where releases before migration 3 kept the audit log (merged into the main file by it)
        self.audit_path = audit_path or path.with_name(sqlite_migrations.LEGACY_AUDIT)
        self._local = threading.local()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer_conn = _connect(path)
        self._migrate()
        # Other server processes may share the file (serve --workers N): they take turns at the gate.
        self._gate = WriteGate(path.with_name(path.name + ".write.lock"))
        self._index_leader = FileLeadership(path.parent)
        self._index = _DeferredIndex(self._index_leader)
        self._closed = False
        self._lifecycle = threading.Lock()
        self._thread = threading.Thread(target=self._run_writer, name="fhirvault-writer", daemon=True)
        self._thread.start()
        self.commits = 0  # batches committed (for metrics and tests)
        self.batched_jobs = 0

    # -- schema -------------------------------------------------------------
    def _migrate(self) -> None:
        """Bring the schema to the latest version (logged per step); refuse a newer database."""
        sqlite_migrations.apply(self._writer_conn, self.audit_path)

    # -- writes -------------------------------------------------------------
    def _run_writer(self) -> None:
        conn = self._writer_conn
        tx = _Tx(conn)
        while True:
            try:
                first = self._queue.get(timeout=_INDEX_FLUSH_S)
            except queue.Empty:
                self._index.flush(conn, self._gate)  # idle: catch the index up
                continue
            if first is _STOP:
                break
            batch: list[_Job] = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(conn, tx, batch)
            self._index.step(conn, self._gate)
            if stop:
                break
        self._index.flush(conn, self._gate)
        conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, tx: _Tx, batch: list[_Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        callbacks: list[list[Callable[[], None]]] = []
        with self._gate.held():
            try:
                conn.execute("BEGIN IMMEDIATE")
                tx.audit_next = None  # other processes append too: read the next seq under the lock
                rows = 0
                invalidations: list[tuple[str, str]] = []
                for _name, fn, _fut, _loop in batch:
                    conn.execute("SAVEPOINT job")
                    tx.index_rows = 0
                    tx.committed = []
                    tx.invalidations = []
                    try:
                        value = fn(tx)
                    except BaseException as exc:  # the job's own failure: undo only its work
                        tx.audit_next = None  # the job may have appended audit entries that are now gone
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        if isinstance(exc, StopIteration):  # futures refuse it (PEP 479 does the same)
                            wrapped = RuntimeError("write job raised StopIteration")
                            wrapped.__cause__ = exc
                            exc = wrapped
                        outcomes.append((False, exc))
                        callbacks.append([])
                    else:
                        conn.execute("RELEASE job")
                        outcomes.append((True, value))
                        callbacks.append(tx.committed)
                        rows += tx.index_rows
                        invalidations += tx.invalidations
                if invalidations:
                    _publish(conn, invalidations)
                conn.execute("COMMIT")
            except Exception as exc:  # the commit itself failed: nothing is durable
                log.error("write batch failed", extra={"error": type(exc).__name__})
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                outcomes = [(False, exc)] * len(batch)
                callbacks = [[] for _ in batch]
            else:
                self._index.stage(rows)
                self.commits += 1
                self.batched_jobs += len(batch)
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
        # Check and enqueue under the lock close() takes, so no job can land behind the stop marker.
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
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA cache_size=-65536")  # KiB: 64 MiB per reader thread
            self._local.conn = conn
        return conn

    def read_current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._reader().execute(
            _SELECT_CURRENT,
            (tenant, type, id),
        ).fetchone()
        return _version(row) if row else None

    def read_version(self, tenant: str, type: str, id: str, version: int) -> StoredVersion | None:
        row = self._reader().execute(
            f"{_SELECT_VERSIONS} WHERE tenant=? AND type=? AND id=? AND version=?",
            (tenant, type, id, version),
        ).fetchone()
        return _version(row) if row else None

    @staticmethod
    def _history_where(q: HistoryQuery) -> tuple[str, list[Any]]:
        clauses = ["tenant=?"]
        args: list[Any] = [q.tenant]
        if q.type is not None:
            clauses.append("type=?")
            args.append(q.type)
        if q.id is not None:
            clauses.append("id=?")
            args.append(q.id)
        if q.types is not None:
            clauses.append(f"type IN ({','.join('?' * len(q.types))})")
            args.extend(sorted(q.types))
        if q.since_ms is not None:
            clauses.append("last_updated >= ?")
            args.append(q.since_ms)
        if q.before_seq is not None:
            clauses.append("seq < ?")
            args.append(q.before_seq)
        return " AND ".join(clauses), args

    def history(self, query: HistoryQuery) -> list[StoredVersion]:
        where, args = self._history_where(query)
        rows = self._reader().execute(
            f"{_SELECT_VERSIONS} WHERE {where} ORDER BY seq DESC LIMIT ?",
            [*args, query.limit],
        ).fetchall()
        return [_version(r) for r in rows]

    def history_count(self, query: HistoryQuery) -> int:
        where, args = self._history_where(query)
        sql = f"SELECT count(*) FROM resource_versions WHERE {where}"  # noqa: S608 - clauses are constants
        row = self._reader().execute(sql, args).fetchone()
        return int(row[0])

    def search(self, q: SearchQuery) -> list[tuple[int, StoredVersion]]:
        """Current, non-deleted versions of ``q.types`` whose tags satisfy every group, in rk order."""
        clauses = ["c.tenant=?", f"c.type IN ({','.join('?' * len(q.types))})", "c.deleted=0"]
        args: list[Any] = [q.tenant, *q.types]
        if q.after_rk is not None:
            clauses.append("c.rk > ?")
            args.append(q.after_rk)
        if q.before_rk is not None:
            clauses.append("c.rk < ?")
            args.append(q.before_rk)
        if q.ids is not None:
            clauses.append(f"c.id IN ({','.join('?' * len(q.ids))})")
            args.extend(q.ids)
        # AND of ORs, one group per criterion. The most selective group drives (found by a bounded
        # count of each group's index entries); the others are checked per candidate by
        # primary-key seeks on (tag, rk), so a broad criterion never gets materialised.
        for n, group in enumerate(self._by_selectivity(q.tag_groups)):
            # Or a resource not in search_tags yet (one statement, one snapshot: a flush either
            # committed or not).
            marks = ",".join("?" * len(group))
            if n == 0:
                clauses.append(f"c.rk IN (SELECT rk FROM search_tags WHERE tag IN ({marks})"  # noqa: S608
                               f" UNION ALL {_pending_rks(len(group))})")
            else:
                clauses.append(f"(EXISTS (SELECT 1 FROM search_tags s WHERE s.tag IN ({marks}) AND s.rk = c.rk)"  # noqa: S608
                               f" OR {_pending_row(len(group))})")
            args.extend(group)
            args.extend(group)
        order = "DESC" if q.descending else "ASC"
        sql = (
            "SELECT c.rk, v.type, v.id, v.version, v.last_updated, v.deleted, v.key_id, v.blob, v.seq"  # noqa: S608
            f" FROM resources_current c JOIN resource_versions v ON v.seq = c.seq WHERE {' AND '.join(clauses)}"
            f" ORDER BY c.rk {order} LIMIT ?"
        )
        rows = self._reader().execute(sql, [*args, q.limit]).fetchall()
        return [(r[0], _version(r[1:])) for r in rows]

    def _by_selectivity(self, groups: tuple[tuple[bytes, ...], ...]) -> list[tuple[bytes, ...]]:
        if len(groups) < 2:
            return list(groups)
        reader = self._reader()

        def estimate(group: tuple[bytes, ...]) -> int:
            marks = ",".join("?" * len(group))
            sql = f"SELECT count(*) FROM (SELECT 1 FROM search_tags WHERE tag IN ({marks}) LIMIT {_PROBE})"  # noqa: S608
            return int(reader.execute(sql, group).fetchone()[0])  # (pending resources: a second or so of writes)

        return sorted(groups, key=estimate)

    def count_current(self, tenant: str, type: str) -> int:
        row = self._reader().execute(
            "SELECT count(*) FROM resources_current WHERE tenant=? AND type=? AND deleted=0", (tenant, type)
        ).fetchone()
        return int(row[0])

    def max_rk(self) -> int:
        row = self._reader().execute("SELECT coalesce(max(rk), 0) FROM resources_current").fetchone()
        return int(row[0])

    def max_seq(self) -> int:
        row = self._reader().execute("SELECT coalesce(max(seq), 0) FROM resource_versions").fetchone()
        return int(row[0])

    def data_key(self, tenant: str, key_id: str) -> WrappedKey | None:
        row = self._reader().execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=? AND key_id=?",
            (tenant, key_id),
        ).fetchone()
        return WrappedKey(*row) if row else None

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        row = self._reader().execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=? AND lookup=?",
            (tenant, lookup)).fetchone()
        return WrappedKey(*row) if row else None

    def key_versions(self, tenant: str, key_id: str) -> list[tuple[int, str, str]]:
        rows = self._reader().execute("SELECT seq, type, id FROM resource_versions WHERE tenant=? AND key_id=?",
                                      (tenant, key_id)).fetchall()
        return [(int(r[0]), r[1], r[2]) for r in rows]

    def key_usage(self, tenant: str, key_id: str) -> list[tuple[str, str, int, int]]:
        rows = self._reader().execute("SELECT type, id, count(*), max(last_updated) FROM resource_versions"
                                      " WHERE tenant=? AND key_id=? GROUP BY type, id", (tenant, key_id)).fetchall()
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    def key_activity(self, tenant: str) -> dict[str, tuple[int, int]]:
        rows = self._reader().execute("SELECT key_id, count(*), max(last_updated) FROM resource_versions"
                                      " WHERE tenant=? GROUP BY key_id", (tenant,)).fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        conn = self._reader()
        resources = conn.execute("SELECT count(*) FROM resources_current WHERE tenant=?", (tenant,)).fetchone()[0]
        versions = conn.execute("SELECT count(*) FROM resource_versions WHERE tenant=?", (tenant,)).fetchone()[0]
        return int(resources), int(versions)

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return _tenant_keys(self._reader(), tenant)

    def get_meta(self, name: str) -> bytes | None:
        row = self._reader().execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def meta_with_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._reader().execute("SELECT name, value FROM meta WHERE name >= ? AND name < ? ORDER BY name",
                                      (prefix, prefix + "\U0010ffff")).fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def client(self, client_id: str) -> ClientRow | None:
        row = self._reader().execute(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id=?",  # noqa: S608
                                     (client_id,)).fetchone()
        return _client(row) if row else None

    def clients(self, tenant: str) -> list[ClientRow]:
        rows = self._reader().execute(
            f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE tenant=? ORDER BY created_ms, client_id",  # noqa: S608
            (tenant,)).fetchall()
        return [_client(r) for r in rows]

    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]:
        rows = self._reader().execute(
            "SELECT seq, ts_ms, blob FROM audit_log WHERE tenant=? AND seq > ? ORDER BY seq LIMIT ?",
            (tenant, after_seq, limit),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        rows = self._reader().execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
            (after_seq, limit),
        ).fetchall()
        return [_audit_row(r) for r in rows]

    def audit_find(self, q: AuditQuery) -> list[AuditRow]:
        clauses = ["l.tenant = ?", "l.seq > ?"]
        args: list[Any] = [q.tenant, q.after_seq]
        if q.before_seq is not None:
            clauses.append("l.seq < ?")
            args.append(q.before_seq)
        if q.since_ms is not None:
            clauses.append("l.ts_ms >= ?")
            args.append(q.since_ms)
        if q.until_ms is not None:
            clauses.append("l.ts_ms <= ?")
            args.append(q.until_ms)
        if q.tags:
            marks = ",".join("?" * len(q.tags))
            clauses.append(f"l.seq IN (SELECT seq FROM audit_index WHERE tag IN ({marks}))")  # noqa: S608
            args.extend(q.tags)
        order = "DESC" if q.descending else "ASC"
        sql = (f"SELECT {_AUDIT_COLUMNS} FROM audit_log l"  # noqa: S608
               f" WHERE {' AND '.join(clauses)} ORDER BY l.seq {order} LIMIT ?")
        return [_audit_row(r) for r in self._reader().execute(sql, [*args, q.limit]).fetchall()]

    def audit_size(self) -> int:
        return int(self._reader().execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])

    def audit_node(self, level: int, index: int) -> bytes | None:
        row = self._reader().execute(
            "SELECT hash FROM audit_nodes WHERE level=? AND idx=?", (level, index)).fetchone()
        return bytes(row[0]) if row else None

    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        rows = self._reader().execute(
            _SELECT_CHECKPOINTS + " WHERE size > ? ORDER BY size LIMIT ?", (after_size, limit)).fetchall()
        return [_checkpoint(r) for r in rows]

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None:
        row = self._reader().execute(
            _SELECT_CHECKPOINTS + " ORDER BY size DESC LIMIT 1").fetchone()
        return _checkpoint(row) if row else None

    # -- break-the-glass --
    def break_glass(self, tenant: str, grant_id: str) -> BreakGlassRow | None:
        row = self._reader().execute(f"SELECT {_BG_COLUMNS} FROM break_glass WHERE tenant=? AND grant_id=?",  # noqa: S608
                                     (tenant, grant_id)).fetchone()
        return _break_glass(row) if row else None

    def break_glass_rows(self, tenant: str, *, status: str | None = None, user_id: str | None = None,
                         expires_after_ms: int | None = None, limit: int = 500) -> list[BreakGlassRow]:
        where: list[str] = ["tenant=?"]
        args: list[str | int] = [tenant]
        for clause, value in (("status=?", status), ("user_id=?", user_id), ("expires_ms>?", expires_after_ms)):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = self._reader().execute(
            f"SELECT {_BG_COLUMNS} FROM break_glass WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY created_ms DESC LIMIT ?", (*args, limit)).fetchall()
        return [_break_glass(r) for r in rows]

    # -- compliance registers --
    def register_entry(self, tenant: str, kind: str, entry_id: str) -> RegisterRow | None:
        row = self._reader().execute(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE tenant=? AND kind=?"  # noqa: S608
                                     " AND entry_id=?", (tenant, kind, entry_id)).fetchone()
        return _register(row) if row else None

    def register_entries(self, tenant: str, kind: str, *, status: str | None = None,
                         limit: int = 1000) -> list[RegisterRow]:
        where, args = ("tenant=? AND kind=? AND status=?", (tenant, kind, status)) if status is not None \
            else ("tenant=? AND kind=?", (tenant, kind))
        rows = self._reader().execute(f"SELECT {_REG_COLUMNS} FROM register_entries WHERE {where}"  # noqa: S608
                                      " ORDER BY created_ms DESC, entry_id LIMIT ?", (*args, limit)).fetchall()
        return [_register(r) for r in rows]

    # -- identity --
    def user(self, user_id: str) -> UserRow | None:
        row = self._reader().execute(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id=?",  # noqa: S608
                                     (user_id,)).fetchone()
        return _user(row) if row else None

    def user_by_username(self, tenant: str, username: str) -> UserRow | None:
        row = self._reader().execute(f"SELECT {_USER_COLUMNS} FROM users WHERE tenant=? AND username=?",  # noqa: S608
                                     (tenant, username)).fetchone()
        return _user(row) if row else None

    def users(self, tenant: str) -> list[UserRow]:
        rows = self._reader().execute(f"SELECT {_USER_COLUMNS} FROM users WHERE tenant=? ORDER BY username",  # noqa: S608
                                      (tenant,)).fetchall()
        return [_user(r) for r in rows]

    def linked_user(self, provider: str, issuer: str, subject: str) -> str | None:
        row = self._reader().execute(
            "SELECT user_id FROM federated_links WHERE provider=? AND issuer=? AND subject=?",
            (provider, issuer, subject)).fetchone()
        return str(row[0]) if row else None

    def app(self, client_id: str) -> AppRow | None:
        row = self._reader().execute("SELECT client_id, redirect_uris, public FROM oauth_apps WHERE client_id=?",
                                     (client_id,)).fetchone()
        return _app(row) if row else None

    def login_session(self, session_id: str) -> LoginSessionRow | None:
        row = self._reader().execute(
            "SELECT session_id, user_id, created_ms, last_seen_ms, amr, ended_ms FROM login_sessions"
            " WHERE session_id=?", (session_id,)).fetchone()
        return LoginSessionRow(*row) if row else None

    def refresh_token(self, token_hash: bytes) -> RefreshTokenRow | None:
        row = self._reader().execute(f"SELECT {_REFRESH_COLUMNS} FROM refresh_tokens WHERE token_hash=?",  # noqa: S608
                                     (token_hash,)).fetchone()
        return _refresh(row) if row else None

    def revoked_jtis(self, after_seq: int, now_ms: int) -> list[tuple[int, str, int]]:
        rows = self._reader().execute(
            "SELECT seq, jti, expires_ms FROM revoked_jtis WHERE seq > ? AND expires_ms >= ? ORDER BY seq",
            (after_seq, now_ms)).fetchall()
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    # -- subscriptions --
    def subscription_changes(self, limit: int) -> list[ChangeRow]:
        rows = self._reader().execute("SELECT id, tenant, type, rid, version, created_ms FROM subscription_changes"
                                      " ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [ChangeRow(*r) for r in rows]

    def due_deliveries(self, now_ms: int, limit: int) -> list[DeliveryRow]:
        rows = self._reader().execute(f"SELECT id, {_DELIVERY_COLUMNS} FROM subscription_deliveries"  # noqa: S608
                                      " WHERE due_ms <= ? ORDER BY due_ms, id LIMIT ?", (now_ms, limit)).fetchall()
        return [DeliveryRow(*r) for r in rows]

    def subscription_backlog(self) -> tuple[int, int]:
        reader = self._reader()
        changes = reader.execute("SELECT count(*) FROM subscription_changes").fetchone()[0]
        return int(changes), int(reader.execute("SELECT count(*) FROM subscription_deliveries").fetchone()[0])

    # -- other processes sharing the file (services/coherence.py) -------------
    def changes_since(self, seq: int | None) -> tuple[int, list[tuple[str, str]] | None]:
        """The coherence head, and the (kind, key) rows published after ``seq`` up to it (None: unknown,
        drop everything). One index lookup when nothing changed."""
        reader = self._reader()
        head = int(reader.execute("SELECT coalesce(max(seq), 0) FROM coherence_log").fetchone()[0])
        if head == seq or seq is None:
            return head, [] if head == seq else None
        rows = reader.execute("SELECT seq, kind, key FROM coherence_log WHERE seq > ? AND seq <= ? ORDER BY seq"
                              " LIMIT ?", (seq, head, _COHERENCE_READ_MAX)).fetchall()
        if not rows or int(rows[0][0]) != seq + 1 or len(rows) >= _COHERENCE_READ_MAX:
            return head, None
        return head, [(str(r[1]), str(r[2])) for r in rows]

    def leadership(self) -> FileLeadership:
        """Cluster singletons among the server processes of this data directory (container.leadership_for)."""
        return FileLeadership(self.path.parent)

    def scrub(self) -> bool:
        """Checkpoint the WAL into the database file and truncate it, so rows just deleted (destroyed keys)
        leave the WAL's old page images; secure_delete zeroes them in the file. True when complete (False:
        readers kept the WAL busy; the next checkpoint overwrites it)."""
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA secure_delete=ON")
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        if busy:
            log.warning("WAL checkpoint after an erasure was blocked by readers; the WAL is overwritten later")
        return not busy

    def close(self) -> None:
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout=30)
        self._index_leader.close()
        self._gate.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
