"""The reversibility archive: a whole tenant in open formats, signed, and importable elsewhere.

``fhirvault archive export`` writes a directory (layout and formats in docs/reversibility.md and in
the README.md written inside it): every version of every resource as FHIR NDJSON (deletions in their
own NDJSON), the audit trail (each entry's sealed row, so anyone can rebuild the Merkle tree and check
the signed checkpoints, and its decrypted record, readable), checkpoints, witness log, users and
clients without secrets, the configuration without secrets, and ``manifest.json`` listing every file
with its SHA-256 and line count, signed with Ed25519 (``manifest.sig``; public key in
``signing-key.pub``). The signing key is the deployment's archive key, a service secret (random,
wrapped by the root key, in the database): the same public key signs every archive of a deployment,
so a recipient pins its fingerprint once, out of band.

The archive is plaintext by nature (restitution of the data): it is written only where the operator
says, into a new directory readable by the operator alone.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault import __version__
from fhirvault.domain.compartment import patient_of
from fhirvault.domain.instants import instant, parse_fhir_datetime
from fhirvault.ports import (
    AuditCheckpoint,
    AuditRow,
    HistoryQuery,
    ResourceStore,
    StoredVersion,
    WriteTx,
)
from fhirvault.services.archive_readme import README
from fhirvault.services.audit_checkpoints import CheckpointVerifier, WitnessedCheckpoint
from fhirvault.services.audit_verify import VerifyReport, verify_log
from fhirvault.services.bulk_import import FileIndex, data_keys
from fhirvault.services.crypto import DecryptionError, associated_data
from fhirvault.services.keys import TENANT_COMPARTMENT, KeyError_, patient_compartment
from fhirvault.services.repository import resource_aad

FORMAT = "fhirvault-archive/1"
SIGNING_SECRET = "archive-signing"  # noqa: S105 - the name of a service secret, not a secret
_MANIFEST_PREFIX = b"fhirvault-archive-manifest-v1\n"  # domain separation: only manifests are signed
_PAGE = 2_000
_SECRET_WORDS = ("secret", "password", "credential", "private", "passphrase")
MANIFEST, SIGNATURE, PUBLIC_KEY = "manifest.json", "manifest.sig", "signing-key.pub"


class ArchiveError(Exception):
    """The archive cannot be written, read or trusted (one line for the operator)."""


def fingerprint(public_key: bytes) -> str:
    """SHA-256 of the raw Ed25519 public key, hex in groups of four (compared out of band)."""
    digest = hashlib.sha256(public_key).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def _redact(value: Any, name: str = "") -> Any:
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "(redacted)"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _redact(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [_redact(v, name) for v in value]
    if isinstance(value, bytes | bytearray):
        return "(redacted)"  # settings hold key material as bytes, never anything else
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://(redacted)@{rest.split('@', 1)[1]}"  # a URL's user:password
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class _Files:
    """Files of the archive being written, each hashed and counted as it is written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: list[dict[str, Any]] = []
        self._open: dict[str, tuple[BinaryIO, Any, list[int]]] = {}

    def line(self, path: str, doc: Any) -> None:
        f = self._open.get(path)
        if f is None:
            target = self.root / path
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            f = self._open[path] = (os.fdopen(fd, "wb"), hashlib.sha256(), [0, 0])
        data = orjson.dumps(doc) + b"\n"
        f[0].write(data)
        f[1].update(data)
        f[2][0] += 1
        f[2][1] += len(data)

    def whole(self, path: str, data: bytes, count: int | None = None) -> None:
        target = self.root / path
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.entries.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                             **({"count": count} if count is not None else {})})

    def close(self) -> None:
        for path, (f, digest, (count, size)) in sorted(self._open.items()):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self.entries.append({"path": path, "sha256": digest.hexdigest(), "bytes": size, "count": count})
        self._open.clear()


@dataclass
class ExportResult:
    path: Path
    resources: int
    versions: int
    audit_entries: int
    fingerprint: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


def _all_versions(store: ResourceStore, tenant: str) -> Iterator[StoredVersion]:
    """Every version of every resource, newest first (the store's history order)."""
    before: int | None = None
    while True:
        page = store.history(HistoryQuery(tenant, before_seq=before, limit=_PAGE))
        yield from page
        if len(page) < _PAGE:
            return
        before = page[-1].seq


def _audit_rows(store: ResourceStore) -> Iterator[AuditRow]:
    after = 0
    while rows := store.audit_rows(after_seq=after, limit=_PAGE):
        yield from rows
        after = rows[-1].seq


def _checkpoint_doc(cp: AuditCheckpoint) -> dict[str, Any]:
    return {"size": cp.size, "ts_ms": cp.ts_ms, "root": cp.root.hex(), "key_id": cp.key_id,
            "signature": base64.b64encode(cp.signature).decode(), "witnessed": cp.witnessed,
            "proof_from": cp.proof_from, "proof": base64.b64encode(cp.proof).decode()}


def _checkpoint(doc: dict[str, Any]) -> AuditCheckpoint:
    return AuditCheckpoint(int(doc["size"]), int(doc["ts_ms"]), bytes.fromhex(doc["root"]), str(doc["key_id"]),
                           base64.b64decode(doc["signature"]), bool(doc["witnessed"]), int(doc["proof_from"]),
                           base64.b64decode(doc["proof"]))


def export_archive(container: Any, target: Path) -> ExportResult:
    """Write the tenant of ``container`` (a built Container) into the new directory ``target``."""
    started = time.perf_counter()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ArchiveError(f"{target} exists and is not an empty directory: choose a new one")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    settings, store, repo = container.settings, container.store, container.repository
    tenant = settings.tenant
    files = _Files(target)
    counts: dict[str, int] = {}  # resources (every id, deleted ones too) by type
    seen: set[tuple[str, str]] = set()
    versions = 0
    for v in _all_versions(store, tenant):
        versions += 1
        if (v.type, v.id) not in seen:
            seen.add((v.type, v.id))
            counts[v.type] = counts.get(v.type, 0) + 1
        if v.deleted:
            files.line(f"resources/{v.type}.deleted.ndjson", {
                "resourceType": v.type, "id": v.id, "versionId": str(v.version),
                "lastUpdated": instant(v.last_updated_ms)})
            continue
        files.line(f"resources/{v.type}.ndjson", orjson.Fragment(repo.open_version(v)))
    trail = container.audit
    entries = 0
    for row in _audit_rows(store):
        entries += 1
        record = trail.decrypt(row.seq, row.ts_ms, row.blob) if row.tenant == tenant else None
        files.line("audit/entries.ndjson", {"seq": row.seq, "tenant": row.tenant, "ts_ms": row.ts_ms,
                                            "tags": row.tags.hex(), "sealed": base64.b64encode(row.blob).decode(),
                                            "record": record})
    # Only what the exported entries cover (a server still running may sign more meanwhile).
    for cp in _checkpoints(store):
        if cp.size <= entries:
            files.line("audit/checkpoints.ndjson", _checkpoint_doc(cp))
    from fhirvault.adapters.witness import open_witness

    for n, spec in enumerate(settings.audit_witness_specs):
        held = open_witness(spec).read()
        for w in held or []:
            if w.size <= entries:
                files.line(f"audit/witness-{n}.ndjson", orjson.Fragment(w.to_json()))
    signer = container.audit_signer
    files.whole("audit/log-key.json", orjson.dumps({
        "origin": signer.origin, "algorithm": "Ed25519", "public_key": base64.b64encode(signer.public_key).decode(),
        "key_id": signer.key_id, "witnesses": [_redact(s, "witness") for s in settings.audit_witness_specs]},
        option=orjson.OPT_INDENT_2))
    for u in store.users(tenant):
        files.line("identity/users.ndjson", {
            "user_id": u.user_id, "username": u.username, "role": u.role, "fhir_user": u.fhir_user,
            "organization": u.organization, "clearances": u.clearances.split(), "disabled": u.disabled,
            "mfa_enrolled": u.totp is not None, "created": instant(u.created_ms)})
    for c in store.clients(tenant):
        files.line("identity/clients.ndjson", {
            "client_id": c.client_id, "name": c.name, "scopes": c.scopes.split(),
            "jwks": orjson.loads(c.jwks) if c.jwks else None, "disabled": c.disabled,
            "allowed_sources": c.allowed_sources.split() if c.allowed_sources else None,
            "created": instant(c.created_ms)})
    files.whole("config.json", orjson.dumps(_redact(settings), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    files.close()
    files.whole("README.md", README.encode())
    key = Ed25519PrivateKey.from_private_bytes(container.secrets.get(SIGNING_SECRET))
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    manifest = {
        "format": FORMAT, "created": instant(container.clock.now_ms()), "fhirvault": __version__,
        "tenant": tenant, "instance": signer.origin,
        "counts": {"resources": sum(counts.values()), "versions": versions, "audit_entries": entries,
                   "by_type": dict(sorted(counts.items()))},
        "signing_key": {"algorithm": "Ed25519", "public_key": base64.b64encode(public).decode(),
                        "fingerprint": fingerprint(public)},
        "files": sorted(files.entries, key=lambda e: e["path"]),
    }
    body = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
    (target / PUBLIC_KEY).write_text(base64.b64encode(public).decode() + "\n")
    (target / MANIFEST).write_bytes(body)
    (target / SIGNATURE).write_text(base64.b64encode(key.sign(_MANIFEST_PREFIX + body)).decode() + "\n")
    for path in (PUBLIC_KEY, MANIFEST, SIGNATURE):
        (target / path).chmod(0o600)
    return ExportResult(target, sum(counts.values()), versions, entries, fingerprint(public),
                        time.perf_counter() - started, counts)


def _checkpoints(store: ResourceStore) -> list[AuditCheckpoint]:
    out: list[AuditCheckpoint] = []
    after = 0
    while batch := store.audit_checkpoints(after_size=after, limit=10_000):
        out += batch
        after = batch[-1].size
    return out


# -- reading and verifying ----------------------------------------------------------
class _Source:
    """The files of an archive: a directory, or (a sealed audit segment) a dict opened in memory."""

    def __init__(self, root: Path | None = None, files: dict[str, bytes] | None = None) -> None:
        self._root = root
        self._files = files

    def names(self) -> set[str]:
        if self._files is not None:
            return set(self._files)
        assert self._root is not None
        return {p.relative_to(self._root).as_posix() for p in self._root.rglob("*") if p.is_file()}

    def read(self, rel: str) -> bytes | None:
        if self._files is not None:
            return self._files.get(rel)
        assert self._root is not None
        path = self._root / rel
        if not path.resolve().is_relative_to(self._root.resolve()) or not path.is_file():
            return None
        return path.read_bytes()

    def digest(self, rel: str) -> tuple[str, int] | None:
        """(SHA-256 hex, newline count) of a file, read in chunks from a directory."""
        if self._files is not None:
            data = self._files.get(rel)
            return None if data is None else (hashlib.sha256(data).hexdigest(), data.count(b"\n"))
        assert self._root is not None
        path = self._root / rel
        if not path.resolve().is_relative_to(self._root.resolve()) or not path.is_file():
            return None
        digest, lines = hashlib.sha256(), 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                lines += chunk.count(b"\n")
        return digest.hexdigest(), lines

    def lines(self, rel: str) -> list[dict[str, Any]]:
        data = self.read(rel)
        return [orjson.loads(raw) for raw in (data or b"").splitlines() if raw.strip()]


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                yield orjson.loads(raw)


class _ArchivedLog:
    """The archive's audit files, read as the part of a store ``verify_log`` needs."""

    def __init__(self, source: _Source) -> None:
        self._rows = [AuditRow(int(d["seq"]), str(d["tenant"]), int(d["ts_ms"]), bytes.fromhex(d["tags"]),
                               base64.b64decode(d["sealed"])) for d in source.lines("audit/entries.ndjson")]
        self._checkpoints = [_checkpoint(d) for d in source.lines("audit/checkpoints.ndjson")]

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        return [r for r in self._rows if r.seq > after_seq][:limit]

    def audit_checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        return [c for c in self._checkpoints if c.size > after_size][:limit]


@dataclass
class ArchiveReport:
    ok: bool
    problems: list[str]
    fingerprint: str
    manifest_sha256: str
    audit: VerifyReport | None
    manifest: dict[str, Any]


def verify_archive(root: Path, expected_fingerprint: str | None = None, *, audit_only: bool = False) -> ArchiveReport:
    """Signature, every file's hash and count, and the audit trail's Merkle tree against its checkpoints
    and witness copies (signed by the deployment's audit key, whose public half is in the archive).

    ``audit_only``: a historical audit segment (the signed manifest and ``audit/`` only): the other
    files the manifest lists are not expected."""
    return _verify(_Source(root=root), expected_fingerprint, audit_only=audit_only)


def _verify(source: _Source, expected_fingerprint: str | None, *, audit_only: bool) -> ArchiveReport:
    problems: list[str] = []
    try:
        body = source.read(MANIFEST) or b""
        signature = base64.b64decode((source.read(SIGNATURE) or b"").strip())
        manifest = orjson.loads(body)
        public = base64.b64decode(manifest["signing_key"]["public_key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"not a readable fhirvault archive: {type(exc).__name__}") from None
    fp = fingerprint(public)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _MANIFEST_PREFIX + body)
    except (InvalidSignature, ValueError):
        problems.append("the manifest's signature does not verify: it was altered or signed by another key")
    if expected_fingerprint is not None and expected_fingerprint.lower().replace(":", "") != fp.replace(":", ""):
        problems.append("the signing key is not the expected one (fingerprint differs)")
    listed = set()
    for entry in manifest.get("files", []):
        listed.add(entry["path"])
        if audit_only and not entry["path"].startswith("audit/"):
            continue
        found = source.digest(entry["path"])
        if found is None:
            problems.append(f"{entry['path']}: missing")
        elif found[0] != entry["sha256"]:
            problems.append(f"{entry['path']}: SHA-256 differs from the manifest (altered)")
        elif "count" in entry and entry["count"] != found[1]:
            problems.append(f"{entry['path']}: {found[1]} lines, the manifest says {entry['count']}")
    for rel in sorted(source.names() - listed - {MANIFEST, SIGNATURE, PUBLIC_KEY}):
        problems.append(f"{rel}: not listed in the manifest")
    audit: VerifyReport | None = None
    if not problems:
        audit = _verify_audit(source)
        problems += [f"audit trail: {p}" for p in audit.problems]
    return ArchiveReport(not problems, problems, fp, hashlib.sha256(body).hexdigest(), audit, manifest)


def _verify_audit(source: _Source) -> VerifyReport:
    key = orjson.loads(source.read("audit/log-key.json") or b"{}")
    verifier = CheckpointVerifier(str(key["origin"]), base64.b64decode(key["public_key"]))
    witnesses: list[tuple[str, list[WitnessedCheckpoint]]] = []
    for rel in sorted(n for n in source.names() if n.startswith("audit/witness-") and n.endswith(".ndjson")):
        held = [WitnessedCheckpoint.from_json(orjson.dumps(d)) for d in source.lines(rel)]
        witnesses.append((rel.removeprefix("audit/"), held))
    return verify_log(cast(ResourceStore, _ArchivedLog(source)), None, verifier, witnesses)


# -- import into a fresh instance -----------------------------------------------------
@dataclass
class ImportResult:
    resources: int
    versions: int
    users: int
    clients: int
    seconds: float
    manifest_sha256: str


def _versions_of(root: Path, manifest: dict[str, Any]) -> dict[tuple[str, str], list[tuple[int, int, bytes | None]]]:
    """(type, id) -> [(version, lastUpdated ms, JSON or None for a deletion)], oldest first."""
    out: dict[tuple[str, str], list[tuple[int, int, bytes | None]]] = {}
    for entry in manifest["files"]:
        path: str = entry["path"]
        if not path.startswith("resources/"):
            continue
        deleted = path.endswith(".deleted.ndjson")
        with (root / path).open("rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                doc = orjson.loads(raw)
                if deleted:
                    version, updated, body = int(doc["versionId"]), doc["lastUpdated"], None
                else:
                    version, updated, body = int(doc["meta"]["versionId"]), doc["meta"]["lastUpdated"], raw.strip()
                ms = parse_fhir_datetime(updated)
                if ms is None:
                    raise ArchiveError(f"{path}: a malformed lastUpdated")
                out.setdefault((doc["resourceType"], doc["id"]), []).append((version, ms, body))
    for history in out.values():
        history.sort()
    return out


def import_archive(container: Any, root: Path, *, expected_fingerprint: str | None = None) -> ImportResult:
    """Load a verified archive into a fresh instance: every version with its version id and lastUpdated,
    re-encrypted under this instance's keys and indexed; users and clients without credentials. The old
    audit trail is kept, verified, sealed under this instance's keys in ``DATA_DIR/archived-audit/``;
    this instance's own log records the import with that hash."""
    started = time.perf_counter()
    report = verify_archive(root, expected_fingerprint)
    if not report.ok:
        raise ArchiveError("the archive does not verify: " + report.problems[0])
    store, keys = container.store, container.keys
    tenant = container.settings.tenant
    if store.history(HistoryQuery(tenant, limit=1)):
        raise ArchiveError("this instance already holds resources: import into a fresh data directory")
    histories = _versions_of(root, report.manifest)
    index = FileIndex(keys)  # remembered tags, for this import only
    batch: list[tuple[str, str, list[tuple[int, int, bytes | None]]]] = []
    versions = resources = 0

    def flush() -> None:
        prepared = []
        docs = {(rtype, rid, version): orjson.loads(body) for rtype, rid, history in batch
                for version, _ms, body in history if body is not None}
        compartment_of = {}
        for (rtype, rid, version), doc in docs.items():
            pid = patient_of(rtype, doc)
            compartment_of[(rtype, rid, version)] = patient_compartment(pid) if pid else TENANT_COMPARTMENT
        found = data_keys(store, keys, set(compartment_of.values()))
        for rtype, rid, history in batch:
            rows = []
            tags: list[bytes] = []
            for version, ms, body in history:
                if body is None:
                    rows.append(StoredVersion(rtype, rid, version, ms, True, "", b""))
                    continue
                key = found[compartment_of[(rtype, rid, version)]]
                rows.append(StoredVersion(rtype, rid, version, ms, False, key.key_id,
                                          key.aead.seal(body, resource_aad(tenant, rtype, rid, version, key.key_id))))
            last = history[-1]
            if last[2] is not None:  # only the current version is searched
                tags = index.resource_tags(rtype, docs[(rtype, rid, last[0])])
            prepared.append((rtype, rid, rows, tags))

        def job(tx: WriteTx) -> None:
            for rtype, rid, rows, tags in prepared:
                for row in rows:
                    tx.insert_version(tenant, row)
                tx.set_search_tags(tenant, rtype, rid, tags)

        store.write_sync("archive.import", job)
        batch.clear()

    for (rtype, rid), history in sorted(histories.items()):
        batch.append((rtype, rid, history))
        versions += len(history)
        resources += 1
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    users, clients = _import_identity(container, root)
    _keep_audit_segment(container, root, report.manifest_sha256)
    audit_report = report.audit
    assert audit_report is not None
    detail = (f"archive imported: manifest sha256={report.manifest_sha256} signed by {report.fingerprint}; "
              f"{resources} resources, {versions} versions; previous audit trail of {audit_report.tree_size} "
              f"entries, root {audit_report.root.hex()}, kept sealed in archived-audit/")
    container.audit.record_system_event(store, container.clock, "archive-import", detail)
    return ImportResult(resources, versions, users, clients, time.perf_counter() - started, report.manifest_sha256)


def _import_identity(container: Any, root: Path) -> tuple[int, int]:
    """Users (no password, no MFA: they set them again) and clients (no secret: re-issued) of the archive."""
    from fhirvault.ports import ClientRow, UserRow

    store, tenant = container.store, container.settings.tenant
    users: list[UserRow] = []
    path = root / "identity/users.ndjson"
    for d in _lines(path) if path.exists() else []:
        if store.user(d["user_id"]) is None and store.user_by_username(tenant, d["username"]) is None:
            users.append(UserRow(d["user_id"], tenant, d["username"], None, d["role"], d["fhir_user"],
                                 d["organization"], " ".join(d["clearances"]), None, 0, bool(d["disabled"]), 0, 0,
                                 parse_fhir_datetime(d["created"]) or 0))
    clients: list[ClientRow] = []
    path = root / "identity/clients.ndjson"
    for d in _lines(path) if path.exists() else []:
        if store.client(d["client_id"]) is None:
            clients.append(ClientRow(d["client_id"], tenant, d["name"], None, " ".join(d["scopes"]),
                                     orjson.dumps(d["jwks"]).decode() if d["jwks"] else None,
                                     parse_fhir_datetime(d["created"]) or 0, bool(d["disabled"]),
                                     " ".join(d["allowed_sources"]) if d["allowed_sources"] else None))

    def job(tx: WriteTx) -> None:
        for u in users:
            tx.insert_user(u)
        for c in clients:
            tx.insert_client(c)

    store.write_sync("archive.identity", job)
    return len(users), len(clients)


SEGMENT_COMPARTMENT = "archived-audit"  # the tenant data key sealing imported audit segments


def _segment_aad(tenant: str, manifest_sha: str, key_id: str) -> bytes:
    return associated_data("archived-audit", tenant, manifest_sha, key_id)


def _keep_audit_segment(container: Any, root: Path, manifest_sha: str) -> Path:
    """The old trail as archived (with the signed manifest vouching for its hashes), sealed under this
    instance's keys in ``DATA_DIR/archived-audit/<manifest sha256>.sealed``: its decrypted records name
    patients, so they are not kept in clear in the data directory."""
    files = {name: (root / name).read_bytes() for name in (MANIFEST, SIGNATURE, PUBLIC_KEY)}
    for path in sorted((root / "audit").iterdir()):
        files[f"audit/{path.name}"] = path.read_bytes()
    key = container.keys.for_compartment_sync(SEGMENT_COMPARTMENT)
    plaintext = orjson.dumps({name: base64.b64encode(data).decode() for name, data in files.items()})
    blob = key.aead.seal(plaintext, _segment_aad(container.settings.tenant, manifest_sha, key.key_id))
    folder: Path = container.settings.data_dir / "archived-audit"
    folder.mkdir(mode=0o700, exist_ok=True)
    target = folder / f"{manifest_sha}.sealed"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(key.key_id.encode() + b"\0" + blob)
        f.flush()
        os.fsync(f.fileno())
    return target


def verify_segments(container: Any) -> list[tuple[str, ArchiveReport]]:
    """Open and verify every audit segment an archive import kept (signature, audit files, Merkle tree)."""
    folder = container.settings.data_dir / "archived-audit"
    out = []
    for path in sorted(folder.glob("*.sealed")) if folder.is_dir() else []:
        manifest_sha = path.name.removesuffix(".sealed")
        key_id, _, blob = path.read_bytes().partition(b"\0")
        try:
            key = container.keys.by_id(key_id.decode())
            plaintext = key.aead.open(blob, _segment_aad(container.settings.tenant, manifest_sha, key.key_id))
        except (DecryptionError, KeyError_, UnicodeDecodeError):
            raise ArchiveError(f"audit segment {manifest_sha[:16]}… does not open: altered or its key is gone") from None
        files = {name: base64.b64decode(data) for name, data in orjson.loads(plaintext).items()}
        report = _verify(_Source(files=files), None, audit_only=True)
        if report.manifest_sha256 != manifest_sha:
            report.ok = False
            report.problems.insert(0, "the segment's manifest is not the one its name records")
        out.append((manifest_sha, report))
    return out


def record_export(container: Any, actor: str | None) -> None:
    """The export is an audited system event (the whole tenant leaves the server), recorded before the
    export starts so the archive's own trail holds it."""
    container.audit.record_system_event(container.store, container.clock, "archive-export",
                                        "reversibility archive export (plaintext, to a directory the operator named)",
                                        actor=actor)


__all__ = ["ArchiveError", "export_archive", "import_archive", "verify_archive"]
