"""The erasure ledger: which data keys (and tenants) were destroyed, kept outside the backups.

A backup taken before an erasure still holds the patient's wrapped data key: restoring it would
bring the patient back. So every destroyed key id is listed here, in three places:

* the database (meta ``erasure-ledger``, written in the erasure's own transaction);
* a file in the data directory (``erasure-ledger.json``), the copy a restore writes and every
  start of a server or CLI re-applies (``services/erasure.py: apply_ledger``) before anything serves;
* every backup target (object ``erasure-ledger/<signing key>.json``), signed with the deployment's backup
  signing key (Ed25519), written by each erasure and by each backup.

A restore takes the target's ledger, checks its signature against the key the backup's manifest
names, and puts it in the restored data directory; without a ledger it fails closed (an erased
patient could come back) unless the operator explicitly accepts that (``--allow-missing-erasure-ledger``).
Ledgers only grow: each copy is the union of every copy seen (entries are never removed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault.backup.target import BackupTarget, TargetNotFound

LEDGER_FILE = "erasure-ledger.json"
LEDGER_PREFIX = "erasure-ledger/"
LEDGER_META = "erasure-ledger"
PATIENT, TENANT = "patient", "tenant"


class LedgerError(Exception):
    """The ledger is missing, unreadable or not signed by this deployment."""


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    tenant: str
    kind: str  # patient (one data key) | tenant (every key of the tenant)
    key_id: str  # the data key id ("" for a tenant purge)
    erased_ms: int

    def to_json(self) -> dict[str, object]:
        return {"tenant": self.tenant, "kind": self.kind, "key_id": self.key_id, "erased_ms": self.erased_ms}


def _entries(doc: object) -> set[Entry]:
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise LedgerError("not an erasure ledger")
    out: set[Entry] = set()
    for e in doc["entries"]:
        try:
            entry = Entry(str(e["tenant"]), str(e["kind"]), str(e["key_id"]), int(e["erased_ms"]))
        except (KeyError, TypeError, ValueError):
            raise LedgerError("malformed erasure ledger entry") from None
        if entry.kind not in (PATIENT, TENANT):
            raise LedgerError(f"unknown erasure ledger entry kind {entry.kind!r}")
        out.add(entry)
    return out


def encode(entries: Iterable[Entry]) -> bytes:
    """The unsigned form (database meta, data directory file)."""
    return orjson.dumps({"version": 1, "entries": [e.to_json() for e in sorted(set(entries))]})


def decode(raw: bytes | None) -> set[Entry]:
    if not raw:
        return set()
    try:
        return _entries(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise LedgerError("the erasure ledger is not JSON") from None


def sign(entries: Iterable[Entry], signer: Ed25519PrivateKey) -> bytes:
    body = encode(entries)
    public = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return orjson.dumps({"ledger": body.decode(), "public_key": public, "signature": signer.sign(body).hex()})


def verify(raw: bytes, public_key_hex: str) -> set[Entry]:
    """The entries of a signed ledger, if signed by ``public_key_hex`` (the backup's signing key)."""
    try:
        doc = orjson.loads(raw)
        body = doc["ledger"].encode()
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(doc["signature"]), body)
    except InvalidSignature:
        raise LedgerError("the erasure ledger's signature does not match this deployment's backup key") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise LedgerError("the erasure ledger object is malformed") from None
    return decode(body)


def read_file(data_dir: Path) -> set[Entry]:
    path = data_dir / LEDGER_FILE
    try:
        return decode(path.read_bytes())
    except FileNotFoundError:
        return set()


def write_file(data_dir: Path, entries: Iterable[Entry]) -> None:
    """Atomically replace the data directory's copy (written, synced, renamed)."""
    path = data_dir / LEDGER_FILE
    tmp = path.with_name(f".{LEDGER_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, encode(entries))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def object_key(public_key_hex: str) -> str:
    """One object per deployment (named by its backup signing key): deployments sharing a target keep theirs."""
    return f"{LEDGER_PREFIX}{public_key_hex}.json"


def publish(target: BackupTarget, entries: Iterable[Entry], signer: Ed25519PrivateKey, public_key_hex: str) -> set[Entry]:
    """Merge ``entries`` with the target's ledger and put the union back, signed. Returns the union.

    A target ledger signed by another key is not merged (a foreign or forged object): it is replaced."""
    merged = set(entries)
    with contextlib.suppress(TargetNotFound, LedgerError):
        merged |= verify(target.get(object_key(public_key_hex)), public_key_hex)
    target.put(object_key(public_key_hex), sign(merged, signer))
    return merged


def fetch(target: BackupTarget, public_key_hex: str) -> set[Entry] | None:
    """The target's ledger (None when it has none); raises LedgerError when it does not verify."""
    try:
        raw = target.get(object_key(public_key_hex))
    except TargetNotFound:
        return None
    return verify(raw, public_key_hex)


def purged(entries: Iterable[Entry], tenant: str) -> Entry | None:
    return next((e for e in entries if e.tenant == tenant and e.kind == TENANT), None)


def local_entries(data_dir: Path, meta_value: bytes | None) -> set[Entry]:
    """Every entry this deployment knows: its data directory's file and its database's copy."""
    return read_file(data_dir) | decode(meta_value)


def for_restore(target: BackupTarget, public_key_hex: str, snapshot_ms: int, *, allow_missing: bool,
                extra: set[Entry] | None = None) -> set[Entry]:
    """The ledger a restore must re-apply. Fails closed: no ledger on the target (unless ``allow_missing``,
    or the operator gives a copy: ``extra``), a ledger that does not verify, or a tenant purged after this
    backup was taken."""
    try:
        entries = fetch(target, public_key_hex)
    except LedgerError as exc:
        raise LedgerError(f"{exc}: refusing to restore (erased patients could come back)") from None
    if extra is not None:
        entries = (entries or set()) | extra
    if entries is None:
        if not allow_missing:
            raise LedgerError(f"no erasure ledger ({object_key(public_key_hex)}) on {target.url}: refusing to restore, erased"
                              " patients could come back. Copy the ledger from the data directory or escrow to the"
                              " target or pass it with --erasure-ledger FILE, or pass --allow-missing-erasure-ledger if no patient was"
                              " ever erased")
        return set()
    for e in entries:
        if e.kind == TENANT and e.erased_ms >= snapshot_ms:
            raise LedgerError(f"tenant '{e.tenant}' was purged after this backup was taken (erasure ledger): its data"
                              " must not be restored; see the deletion certificate")
    return entries
