"""The audit trail: one encrypted record per interaction, allowed or refused.

Records are written through the ``WriteTx`` of the interaction itself, so a
change and its trace commit together (and for reads, the response waits for
its trace to be durable: no access without a record). The record carries who,
what, which patient, outcome, when, from where and the request id — the fields
IHE BALP AuditEvents are built from — encrypted under the tenant's audit key
because it names patients. The tamper-evident Merkle log replaces the table
behind ``append_audit`` later without changing callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from fhirvault.ports import WriteTx
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

    @property
    def action(self) -> str:
        return ACTION_BY_INTERACTION.get(self.interaction, "E")

    def to_json(self) -> bytes:
        doc = {name: getattr(self, name) for name in self.__slots__ if getattr(self, name) is not None}
        doc["action"] = self.action
        return orjson.dumps(doc)


def outcome_for(status: int) -> str:
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def audit_aad(tenant: str, ts_ms: int) -> bytes:
    return associated_data("audit", tenant, ts_ms)


class TableAuditLog:
    """AuditLog port over the store's append-only audit table."""

    def __init__(self, tenant: str, key: DataKey) -> None:
        self._tenant = tenant
        self._key = key

    def record(self, tx: WriteTx, event: AuditRecord) -> None:
        blob = self._key.aead.seal(event.to_json(), audit_aad(self._tenant, event.ts_ms))
        tx.append_audit(self._tenant, event.ts_ms, blob)

    def decrypt(self, ts_ms: int, blob: bytes) -> dict[str, object]:
        data = orjson.loads(self._key.aead.open(blob, audit_aad(self._tenant, ts_ms)))
        assert isinstance(data, dict)
        return data
