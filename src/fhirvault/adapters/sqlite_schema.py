"""SQLite schema. Only routing data is in clear; every payload is an AEAD blob.

The scripts below are version 1, what the first release created (all IF NOT EXISTS); later
changes are numbered steps in MIGRATIONS (adapters/sqlite_migrations.py runs them).
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS tenant_keys (
    tenant      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    wrapped     BLOB NOT NULL,
    root_key_id TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, version)
) WITHOUT ROWID;

-- One data key per patient compartment (plus tenant-level keys). The lookup is an
-- HMAC of the compartment name, so the table does not list patient ids in clear.
CREATE TABLE IF NOT EXISTS data_keys (
    key_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    lookup      BLOB NOT NULL,
    wrapped     BLOB NOT NULL,
    kek_version INTEGER NOT NULL,
    compartment BLOB NOT NULL,
    created_ms  INTEGER NOT NULL,
    UNIQUE (tenant, lookup)
) WITHOUT ROWID;

-- Every version of every resource; seq orders all writes of the store.
CREATE TABLE IF NOT EXISTS resource_versions (
    seq          INTEGER PRIMARY KEY,
    tenant       TEXT NOT NULL,
    type         TEXT NOT NULL,
    id           TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted      INTEGER NOT NULL,
    key_id       TEXT NOT NULL,
    blob         BLOB NOT NULL,
    UNIQUE (tenant, type, id, version)
);
CREATE INDEX IF NOT EXISTS resource_versions_type_seq ON resource_versions (tenant, type, seq);
CREATE INDEX IF NOT EXISTS resource_versions_updated ON resource_versions (tenant, last_updated);

-- One row per resource: its current version, and rk, a key assigned at creation that
-- orders search results stably (updates do not move a resource).
CREATE TABLE IF NOT EXISTS resources_current (
    rk      INTEGER PRIMARY KEY,
    tenant  TEXT NOT NULL,
    type    TEXT NOT NULL,
    id      TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    tags    BLOB NOT NULL DEFAULT x'',  -- this resource's search tags, to remove them on change
    UNIQUE (tenant, type, id)
);
CREATE INDEX IF NOT EXISTS resources_current_type ON resources_current (tenant, type, rk);

-- Resources whose tag list (resources_current.tags) is not yet in search_tags.
CREATE TABLE IF NOT EXISTS index_dirty (
    rk INTEGER PRIMARY KEY
);

-- Blind search index: truncated HMAC tags (keyed per tenant, type and parameter) → resource.
CREATE TABLE IF NOT EXISTS search_tags (
    tag BLOB NOT NULL,
    rk  INTEGER NOT NULL,
    PRIMARY KEY (tag, rk)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    secret_hash TEXT,
    scopes      TEXT NOT NULL,
    jwks        TEXT,
    created_ms  INTEGER NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- client_assertion ids seen, kept until they expire (replay protection).
CREATE TABLE IF NOT EXISTS seen_jti (
    jti        TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;

"""

# The audit log lives in the main database file, so an interaction and its record commit in one
# transaction of one file: atomic across a crash or a power cut (an ATTACHed second file in WAL mode is
# atomic per file only; migration 3 merged the old ``audit.sqlite3`` in). Rows are AEAD blobs; their
# Merkle tree (RFC 9162) is built by the checkpointer, which keeps the hashes of complete subtrees and
# the signed checkpoints here too. The triggers stop accidents; tampering is caught by
# ``fhirvault audit verify``, not by them.
AUDIT_TABLES = ("audit_log", "audit_index", "audit_nodes", "audit_checkpoints")
AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq    INTEGER PRIMARY KEY,  -- leaf index + 1
    tenant TEXT NOT NULL,
    ts_ms  INTEGER NOT NULL,
    tags   BLOB NOT NULL,        -- blind index tags (patient, agent) covered by the leaf hash
    blob   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_index (
    tag BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size       INTEGER PRIMARY KEY,
    ts_ms      INTEGER NOT NULL,
    root       BLOB NOT NULL,
    key_id     TEXT NOT NULL,
    signature  BLOB NOT NULL,
    witnessed  INTEGER NOT NULL DEFAULT 0,  -- 1: also sent to the witnesses
    proof_from INTEGER NOT NULL DEFAULT 0,  -- previous witnessed size (0: none)
    proof      BLOB NOT NULL DEFAULT x''    -- consistency proof from proof_from to size
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
"""

# -- identity: users, login sessions, authorization codes, refresh tokens (see services/users.py) --
IDENTITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id         TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    username        TEXT NOT NULL,
    password_hash   TEXT,
    role            TEXT NOT NULL,
    fhir_user       TEXT,
    organization    TEXT,
    clearances      TEXT NOT NULL DEFAULT '',
    totp            BLOB,                       -- AEAD envelope of the TOTP secret
    totp_last_step  INTEGER NOT NULL DEFAULT 0,
    disabled        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    locked_until_ms INTEGER NOT NULL DEFAULT 0, -- -1: locked until an admin unlocks
    created_ms      INTEGER NOT NULL,
    UNIQUE (tenant, username)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS federated_links (
    provider TEXT NOT NULL,
    issuer   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (provider, issuer, subject)
) WITHOUT ROWID;
-- Authorization-code clients (SMART apps): exact redirect URIs (JSON list), public or confidential.
CREATE TABLE IF NOT EXISTS oauth_apps (
    client_id     TEXT PRIMARY KEY,
    redirect_uris TEXT NOT NULL,
    public        INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS login_sessions (
    session_id   TEXT PRIMARY KEY,  -- SHA-256 of the cookie
    user_id      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    amr          TEXT NOT NULL,
    ended_ms     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Codes, refresh tokens: only SHA-256 hashes are stored.
CREATE TABLE IF NOT EXISTS auth_codes (
    code_hash      BLOB PRIMARY KEY,
    family_id      TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    scope          TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    nonce          TEXT,
    patient        TEXT,
    auth_time_ms   INTEGER NOT NULL,
    expires_ms     INTEGER NOT NULL,
    used           INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash   BLOB PRIMARY KEY,
    family_id    TEXT NOT NULL,
    client_id    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    scope        TEXT NOT NULL,
    patient      TEXT,
    auth_time_ms INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    used         INTEGER NOT NULL DEFAULT 0,
    revoked      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_session ON refresh_tokens (session_id);
-- Access tokens issued to users, so a family or a session can revoke them.
CREATE TABLE IF NOT EXISTS issued_tokens (
    jti        TEXT PRIMARY KEY,
    family_id  TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS issued_tokens_family ON issued_tokens (family_id);
CREATE INDEX IF NOT EXISTS issued_tokens_session ON issued_tokens (session_id);
-- Revoked access-token ids until they expire; seq lets every process pick up new ones.
CREATE TABLE IF NOT EXISTS revoked_jtis (
    seq        INTEGER PRIMARY KEY,
    jti        TEXT NOT NULL UNIQUE,
    expires_ms INTEGER NOT NULL
);
"""

# -- access control: break-the-glass grants and their review (see services/break_glass.py) --
BREAK_GLASS_SCHEMA = """
CREATE TABLE IF NOT EXISTS break_glass (
    grant_id   TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    patient_id TEXT NOT NULL,   -- a resource id: routing data, like the resources table's ids
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    status     TEXT NOT NULL,   -- open | closed
    key_id     TEXT NOT NULL,
    blob       BLOB NOT NULL    -- AEAD: reason, purpose of use, review decision and note
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS break_glass_user ON break_glass (tenant, user_id, expires_ms);
CREATE INDEX IF NOT EXISTS break_glass_status ON break_glass (tenant, status, created_ms);
"""


# Several server processes on one data directory (serve --workers N), schema version 4:
# - index_dirty.flushed: the tags search_tags held for the resource when it became dirty (NULL: unknown,
#   from an older release), so whichever process flushes the index knows what to remove;
# - coherence_log: what a write changed that other processes cache (services/coherence.py), numbered
#   in commit order (seq is assigned under the write lock).
MULTI_PROCESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS coherence_log (
    seq  INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS coherence_log_seq ON coherence_log (seq);
"""


# Compliance registers (services/registers.py), schema version 5: incidents and data-subject requests.
# Routing columns in clear (kind, status, deadline) for listing and overdue checks; the details, which may
# name a person, sealed with the tenant data key in ``blob``.
REGISTERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS register_entries (
    tenant     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    entry_id   TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    status     TEXT NOT NULL,
    due_ms     INTEGER,
    key_id     TEXT NOT NULL,
    blob       BLOB NOT NULL,
    PRIMARY KEY (tenant, kind, entry_id)
);
CREATE INDEX IF NOT EXISTS register_entries_created ON register_entries (tenant, kind, created_ms);
"""

# Subscriptions (services/subscriptions.py): ``subscription_changes`` is the outbox of committed resource
# writes (one row per write, in the write's own transaction, only while the tenant has subscriptions);
# ``subscription_deliveries`` the notifications still to send. Routing data only: resource ids and
# versions, never content (read and re-authorised when sent).
SUBSCRIPTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscription_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant     TEXT NOT NULL,
    type       TEXT NOT NULL,
    rid        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subscription_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant          TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    kind            TEXT NOT NULL,
    type            TEXT NOT NULL,
    rid             TEXT NOT NULL,
    version         INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    due_ms          INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS subscription_deliveries_due ON subscription_deliveries (due_ms, id);
"""
