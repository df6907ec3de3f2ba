"""The README.md written inside every reversibility archive (what a recipient reads first)."""

README = """\
# fhirvault reversibility archive (format fhirvault-archive/1)

This directory is the complete restitution of one tenant of a fhirvault server, in open formats.
It is NOT encrypted: it holds health data. Keep it on encrypted storage, hand it over securely,
and delete it when it is no longer needed.

## Trust: check it first

1. `manifest.json` lists every other file with its SHA-256, size and line count.
2. `manifest.sig` is the Ed25519 signature (base64) of the bytes
   `fhirvault-archive-manifest-v1\\n` followed by the bytes of `manifest.json`.
3. `signing-key.pub` (base64 of the raw 32-byte Ed25519 public key) is the deployment's archive key;
   `manifest.json` repeats it with its fingerprint (SHA-256 of the raw key, hex). Compare that
   fingerprint with the one the sending operator gives you through another channel (phone, letter).
4. `fhirvault archive verify DIR --fingerprint FP` checks all of this, and the audit trail below.
   Without fhirvault: any Ed25519 library and `sha256sum` do the same.

## Resources

- `resources/<Type>.ndjson`: every version of every resource of that type, one FHIR R4 JSON
  resource per line, newest first, with its original `id`, `meta.versionId` and `meta.lastUpdated`.
- `resources/<Type>.deleted.ndjson`: deletions, one per line:
  `{"resourceType", "id", "versionId", "lastUpdated"}` (the version the deletion created).
- Consents are the `Consent` resources (`resources/Consent.ndjson`).

## Audit trail

- `audit/entries.ndjson`: every entry of the tamper-evident log, in order: `seq`, `tenant`, `ts_ms`
  (ms since 1970 UTC), `tags` (hex: blind-index tags), `sealed` (base64: the entry as stored,
  encrypted) and `record` (the decrypted entry: who, what, which patient, outcome, when; null for
  another tenant's entries). The Merkle tree (RFC 9162 style) is built over the leaves
  `"fhirvault-audit-v1\\0" || u64 seq || u64 ts_ms || u16 len(tenant) || tenant || u32 len(tags)
  || tags || sealed` (big-endian), hashed with SHA-256 as RFC 9162 leaves.
- `audit/checkpoints.ndjson`: signed tree heads: `size`, `ts_ms`, `root` (hex), `key_id`, `signature`
  (base64, Ed25519 over `origin\\nsize\\nbase64(root)\\nts_ms\\n`), `witnessed`, `proof_from`, `proof`
  (base64 concatenated consistency-proof hashes from `proof_from`).
- `audit/witness-N.ndjson`: the checkpoints held by each configured witness (same fields, JSON).
- `audit/log-key.json`: the log's origin and public key (Ed25519, base64).

## Identity and configuration

- `identity/users.ndjson`: accounts (id, username, role, fhirUser, organisation, clearances,
  disabled, whether MFA was enrolled, created). No password hashes, no TOTP secrets.
- `identity/clients.ndjson`: OAuth clients (id, name, scopes, public JWK Set, disabled, allowed
  sources, created). No client secrets.
- `config.json`: the server's settings; every secret-looking value is `(redacted)`.

## Importing

`fhirvault archive import DIR --data-dir NEW` loads it into a fresh fhirvault: every version keeps its
version id and lastUpdated; users must set a password (and MFA) again; clients get new secrets.
"""
