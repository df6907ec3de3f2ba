"""Break-the-glass: time-limited emergency access of one professional to one patient.

A grant is stored with its routing data in clear (user, patient id, expiry,
review status) and its details sealed with the tenant data key (the free-text
reason may name clinical facts). The repository decides who may start one and
records every access under it with purpose of use ETREAT; this module keeps the
grants, answers "which patients does this user hold a running grant for" (cached
for a few seconds, dropped at once when this process writes a grant) and the
review queue of the security officer.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from fhirvault.ports import BreakGlassRow, Clock, ResourceStore, WriteTx
from fhirvault.services.coherence import BREAK_GLASS, publish
from fhirvault.services.crypto import associated_data
from fhirvault.services.keys import TENANT_COMPARTMENT, KeyRing

OPEN, CLOSED = "open", "closed"
DECISIONS = frozenset({"justified", "unjustified"})
MIN_REASON = 10
MAX_TEXT = 2_000
_CACHE_SECONDS = 5.0  # grants written by a CLI process show within this delay (servers: coherence.py)


@dataclass(frozen=True, slots=True)
class Grant:
    grant_id: str
    user_id: str
    patient_id: str
    created_ms: int
    expires_ms: int
    status: str
    reason: str
    purpose_of_use: str
    role: str | None
    fhir_user: str | None
    decision: str | None = None
    note: str | None = None
    reviewer: str | None = None
    reviewed_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (
            ("id", self.grant_id), ("user", self.user_id), ("fhirUser", self.fhir_user), ("role", self.role),
            ("patient", f"Patient/{self.patient_id}"), ("created", self.created_ms), ("expires", self.expires_ms),
            ("status", self.status), ("reason", self.reason), ("purposeOfUse", self.purpose_of_use),
            ("decision", self.decision), ("note", self.note), ("reviewer", self.reviewer),
            ("reviewed", self.reviewed_ms)) if v is not None}


def _aad(tenant: str, grant_id: str) -> bytes:
    return associated_data("break-glass", tenant, grant_id)


class BreakGlass:
    def __init__(self, store: ResourceStore, keys: KeyRing, clock: Clock, *, tenant: str, hours: float) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._tenant = tenant
        self.hours = hours
        self._lock = threading.Lock()
        self._active: dict[str, tuple[float, dict[str, int]]] = {}  # user -> (cached until, patient -> expiry)
        # Called with each new grant once it is committed (services/patient_notify.py tells the patient).
        self.on_started: list[Callable[[Grant], None]] = []

    # -- grants in force ----------------------------------------------------------
    def active_patients(self, user_id: str) -> frozenset[str]:
        """Patients this user holds a running grant for."""
        now_ms = self._clock.now_ms()
        mono = time.monotonic()
        with self._lock:
            hit = self._active.get(user_id)
        if hit is None or hit[0] <= mono:
            rows = self._store.break_glass_rows(self._tenant, user_id=user_id, expires_after_ms=now_ms, limit=100)
            expiries: dict[str, int] = {}
            for r in rows:
                expiries[r.patient_id] = max(expiries.get(r.patient_id, 0), r.expires_ms)
            with self._lock:
                if len(self._active) > 10_000:
                    self._active.clear()
                self._active[user_id] = (mono + _CACHE_SECONDS, expiries)
            hit = (0.0, expiries)
        return frozenset(p for p, exp in hit[1].items() if exp > now_ms)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._active.pop(user_id, None)

    def forget_all(self) -> None:
        with self._lock:
            self._active.clear()

    # -- start ----------------------------------------------------------------------
    async def start(self, *, user_id: str, role: str | None, fhir_user: str | None, patient_id: str, reason: str,
                    purpose: str, audit: Callable[[WriteTx], None]) -> Grant:
        """Store a new grant and its audit record in one transaction."""
        now = self._clock.now_ms()
        grant = Grant("bg-" + secrets.token_hex(12), user_id, patient_id, now, now + int(self.hours * 3_600_000),
                      OPEN, reason, purpose, role, fhir_user)
        key = await self._keys.for_compartment(TENANT_COMPARTMENT)
        row = self._row(grant, key.key_id, key.aead.seal(self._details(grant), _aad(self._tenant, grant.grant_id)))

        def job(tx: WriteTx) -> None:
            tx.put_break_glass(row)
            audit(tx)
            publish(tx, BREAK_GLASS, {user_id}, lambda: self.forget(user_id))

        await self._store.write("break-glass.start", job)
        self.forget(user_id)
        for callback in self.on_started:
            callback(grant)  # must not block: queues work (patient notification)
        return grant

    # -- review queue ---------------------------------------------------------------
    def queue(self, status: str | None) -> list[Grant]:
        return [self._open(r) for r in self._store.break_glass_rows(self._tenant, status=status)]

    def get(self, grant_id: str) -> Grant | None:
        row = self._store.break_glass(self._tenant, grant_id)
        return self._open(row) if row is not None else None

    async def review(self, grant: Grant, *, reviewer: str, decision: str, note: str,
                     audit: Callable[[WriteTx], None]) -> Grant:
        reviewed = Grant(grant.grant_id, grant.user_id, grant.patient_id, grant.created_ms, grant.expires_ms, CLOSED,
                         grant.reason, grant.purpose_of_use, grant.role, grant.fhir_user, decision, note, reviewer,
                         self._clock.now_ms())
        key = await self._keys.for_compartment(TENANT_COMPARTMENT)
        row = self._row(reviewed, key.key_id, key.aead.seal(self._details(reviewed),
                                                            _aad(self._tenant, grant.grant_id)))

        def job(tx: WriteTx) -> None:
            tx.put_break_glass(row)
            audit(tx)

        await self._store.write("break-glass.review", job)
        return reviewed

    # -- rows -----------------------------------------------------------------------
    @staticmethod
    def _details(g: Grant) -> bytes:
        return orjson.dumps({"reason": g.reason, "purpose": g.purpose_of_use, "role": g.role, "fhirUser": g.fhir_user,
                             "decision": g.decision, "note": g.note, "reviewer": g.reviewer,
                             "reviewed": g.reviewed_ms})

    def _row(self, g: Grant, key_id: str, blob: bytes) -> BreakGlassRow:
        return BreakGlassRow(g.grant_id, self._tenant, g.user_id, g.patient_id, g.created_ms, g.expires_ms, g.status,
                             key_id, blob)

    def _open(self, row: BreakGlassRow) -> Grant:
        key = self._keys.by_id(row.key_id)
        d = orjson.loads(key.aead.open(row.blob, _aad(self._tenant, row.grant_id)))
        return Grant(row.grant_id, row.user_id, row.patient_id, row.created_ms, row.expires_ms, row.status,
                     d.get("reason") or "", d.get("purpose") or "ETREAT", d.get("role"), d.get("fhirUser"),
                     d.get("decision"), d.get("note"), d.get("reviewer"), d.get("reviewed"))
