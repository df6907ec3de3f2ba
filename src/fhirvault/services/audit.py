"""The audit trail: one encrypted record per interaction, allowed or refused.

Records are written through the ``WriteTx`` of the interaction itself, so a
change and its trace commit together (and for reads, the response waits for
its trace to be durable: no access without a record). The record carries who,
what, which patient, outcome, when, from where and the request id — the fields
IHE BALP AuditEvents are built from — encrypted under the tenant's audit key
because it names patients. Entries form an RFC 9162 Merkle log (see
``services/audit_checkpoints.py`` and ``fhirvault audit verify``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from fhirvault.ports import SEARCH_TAG_BYTES, AuditRow, Clock, ResourceStore, WriteTx
from fhirvault.services.crypto import associated_data
from fhirvault.services.keys import DataKey

# FHIR AuditEvent.action codes by interaction.
ACTION_BY_INTERACTION = {
    "create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U", "delete": "D",
    "history-instance": "R", "history-type": "R", "history-system": "R", "search": "E",
    "token": "E", "authenticate": "E",
}


@dataclass(frozen=True, slots=True)
class AuditRecord:
    ts_ms: int
    interaction: str
    outcome: str  # AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure
    status: int
    request_id: str
    client_id: str | None = None
    source_ip: str | None = None
    entity: str | None = None  # Type/id/_history/n
    patient: str | None = None  # Patient/id
    query: str | None = None
    detail: str | None = None  # why it was refused
    user: str | None = None  # the person behind the client (fhirUser / login), once logins exist
    role: str | None = None  # the user's role (practitioner, auditor…), once roles exist
    purpose_of_use: str | None = None  # v3 PurposeOfUse code, e.g. TREAT, ETREAT (break-the-glass)
    restricted: bool = False  # the resource carried an R or V confidentiality label
    result_count: int | None = None  # searches, history, $everything: entries returned
    category: str = "rest"  # rest (FHIR interaction) | security (login, token) | system (backup, keys, config)

    @property
    def action(self) -> str:
        return ACTION_BY_INTERACTION.get(self.interaction, "E")

    def to_json(self) -> bytes:
        doc = {name: value for name in self.__slots__ if (value := getattr(self, name)) is not None and value is not False}
        doc["action"] = self.action
        return orjson.dumps(doc)


def outcome_for(status: int) -> str:
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def audit_aad(tenant: str, seq: int, ts_ms: int) -> bytes:
    # The position is authenticated: a row moved, replayed or renumbered no longer opens.
    return associated_data("audit", tenant, seq, ts_ms)


_TAG_CACHE = 100_000
_LEAF_PREFIX = b"fhirvault-audit-v1\x00"


def leaf_data(row: AuditRow) -> bytes:
    """The bytes a Merkle leaf commits to: everything stored for the entry, unambiguously framed."""
    tenant = row.tenant.encode()
    return b"".join((_LEAF_PREFIX, struct.pack(">QQH", row.seq, row.ts_ms, len(tenant)), tenant,
                     struct.pack(">I", len(row.tags)), row.tags, row.blob))


class AuditTrail:
    """AuditLog port: encrypted entries appended to the Merkle log inside the caller's transaction.

    Each entry also carries blind-index tags (HMAC of the patient and of the agents)
    so the trail can be searched by patient or agent without decrypting it all.
    """

    def __init__(self, tenant: str, key: DataKey, tag_key: bytes, *, hash_source_ips: bool = False) -> None:
        self._tenant = tenant
        self._key = key
        self._tag_key = tag_key
        self._hash_ips = hash_source_ips
        self._tag_cache: dict[tuple[str, str], bytes] = {}
        # Called with each record once it is durable (real-time detection), on the writer's event loop.
        self.observers: list[Callable[[AuditRecord], None]] = []

    @property
    def tenant(self) -> str:
        return self._tenant

    def tag(self, kind: str, value: str) -> bytes:
        # The same clients and patients recur constantly: remember their tags (bounded).
        key = (kind, value)
        found = self._tag_cache.get(key)
        if found is None:
            found = hmac.new(self._tag_key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()[:SEARCH_TAG_BYTES]
            if len(self._tag_cache) >= _TAG_CACHE:
                self._tag_cache.clear()
            self._tag_cache[key] = found
        return found

    def tags_for(self, event: AuditRecord) -> bytes:
        return self._tags(event.patient, event.entity, event.client_id, event.user)

    def tags_from(self, doc: dict[str, Any]) -> bytes:
        """The tags a decrypted record implies (``audit verify`` checks the stored ones)."""
        return self._tags(doc.get("patient"), doc.get("entity"), doc.get("client_id"), doc.get("user"))

    def _tags(self, patient: str | None, entity: str | None, client_id: str | None, user: str | None) -> bytes:
        # One tag per patient named (searches and history name several, comma-separated), and the
        # patient a refused or Patient-level access was about (its entity), so a patient's access
        # history is an index lookup.
        patients = {p for p in (patient or "").split(",") if p}
        if entity and entity.startswith("Patient/"):
            patients.add("/".join(entity.split("/")[:2]).split("$")[0])
        tags = {self.tag("patient", p) for p in patients}
        if client_id:
            tags.add(self.tag("agent", client_id))
        if user:
            tags.add(self.tag("agent", user))
        return b"".join(sorted(tags))

    def record(self, tx: WriteTx, event: AuditRecord) -> None:
        stored = event
        if self._hash_ips and event.source_ip:
            # Pseudonymised but stable: the same address gives the same value, so patterns remain visible.
            digest = hmac.new(self._tag_key, b"source-ip\x00" + event.source_ip.encode(), hashlib.sha256)
            stored = dataclasses.replace(event, source_ip="hmac-sha256:" + digest.hexdigest()[:32])
        plaintext = stored.to_json()
        aead, tenant, ts_ms = self._key.aead, self._tenant, event.ts_ms
        tx.append_audit(tenant, ts_ms, lambda seq: aead.seal(plaintext, audit_aad(tenant, seq, ts_ms)),
                        self.tags_for(event))
        if self.observers:
            observers = tuple(self.observers)

            def notify() -> None:
                for observer in observers:
                    observer(event)

            tx.on_commit(notify)

    def record_system_event(self, store: ResourceStore, clock: Clock, interaction: str, detail: str, *,
                            status: int = 200, actor: str | None = None) -> None:
        """A configuration, key or backup event from the CLI or a background job (its own transaction)."""
        event = AuditRecord(clock.now_ms(), interaction, outcome_for(status), status, "-", user=actor,
                            detail=detail, category="system")
        store.write_sync("audit.system", lambda tx: self.record(tx, event))

    def decrypt(self, seq: int, ts_ms: int, blob: bytes) -> dict[str, Any]:
        """Raises DecryptionError if the entry was modified, moved or forged."""
        data = orjson.loads(self._key.aead.open(blob, audit_aad(self._tenant, seq, ts_ms)))
        assert isinstance(data, dict)
        return data
