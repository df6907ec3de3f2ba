"""Numbered schema migrations: a database made by the previous release is upgraded in place, data intact;
a database newer than the code is refused. The old schemas are vendored in tests/data (never read from git)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from fhirvault.adapters import sqlite_migrations
from fhirvault.adapters.postgres_schema import APP_ROLE
from fhirvault.adapters.postgres_schema import SCHEMA_VERSION as PG_LATEST
from fhirvault.adapters.postgres_store import PostgresMigrator, PostgresStore
from fhirvault.adapters.sqlite_store import SqliteMigrator, SqliteStore
from fhirvault.cli.main import main
from fhirvault.ports import SchemaError, SchemaTooNew
from tests import pg_server

DATA = Path(__file__).parents[2] / "data"
LATEST = sqlite_migrations.LATEST


# -- SQLite ---------------------------------------------------------------------------------------------
def _v1_data_dir(d: Path) -> Path:
    """A data directory's databases as fhirvault 0.1 (commit 7ebcad9) left them, with a few rows."""
    db = d / "fhirvault.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("ATTACH DATABASE ? AS audit", (str(d / "audit.sqlite3"),))
    conn.executescript((DATA / "sqlite_v1_main.sql").read_text())
    conn.executescript((DATA / "sqlite_v1_audit.sql").read_text())
    conn.executescript("""
        INSERT INTO clients (client_id, tenant, name, secret_hash, scopes, jwks, created_ms)
            VALUES ('fv-old', 'default', 'old client', 'h', 'system/*.cruds', NULL, 1);
        INSERT INTO resource_versions (tenant, type, id, version, last_updated, deleted, key_id, blob)
            VALUES ('default', 'Patient', 'p1', 1, 5, 0, 'k1', x'00112233');
        INSERT INTO resources_current (tenant, type, id, seq) VALUES ('default', 'Patient', 'p1', 1);
        INSERT INTO audit.audit_log (tenant, ts_ms, tags, blob) VALUES ('default', 7, x'', x'aabb');
    """)
    conn.close()
    return db


def _columns(db: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    out: dict[str, list[tuple[object, ...]]] = {}
    for (name, kind) in conn.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'index', 'trigger')"
                                     " AND name NOT LIKE 'sqlite_%' ORDER BY name"):
        out[name] = [kind, *(list(conn.execute(f"PRAGMA index_xinfo({name})")) or
                             list(conn.execute(f"PRAGMA table_info({name})")))]
    conn.close()
    return out


def _version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.sqlite_only
def test_previous_release_sqlite_database_is_upgraded_on_open(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    db = _v1_data_dir(old)
    assert SqliteMigrator(db).current() == 1
    assert [m.version for m in SqliteMigrator(db).pending()] == list(range(2, LATEST + 1))
    SqliteStore(db).close()
    assert _version(db) == LATEST
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT client_id, name, allowed_sources FROM clients").fetchall() == \
        [("fv-old", "old client", None)]
    assert conn.execute("SELECT id, blob FROM resource_versions").fetchall() == [("p1", b"\x00\x11\x22\x33")]
    # The audit log moved into the main file (one commit covers a write and its entry).
    assert conn.execute("SELECT seq, blob FROM audit_log").fetchall() == [(1, b"\xaa\xbb")]
    conn.close()
    # The old file is kept under another name until the next start, then deleted.
    assert not (old / "audit.sqlite3").exists() and (old / "audit.sqlite3.merged").is_file()
    SqliteStore(db).close()
    assert not list(old.glob("audit.sqlite3*"))
    # The same tables, columns, indexes and triggers as a database this release creates.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    SqliteStore(fresh / "fhirvault.sqlite3").close()
    assert not list(fresh.glob("audit.sqlite3*"))
    assert _columns(db) == _columns(fresh / "fhirvault.sqlite3")
    assert SqliteMigrator(db).pending() == []


@pytest.mark.sqlite_only
def test_merge_carries_every_audit_table_verbatim_even_from_the_wal(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db = _v1_data_dir(tmp_path)
    monkeypatch.setattr(sqlite_migrations, "LATEST", 2)  # the previous release: stop before the merge
    SqliteMigrator(db).apply()
    monkeypatch.undo()
    audit = sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)
    audit.execute("PRAGMA journal_mode=WAL")
    audit.execute("PRAGMA wal_autocheckpoint=0")  # rows left in the WAL, as a killed server leaves them
    audit.execute("INSERT INTO audit_log (seq, tenant, ts_ms, tags, blob) VALUES (2, 'default', 8, x'01', 'text')")
    audit.execute("INSERT INTO audit_index (tag, seq) VALUES (x'01', 2)")
    audit.execute("INSERT INTO audit_nodes (level, idx, hash) VALUES (0, 0, x'ff')")
    audit.execute("INSERT INTO audit_checkpoints (size, ts_ms, root, key_id, signature) VALUES (2, 9, x'ee', 'k', x'dd')")
    assert (tmp_path / "audit.sqlite3-wal").stat().st_size > 0
    before = {t: audit.execute(f"SELECT *, typeof(blob) FROM {t}" if t == "audit_log" else f"SELECT * FROM {t}"
                               ).fetchall() for t in ("audit_log", "audit_index", "audit_nodes", "audit_checkpoints")}
    crashed = {p.name: p.read_bytes() for p in tmp_path.glob("audit.sqlite3*")}
    audit.close()  # (a clean close checkpoints: put the WAL back as the crash left it)
    for name, data in crashed.items():
        (tmp_path / name).write_bytes(data)
    assert [m.version for m in SqliteMigrator(db).apply()] == list(range(3, LATEST + 1))
    conn = sqlite3.connect(db)
    after = {t: conn.execute(f"SELECT *, typeof(blob) FROM {t}" if t == "audit_log" else f"SELECT * FROM {t}"
                             ).fetchall() for t in before}
    conn.close()
    assert after == before and after["audit_log"][1][-1:] == ("text",)  # a row rewritten as text stays text
    assert sorted(p.name for p in tmp_path.glob("audit.sqlite3*")) == ["audit.sqlite3.merged"]


@pytest.mark.sqlite_only
def test_a_stop_between_the_merge_and_the_rename_is_finished_at_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _v1_data_dir(tmp_path)
    real = Path.rename

    def crash(self: Path, target: Path) -> Path:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        SqliteMigrator(db).apply()
    monkeypatch.setattr(Path, "rename", real)
    assert _version(db) == LATEST and (tmp_path / "audit.sqlite3").exists()  # merged, not yet renamed
    store = SqliteStore(db)  # no second merge (it would duplicate keys and fail): the file is retired
    try:
        assert [r.blob for r in store.audit_rows()] == [b"\xaa\xbb"]
    finally:
        store.close()
    assert sorted(p.name for p in tmp_path.glob("audit.sqlite3*")) == ["audit.sqlite3.merged"]


@pytest.mark.sqlite_only
def test_an_old_audit_file_put_back_with_more_entries_is_refused_not_discarded(tmp_path: Path) -> None:
    db = _v1_data_dir(tmp_path)
    SqliteStore(db).close()
    legacy = sqlite3.connect(tmp_path / "audit.sqlite3.merged")
    legacy.execute("INSERT INTO audit_log (seq, tenant, ts_ms, tags, blob) VALUES (2, 'default', 8, x'', x'00')")
    legacy.commit()
    legacy.close()
    (tmp_path / "audit.sqlite3.merged").rename(tmp_path / "audit.sqlite3")
    with pytest.raises(SchemaError, match="holds audit entries up to 2, the main database only up to 1"):
        SqliteStore(db)
    assert (tmp_path / "audit.sqlite3").exists()  # left where it was


@pytest.mark.sqlite_only
def test_a_failed_merge_leaves_version_2_and_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _v1_data_dir(tmp_path)
    conn = sqlite3.connect(db)  # a row already where the copy goes: the merge must fail, not half-apply
    conn.execute("CREATE TABLE audit_nodes (level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,"
                 " PRIMARY KEY (level, idx)) WITHOUT ROWID")
    conn.execute("INSERT INTO audit_nodes VALUES (0, 0, x'00')")
    conn.commit()
    conn.close()
    legacy = sqlite3.connect(tmp_path / "audit.sqlite3")
    legacy.execute("INSERT INTO audit_nodes VALUES (0, 0, x'ff')")
    legacy.commit()
    legacy.close()
    with pytest.raises(sqlite3.IntegrityError):
        SqliteStore(db)
    assert _version(db) == 2 and (tmp_path / "audit.sqlite3").exists()
    conn = sqlite3.connect(db)
    assert "audit_log" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()


@pytest.mark.sqlite_only
def test_fhirvault_migrate_check_then_apply_then_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    db = _v1_data_dir(tmp_path)
    assert main(["migrate", "--data-dir", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "pending: 2 clients.allowed_sources" in out and _version(db) == 1  # --check changed nothing
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "applied: 2 clients.allowed_sources" in out and f"from version 1 to {LATEST}" in out
    assert _version(db) == LATEST
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["migrate", "--data-dir", str(tmp_path), "--check"]) == 0


@pytest.mark.sqlite_only
def test_a_step_already_present_is_marked_not_redone(tmp_path: Path) -> None:
    """Unreleased builds added clients.allowed_sources without a new version: the step must not fail."""
    db = _v1_data_dir(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE clients ADD COLUMN allowed_sources TEXT")
    conn.execute("UPDATE clients SET allowed_sources='10.0.0.0/8'")
    conn.commit()
    conn.close()
    assert [m.version for m in SqliteMigrator(db).apply()] == list(range(2, LATEST + 1))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT allowed_sources FROM clients").fetchall() == [("10.0.0.0/8",)]
    conn.close()


@pytest.mark.sqlite_only
def test_a_failing_step_rolls_back_to_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _v1_data_dir(tmp_path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE clients ADD COLUMN allowed_sources TEXT")
        raise RuntimeError("disk on fire")

    steps = list(sqlite_migrations.STEPS)
    steps[1] = sqlite_migrations._Step(steps[1].migration, broken)
    monkeypatch.setattr(sqlite_migrations, "STEPS", tuple(steps))
    with pytest.raises(RuntimeError, match="disk on fire"):
        SqliteMigrator(db).apply()
    assert _version(db) == 1
    conn = sqlite3.connect(db)
    assert "allowed_sources" not in {r[1] for r in conn.execute("PRAGMA table_info(clients)")}
    conn.close()


@pytest.mark.sqlite_only
def test_newer_sqlite_database_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "fhirvault.sqlite3"
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(LATEST + 1).encode(),))
    conn.commit()
    conn.close()
    message = f"database schema version {LATEST + 1} is newer than this fhirvault ({LATEST}): upgrade fhirvault"
    with pytest.raises(SchemaTooNew) as caught:
        SqliteStore(db)
    assert str(caught.value) == message
    for argv in (["migrate", "--data-dir", str(tmp_path)], ["migrate", "--check", "--data-dir", str(tmp_path)]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"fhirvault: error: {message}\n"
    assert _version(db) == LATEST + 1  # left alone


# -- PostgreSQL -----------------------------------------------------------------------------------------
def _pg_columns(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as c:
        cols = c.execute("SELECT table_schema, table_name, column_name, data_type, is_nullable, column_default"
                         " FROM information_schema.columns WHERE table_schema IN ('public', 'audit')"
                         " ORDER BY 1, 2, 3").fetchall()
        idx = c.execute("SELECT schemaname, indexname, indexdef FROM pg_indexes"
                        " WHERE schemaname IN ('public', 'audit') ORDER BY 1, 2").fetchall()
    return [tuple(r) for r in cols] + [tuple(r) for r in idx]


def test_previous_release_postgresql_database_is_upgraded(tmp_path: Path) -> None:
    url = pg_server.server().create_database(empty=True)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute((DATA / "postgres_v1.sql").read_text().encode())
        c.execute("INSERT INTO clients (client_id, tenant, name, secret_hash, scopes, jwks, created_ms)"
                  " VALUES ('fv-old', 'default', 'old client', 'h', 'system/*.cruds', NULL, 1)")
        c.execute("INSERT INTO resource_versions (tenant, type, id, version, last_updated, deleted, key_id, blob)"
                  " VALUES ('default', 'Patient', 'p1', 1, 5, false, 'k1', '\\x00112233')")
    migrator = PostgresMigrator(url)
    assert migrator.current() == 1
    assert [m.version for m in migrator.pending()] == list(range(2, PG_LATEST + 1))
    assert [m.version for m in migrator.apply()] == list(range(2, PG_LATEST + 1))
    assert migrator.current() == PG_LATEST and migrator.pending() == [] and migrator.apply() == []
    with psycopg.connect(url) as c:
        assert c.execute("SELECT client_id, allowed_sources FROM clients").fetchall() == [("fv-old", None)]
        assert c.execute("SELECT id, blob FROM resource_versions").fetchall() == [("p1", b"\x00\x11\x22\x33")]
        assert c.execute("SELECT seq FROM coherence_head").fetchall() == [(0,)]
    assert _pg_columns(url) == _pg_columns(pg_server.server().create_database())  # as this release creates it
    PostgresStore(url, read_pool_size=1).close()  # and the store opens on it


def test_newer_postgresql_database_is_refused() -> None:
    url = pg_server.server().create_database()
    with psycopg.connect(url) as c:
        c.execute("UPDATE meta SET value=%s WHERE name='schema_version'", (str(PG_LATEST + 7).encode(),))
    with pytest.raises(SchemaTooNew, match=rf"^database schema version {PG_LATEST + 7} is newer than this "
                                           rf"fhirvault \({PG_LATEST}\): upgrade fhirvault$"):
        PostgresStore(url, read_pool_size=1)
    with pytest.raises(SchemaTooNew):
        PostgresMigrator(url).pending()


def test_the_application_role_is_told_to_run_migrate_as_the_owner() -> None:
    srv = pg_server.server()
    url = srv.create_database()
    srv.admin(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='fv_web') THEN"
              f" CREATE ROLE fv_web LOGIN IN ROLE {APP_ROLE}; END IF; END $$")
    with psycopg.connect(url, autocommit=True) as c:  # as the previous release left it: version 2, no coherence
        c.execute("DROP TABLE coherence_log, coherence_head")
        c.execute("UPDATE meta SET value='2'::bytea WHERE name='schema_version'")
    with pytest.raises(SchemaError, match=r"needs migration 3 \(coherence_head.*run 'fhirvault migrate' with the "
                                          r"owner role's database_url"):
        PostgresStore(url.replace("postgres@", "fv_web@"), read_pool_size=1)
    assert PostgresMigrator(url).current() == 2  # nothing half-done
    assert [m.version for m in PostgresMigrator(url).apply()] == list(range(3, PG_LATEST + 1))  # the owner can
    PostgresStore(url.replace("postgres@", "fv_web@"), read_pool_size=1).close()  # and the app role then starts


def test_fhirvault_migrate_on_a_postgresql_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = pg_server.server().create_database(empty=True)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute((DATA / "postgres_v1.sql").read_text().encode())
    (tmp_path / "fhirvault.toml").write_text(f'database_url = "{url}"\n')
    (tmp_path / "root.key").write_bytes(b"")  # marks an initialised PostgreSQL data directory; not read here
    assert main(["migrate", "--check", "--data-dir", str(tmp_path)]) == 1
    assert "pending: 3 coherence_head" in capsys.readouterr().out
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "applied: 2 clients.allowed_sources" in out and f"from version 1 to {PG_LATEST}" in out
    assert main(["migrate", "--check", "--data-dir", str(tmp_path)]) == 0
    assert url.rsplit("@", 1)[0] not in capsys.readouterr().out  # the URL (credentials) is not printed
