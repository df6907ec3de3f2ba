"""PostgreSQL schema: the SQLite tables with bytea blobs and BIGINT ms timestamps.

The audit log lives in its own schema, ``audit``, of the same database, so an
interaction and its record commit in one transaction. ``audit.audit_head`` is
the log's one-row counter: the transaction that appends takes its row lock and
keeps it until COMMIT, which makes the Merkle leaf indexes gap-free and in
commit order whatever the number of writers.

Roles: whoever runs the DDL owns the tables (the owner role, for migrations).
``APP_ROLE`` is a NOLOGIN group role with what the server needs and no more: it
may insert into the audit tables but not update, delete or truncate them. The
server should connect as a login role that is a member of it (docs/postgresql.md).
"""

from fhirvault.ports import Migration

APP_ROLE = "fhirvault_app"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_keys (
    tenant      TEXT NOT NULL,
    version     BIGINT NOT NULL,
    wrapped     BYTEA NOT NULL,
    root_key_id TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (tenant, version)
);
CREATE TABLE IF NOT EXISTS data_keys (
    key_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    lookup      BYTEA NOT NULL,
    wrapped     BYTEA NOT NULL,
    kek_version BIGINT NOT NULL,
    compartment BYTEA NOT NULL,
    created_ms  BIGINT NOT NULL,
    UNIQUE (tenant, lookup)
);
CREATE TABLE IF NOT EXISTS resource_versions (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant       TEXT NOT NULL,
    type         TEXT NOT NULL,
    id           TEXT NOT NULL,
    version      BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted      BOOLEAN NOT NULL,
    key_id       TEXT NOT NULL,
    blob         BYTEA NOT NULL,
    UNIQUE (tenant, type, id, version)
);
CREATE INDEX IF NOT EXISTS resource_versions_type_seq ON resource_versions (tenant, type, seq);
CREATE INDEX IF NOT EXISTS resource_versions_tenant_seq ON resource_versions (tenant, seq);
CREATE INDEX IF NOT EXISTS resource_versions_updated ON resource_versions (tenant, last_updated);
-- rk: assigned at creation, orders search results stably (updates do not move a resource).
CREATE TABLE IF NOT EXISTS resources_current (
    rk      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  TEXT NOT NULL,
    type    TEXT NOT NULL,
    id      TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    tags    BYTEA NOT NULL DEFAULT '\\x',  -- this resource's search tags, to remove them on change
    UNIQUE (tenant, type, id)
);
CREATE INDEX IF NOT EXISTS resources_current_type ON resources_current (tenant, type, rk) WHERE NOT deleted;
-- Blind search index, written in the resource's own transaction. (tag, rk) serves the driving
-- criterion (all rks of a tag, in order) and the per-candidate checks of the others.
CREATE TABLE IF NOT EXISTS search_tags (
    tag BYTEA NOT NULL,
    rk  BIGINT NOT NULL,
    PRIMARY KEY (tag, rk)
);
CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    secret_hash TEXT,
    scopes      TEXT NOT NULL,
    jwks        TEXT,
    created_ms  BIGINT NOT NULL,
    disabled    BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS seen_jti (
    jti        TEXT PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_jti_expires ON seen_jti (expires_ms);
"""

AUDIT_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.audit_head (
    one  BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    size BIGINT NOT NULL            -- entries appended so far: the next seq is size + 1
);
INSERT INTO audit.audit_head (one, size) VALUES (true, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS audit.audit_log (
    seq    BIGINT PRIMARY KEY,      -- leaf index + 1
    tenant TEXT NOT NULL,
    ts_ms  BIGINT NOT NULL,
    tags   BYTEA NOT NULL,
    blob   BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_tenant ON audit.audit_log (tenant, seq);
CREATE TABLE IF NOT EXISTS audit.audit_index (
    tag BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (tag, seq)
);
CREATE TABLE IF NOT EXISTS audit.audit_nodes (
    level BIGINT NOT NULL,
    idx   BIGINT NOT NULL,
    hash  BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE IF NOT EXISTS audit.audit_checkpoints (
    size       BIGINT PRIMARY KEY,
    ts_ms      BIGINT NOT NULL,
    root       BYTEA NOT NULL,
    key_id     TEXT NOT NULL,
    signature  BYTEA NOT NULL,
    witnessed  BOOLEAN NOT NULL DEFAULT false,
    proof_from BIGINT NOT NULL DEFAULT 0,
    proof      BYTEA NOT NULL DEFAULT '\\x'
);
-- Stops accidents by any role, the owner included; tampering is caught by `fhirvault audit verify`.
CREATE OR REPLACE FUNCTION audit.append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$;
DO $$
DECLARE t TEXT;
BEGIN
  FOREACH t IN ARRAY ARRAY['audit_log', 'audit_index', 'audit_checkpoints'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_append_only') THEN
      EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON audit.%I'
                     ' FOR EACH ROW EXECUTE FUNCTION audit.append_only()', t || '_append_only', t);
      EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON audit.%I'
                     ' FOR EACH STATEMENT EXECUTE FUNCTION audit.append_only()', t || '_no_truncate', t);
    END IF;
  END LOOP;
END $$;
"""

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
    totp            BYTEA,
    totp_last_step  BIGINT NOT NULL DEFAULT 0,
    disabled        BOOLEAN NOT NULL DEFAULT false,
    failures        BIGINT NOT NULL DEFAULT 0,
    locked_until_ms BIGINT NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL,
    UNIQUE (tenant, username)
);
CREATE TABLE IF NOT EXISTS federated_links (
    provider TEXT NOT NULL,
    issuer   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (provider, issuer, subject)
);
CREATE TABLE IF NOT EXISTS oauth_apps (
    client_id     TEXT PRIMARY KEY,
    redirect_uris TEXT NOT NULL,
    public        BOOLEAN NOT NULL
);
CREATE TABLE IF NOT EXISTS login_sessions (
    session_id   TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    amr          TEXT NOT NULL,
    ended_ms     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS login_sessions_user ON login_sessions (user_id) WHERE ended_ms = 0;
CREATE TABLE IF NOT EXISTS auth_codes (
    code_hash      BYTEA PRIMARY KEY,
    family_id      TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    scope          TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    nonce          TEXT,
    patient        TEXT,
    auth_time_ms   BIGINT NOT NULL,
    expires_ms     BIGINT NOT NULL,
    used           BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash   BYTEA PRIMARY KEY,
    family_id    TEXT NOT NULL,
    client_id    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    scope        TEXT NOT NULL,
    patient      TEXT,
    auth_time_ms BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    created_ms   BIGINT NOT NULL,
    used         BOOLEAN NOT NULL DEFAULT false,
    revoked      BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_session ON refresh_tokens (session_id);
CREATE TABLE IF NOT EXISTS issued_tokens (
    jti        TEXT PRIMARY KEY,
    family_id  TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS issued_tokens_family ON issued_tokens (family_id);
CREATE INDEX IF NOT EXISTS issued_tokens_session ON issued_tokens (session_id);
-- seq lets every process pick up new revocations: assigned under the audit head's lock, so in commit order.
CREATE TABLE IF NOT EXISTS revoked_jtis (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    jti        TEXT NOT NULL UNIQUE,
    expires_ms BIGINT NOT NULL
);
"""

BREAK_GLASS_SCHEMA = """
CREATE TABLE IF NOT EXISTS break_glass (
    grant_id   TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    status     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    blob       BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS break_glass_user ON break_glass (tenant, user_id, expires_ms);
CREATE INDEX IF NOT EXISTS break_glass_status ON break_glass (tenant, status, created_ms);
"""

# Cache coherence between the processes sharing the database (services/coherence.py): a write that
# changes something other processes cache adds (kind, key) rows under one new seq, assigned while the
# one-row head is locked (taken last, just before COMMIT), so seqs appear in commit order. Each process
# reads ``WHERE seq > last seen`` at the start of every authenticated request.
COHERENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS coherence_head (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    seq BIGINT NOT NULL
);
INSERT INTO coherence_head (one, seq) VALUES (true, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS coherence_log (
    seq  BIGINT NOT NULL,
    kind TEXT NOT NULL,
    key  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS coherence_log_seq ON coherence_log (seq);
"""

# Compliance registers (services/registers.py): incidents and data-subject requests; details sealed in blob.
REGISTERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS register_entries (
    tenant     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    entry_id   TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    status     TEXT NOT NULL,
    due_ms     BIGINT,
    key_id     TEXT NOT NULL,
    blob       BYTEA NOT NULL,
    PRIMARY KEY (tenant, kind, entry_id)
);
CREATE INDEX IF NOT EXISTS register_entries_created ON register_entries (tenant, kind, created_ms);
"""

# Subscriptions (services/subscriptions.py): the outbox of committed writes and the delivery queue
# (routing data only). The matcher removes outbox rows by id, so rows committing out of id order
# (several writer sessions) are never skipped.
SUBSCRIPTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscription_changes (
    id         BIGSERIAL PRIMARY KEY,
    tenant     TEXT NOT NULL,
    type       TEXT NOT NULL,
    rid        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscription_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    tenant          TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    kind            TEXT NOT NULL,
    type            TEXT NOT NULL,
    rid             TEXT NOT NULL,
    version         INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    due_ms          BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS subscription_deliveries_due ON subscription_deliveries (due_ms, id);
"""

# Numbered migrations (``meta.schema_version`` records the last applied): version 1 is what the first
# PostgreSQL release created, each later change is its own step. Every step is idempotent (IF NOT
# EXISTS), because databases made by unreleased builds may have a change without its version.
MIGRATIONS: tuple[tuple[Migration, str], ...] = (
    (Migration(1, "initial schema"), SCHEMA + AUDIT_SCHEMA + IDENTITY_SCHEMA + BREAK_GLASS_SCHEMA),
    (Migration(2, "clients.allowed_sources: CIDRs a client may call from"),
     "ALTER TABLE clients ADD COLUMN IF NOT EXISTS allowed_sources TEXT;  -- space-separated; NULL: anywhere"),
    (Migration(3, "coherence_head, coherence_log: cache coherence between processes"), COHERENCE_SCHEMA),
    (Migration(4, "register_entries: incident and data-subject request registers"), REGISTERS_SCHEMA),
    (Migration(5, "subscription_changes, subscription_deliveries: FHIR Subscription notifications"),
     SUBSCRIPTION_SCHEMA),
)
SCHEMA_VERSION = MIGRATIONS[-1][0].version
assert [m.version for m, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1)), "steps must be numbered 1..N"

# What the application role may do: everything on the main tables, append-only on the audit log.
# (Run by the owner, only when it may create roles or the role already exists.)
APP_GRANTS = f"""
GRANT USAGE ON SCHEMA public, audit TO {APP_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};
GRANT SELECT, INSERT ON audit.audit_log, audit.audit_index, audit.audit_nodes, audit.audit_checkpoints TO {APP_ROLE};
REVOKE UPDATE, DELETE, TRUNCATE ON audit.audit_log, audit.audit_index, audit.audit_nodes,
    audit.audit_checkpoints FROM {APP_ROLE};
GRANT SELECT, UPDATE ON audit.audit_head TO {APP_ROLE};
"""
