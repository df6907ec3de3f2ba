-- SQLite schema version 1, audit database (attached as 'audit'), vendored from git show 7ebcad9:src/fhirvault/adapters/sqlite_schema.py
-- (test data: a database as the previous release created it; never edit, add a new file for a new release)

CREATE TABLE IF NOT EXISTS audit.audit_log (
    seq    INTEGER PRIMARY KEY,  -- leaf index + 1
    tenant TEXT NOT NULL,
    ts_ms  INTEGER NOT NULL,
    tags   BLOB NOT NULL,        -- blind index tags (patient, agent) covered by the leaf hash
    blob   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit.audit_index (
    tag BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit.audit_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit.audit_checkpoints (
    size       INTEGER PRIMARY KEY,
    ts_ms      INTEGER NOT NULL,
    root       BLOB NOT NULL,
    key_id     TEXT NOT NULL,
    signature  BLOB NOT NULL,
    witnessed  INTEGER NOT NULL DEFAULT 0,  -- 1: also sent to the witnesses
    proof_from INTEGER NOT NULL DEFAULT 0,  -- previous witnessed size (0: none)
    proof      BLOB NOT NULL DEFAULT x''    -- consistency proof from proof_from to size
);
CREATE TRIGGER IF NOT EXISTS audit.audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit.audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit.audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit.audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
