"""Backup manifests: what a backup holds, signed, with its keys wrapped by the root key.

A manifest is one JSON object on the target at ``manifests/<backup id>.json``::

    format, version, backup_id, instance_id, created_ms, snapshot_ms, size, files_count,
    root_key_id, wrapped_backup_key, wrapped_signing_seed, public_key,
    body        -- sealed (zstd + AES-GCM under the backup key): files, chunk hashes, watermarks
    signature   -- Ed25519 over every other field (sorted-key JSON)

Only non-sensitive figures are in clear (times, sizes, ids), so ``backup list``
works without keys. The backup key and the signing seed are wrapped by the
deployment's root key with the instance id as associated data: whoever holds
the root key (e.g. from the recovery material) can restore from the target
alone, and a manifest of another deployment (or with an edited instance id)
does not unwrap. The signature is checked with the public key derived from the
unwrapped seed, which only a root-key holder could have produced.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault.backup.objects import ObjectError, open_sealed, seal
from fhirvault.ports import RootKeyProvider
from fhirvault.services.crypto import DecryptionError, associated_data, derive_key

FORMAT = "fhirvault-backup-manifest"
VERSION = 1
CHAINED_VERSION = 2  # a backup with change-feed deltas (backup/chain.py): releases before it refuse it cleanly
MANIFEST_PREFIX = "manifests/"
CHUNK_PREFIX = "chunks/"


class ManifestError(Exception):
    """A manifest is malformed, foreign, or fails its signature."""


class ForeignBackup(ManifestError):
    """The backup belongs to another deployment (or to a root key we do not have)."""


def manifest_key(backup_id: str) -> str:
    return f"{MANIFEST_PREFIX}{backup_id}.json"


def chunk_key(chunk_id: str) -> str:
    return f"{CHUNK_PREFIX}{chunk_id[:2]}/{chunk_id}"


@dataclass(frozen=True)
class BackupKeys:
    """The keys of one deployment's backups, all from the 32-byte backup secret."""

    backup_key: bytes
    signing_seed: bytes

    @property
    def seal_key(self) -> bytes:
        return derive_key(self.backup_key, "backup-seal")

    @property
    def chunk_id_key(self) -> bytes:
        return derive_key(self.backup_key, "backup-chunk-id")

    def chunk_id(self, data: bytes) -> str:
        # Keyed, so an id on the target does not confirm a guess of the plaintext.
        return hmac.new(self.chunk_id_key, data, hashlib.sha256).hexdigest()

    @property
    def signer(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing_seed)

    @property
    def public_key_hex(self) -> str:
        return self.signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass
class FileEntry:
    name: str
    kind: str  # "sqlite" or "file"; "delta": a change-feed segment applied on restore (backup/chain.py)
    size: int
    sha256: str
    chunks: list[str]


@dataclass
class ManifestBody:
    files: list[FileEntry]
    chunk_sha256: dict[str, str]  # chunk id -> SHA-256 of the stored (sealed) object
    watermarks: dict[str, dict[str, int]]
    chunk_size: int
    uploaded_chunks: int = 0
    uploaded_bytes: int = 0
    # chunk id -> until when its stored object is under object lock (absent: no lock asked)
    chunk_retain: dict[str, int] = field(default_factory=dict)
    chain: dict[str, Any] | None = None  # backup/chain.py: the feed position for the next delta

    def to_json(self) -> bytes:
        return orjson.dumps({"chain": self.chain,
            "files": [f.__dict__ for f in self.files], "chunk_sha256": self.chunk_sha256,
            "watermarks": self.watermarks, "chunk_size": self.chunk_size,
            "uploaded_chunks": self.uploaded_chunks, "uploaded_bytes": self.uploaded_bytes,
            "chunk_retain": self.chunk_retain,
        })

    @classmethod
    def from_json(cls, raw: bytes) -> ManifestBody:
        doc = orjson.loads(raw)
        return cls([FileEntry(**f) for f in doc["files"]], dict(doc["chunk_sha256"]), doc["watermarks"],
                   int(doc["chunk_size"]), int(doc["uploaded_chunks"]), int(doc["uploaded_bytes"]),
                   {k: int(v) for k, v in doc.get("chunk_retain", {}).items()}, doc.get("chain"))


@dataclass
class Manifest:
    """The clear part of a manifest (enough to list it) and its raw document."""

    backup_id: str
    instance_id: str
    created_ms: int
    snapshot_ms: int
    size: int
    files_count: int
    doc: dict[str, Any] = field(repr=False)


def _key_aad(kind: str, instance_id: str) -> bytes:
    return associated_data("backup-manifest-key", kind, instance_id)


def _signed_bytes(doc: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in doc.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)


def build_manifest(backup_id: str, instance_id: str, created_ms: int, snapshot_ms: int, body: ManifestBody,
                   keys: BackupKeys, root: RootKeyProvider) -> bytes:
    root_id, wrapped_key = root.wrap(keys.backup_key, _key_aad("backup", instance_id))
    root_id2, wrapped_seed = root.wrap(keys.signing_seed, _key_aad("signing", instance_id))
    assert root_id == root_id2
    version = CHAINED_VERSION if any(f.kind == "delta" for f in body.files) else VERSION
    doc: dict[str, Any] = {
        "format": FORMAT, "version": version, "backup_id": backup_id, "instance_id": instance_id,
        "created_ms": created_ms, "snapshot_ms": snapshot_ms,
        "size": sum(f.size for f in body.files), "files_count": len(body.files),
        "root_key_id": root_id, "wrapped_backup_key": wrapped_key.hex(), "wrapped_signing_seed": wrapped_seed.hex(),
        "public_key": keys.public_key_hex,
        "body": seal(keys.seal_key, "manifest", backup_id, body.to_json()).hex(),
    }
    doc["signature"] = keys.signer.sign(_signed_bytes(doc)).hex()
    return orjson.dumps(doc)


def parse_manifest(raw: bytes, key: str) -> Manifest:
    """The clear header; raises ``ManifestError`` on anything malformed."""
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a fhirvault backup manifest")
        if doc.get("version") not in (VERSION, CHAINED_VERSION):
            raise ValueError(f"manifest version {doc.get('version')} is not supported by this release")
        m = Manifest(str(doc["backup_id"]), str(doc["instance_id"]), int(doc["created_ms"]),
                     int(doc["snapshot_ms"]), int(doc["size"]), int(doc["files_count"]), doc)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{key}: {exc}") from None
    if manifest_key(m.backup_id) != key:
        raise ManifestError(f"{key}: names backup {m.backup_id} (moved or renamed manifest)")
    return m


def open_manifest(m: Manifest, root: RootKeyProvider) -> tuple[BackupKeys, ManifestBody]:
    """Unwrap the keys, check the signature, decrypt the body."""
    doc = m.doc
    try:
        backup_key = root.unwrap(doc["root_key_id"], bytes.fromhex(doc["wrapped_backup_key"]),
                                 _key_aad("backup", m.instance_id))
        seed = root.unwrap(doc["root_key_id"], bytes.fromhex(doc["wrapped_signing_seed"]),
                           _key_aad("signing", m.instance_id))
    except (DecryptionError, KeyError, ValueError, TypeError):
        raise ForeignBackup(
            f"backup {m.backup_id} was not made with this root key: it belongs to another deployment "
            f"(instance {m.instance_id}) or its root key is not in the key file / recovery material") from None
    keys = BackupKeys(backup_key, seed)
    try:
        if doc.get("public_key") != keys.public_key_hex:
            raise InvalidSignature
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys.public_key_hex)).verify(
            bytes.fromhex(str(doc.get("signature", ""))), _signed_bytes(doc))
    except (InvalidSignature, ValueError):
        raise ManifestError(f"backup {m.backup_id}: the manifest signature does not verify (modified manifest)") from None
    try:
        body = ManifestBody.from_json(open_sealed(keys.seal_key, "manifest", m.backup_id, bytes.fromhex(doc["body"])))
    except (ObjectError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"backup {m.backup_id}: the manifest body is unreadable: {exc}") from None
    return keys, body
