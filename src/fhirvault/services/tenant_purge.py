"""Verified end of contract: destroy every key of a tenant and sign a deletion certificate.

The purge crypto-shreds the tenant: its key-encryption key (every version), every data key (patients,
tenant-level, audit) and the index key are deleted in one transaction, with an erasure-ledger entry
(kind ``tenant``) so that no backup of the tenant can be restored afterwards (backup/erasure_ledger.py).
The ciphertext left in the database, its WAL and the backups has no key any more. Optionally the
deployment's root key file is destroyed too, so that even a ledger-less copy of a backup cannot be
opened without an escrow copy of the root key (the certificate lists the escrow holders' duty).

The certificate (JSON and text) lists what was destroyed — key ids, counts of patients, resources and
versions, the backups affected — and when, signed with Ed25519 by a deployment key of its own (service
secret ``deletion-certificate``); ``fhirvault tenant verify-certificate`` checks it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault.backup import erasure_ledger as ledger
from fhirvault.domain.instants import instant
from fhirvault.ports import WriteTx
from fhirvault.services.erasure import HOLD, LIFECYCLE_PREFIX

CERT_SECRET = "deletion-certificate"  # noqa: S105 - the name of a service secret, not a secret
KIND = "fhirvault-tenant-deletion-certificate"


class PurgeRefused(Exception):
    """A legal hold (or another rule) forbids the purge; the message names it."""


@dataclass(frozen=True)
class PurgeResult:
    certificate: dict[str, Any]
    json_path: Path
    text_path: Path


def _signer(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _canonical(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign_certificate(body: dict[str, Any], seed: bytes) -> dict[str, Any]:
    key = _signer(seed)
    return {"certificate": body, "signature": {"alg": "Ed25519", "public_key": _public_hex(key),
                                               "value": key.sign(_canonical(body)).hex()}}


def verify_certificate(doc: Any) -> dict[str, Any]:
    """The certificate body if its signature holds; raises ValueError otherwise."""
    try:
        body, sig = doc["certificate"], doc["signature"]
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig["public_key"])).verify(
            bytes.fromhex(sig["value"]), _canonical(body))
    except InvalidSignature:
        raise ValueError("the signature does not match the certificate: it was altered") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("not a fhirvault deletion certificate") from None
    if body.get("kind") != KIND:
        raise ValueError("not a fhirvault deletion certificate")
    assert isinstance(body, dict)
    return body


def certificate_text(doc: dict[str, Any]) -> str:
    c = doc["certificate"]
    d, data = c["destroyed"], c["data"]
    lines = [
        "FHIRVAULT — CERTIFICATE OF DELETION (crypto-shredding)",
        "",
        f"Tenant:                {c['tenant']}",
        f"Deployment instance:   {c['instance_id']} on {c['host']}",
        f"Purged at (UTC):       {c['purged_at']}",
        f"Operator:              {c['operator']}",
        f"Reason:                {c['reason']}",
        "",
        "Keys destroyed:",
        f"  tenant key versions: {', '.join(str(v) for v in d['tenant_key_versions'])}"
        f" (wrapped by root key {', '.join(d['root_key_ids'])})",
        f"  data keys:           {d['data_keys']} ({d['patient_keys']} patient compartments, "
        f"{d['data_keys'] - d['patient_keys']} tenant-level/audit)",
        "  index key:           yes",
        f"  root key file:       {'destroyed' if d['root_key_file_destroyed'] else 'kept (other tenants or reuse)'}",
        "",
        "Data made unreadable:",
        f"  resources: {data['resources']}, versions: {data['versions']}, audit entries: {data['audit_entries']}",
        "",
        "Backups affected (their copies of these keys cannot be used: the erasure ledger forbids restoring them):",
    ]
    for target, ids in sorted(c["backups"].items()):
        lines.append(f"  {target}: {len(ids)} backups" + (f" ({ids[0]} … {ids[-1]})" if ids else ""))
    if not c["backups"]:
        lines.append("  (no backup target configured)")
    lines += ["", f"Erasure ledger: {c['erasure_ledger']}",
              "Escrow: the holders of root-key escrow shares or recovery files must destroy them"
              " (a copy of the root key could open a backup taken before this date).",
              "", f"Signature (Ed25519): {doc['signature']['value']}",
              f"Public key:          {doc['signature']['public_key']}",
              "Verify with: fhirvault tenant verify-certificate FILE.json", ""]
    return "\n".join(lines)


def holds(tx: WriteTx, tenant: str) -> int:
    prefix = f"{LIFECYCLE_PREFIX}{tenant}/"
    return sum(1 for name in tx.meta_names() if name.startswith(prefix)
               and (raw := tx.get_meta(name)) and raw[0] & HOLD)


def purge_tenant(container: Any, *, reason: str, operator: str, out_dir: Path, destroy_root_key: bool,
                 backups: Callable[[], dict[str, list[str]]]) -> PurgeResult:
    """Destroy the tenant's keys and write the signed certificate. ``container`` is a built Container."""
    from fhirvault.container import after_erasure, instance_id, scrub_store

    settings, store, keys, clock = container.settings, container.store, container.keys, container.clock
    tenant = settings.tenant
    census = keys.compartments()
    tenant_keys = store.tenant_keys(tenant)
    resources, versions = store.tenant_usage(tenant)
    audit_entries = store.audit_size()
    affected = backups()
    cert_seed = container.secrets.get(CERT_SECRET)
    instance = instance_id(store)
    now = clock.now_ms()
    container.audit.record_system_event(store, clock, "tenant-purge", f"tenant purge started: {reason}",
                                        actor=operator)

    def job(tx: WriteTx) -> tuple[int, int]:
        held = holds(tx, tenant)
        if held:
            raise PurgeRefused(f"refused by rule 'legal-hold': {held} patients of tenant '{tenant}' are under a legal"
                               " hold (release them first: fhirvault patient release)")
        destroyed = tx.destroy_tenant_keys(tenant)
        for name in tx.meta_names():
            if name.startswith((f"{LIFECYCLE_PREFIX}{tenant}/", f"index-key/{tenant}")):
                tx.delete_meta(name)
        entries = ledger.decode(tx.get_meta(ledger.LEDGER_META))
        entries.add(ledger.Entry(tenant, ledger.TENANT, "", now))
        tx.set_meta(ledger.LEDGER_META, ledger.encode(entries))
        return destroyed

    store.write_sync("tenant.purge", job)
    entries = ledger.decode(store.get_meta(ledger.LEDGER_META))
    after_erasure(settings, store, container.secrets)(entries)
    scrub_store(store)
    root_destroyed = False
    if destroy_root_key and settings.root_key_path.is_file():
        _shred(settings.root_key_path)
        root_destroyed = True
    body = {
        "kind": KIND, "version": 1, "tenant": tenant, "instance_id": instance, "host": socket.gethostname(),
        "purged_at": instant(now), "purged_ms": now, "operator": operator, "reason": reason,
        "destroyed": {
            "tenant_key_versions": sorted(r.version for r in tenant_keys),
            "root_key_ids": sorted({r.root_key_id for r in tenant_keys}),
            "data_keys": len(census), "patient_keys": sum(1 for c in census.values() if c.startswith("patient/")),
            "data_key_ids": sorted(census), "index_key": True, "root_key_file_destroyed": root_destroyed,
        },
        "data": {"resources": resources, "versions": versions, "audit_entries": audit_entries},
        "backups": affected,
        "erasure_ledger": f"{settings.data_dir / ledger.LEDGER_FILE} and each configured backup target",
    }
    doc = sign_certificate(body, cert_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"deletion-certificate-{tenant}-{instant(now).replace(':', '')}"
    json_path, text_path = out_dir / f"{stem}.json", out_dir / f"{stem}.txt"
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    text_path.write_text(certificate_text(doc))
    return PurgeResult(doc, json_path, text_path)


def _shred(path: Path) -> None:
    """Overwrite the file with zeros, sync, then unlink (best effort on copy-on-write file systems)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"\0" * size)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
