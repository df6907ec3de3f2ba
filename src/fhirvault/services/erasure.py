"""The GDPR data lifecycle of a patient: erasure by crypto-shredding, restriction, legal hold.

* **Erasure** (art. 17) destroys the patient compartment's data key, in one transaction with the
  deletion of every version sealed under it (current and history), their search tags, the patient's
  lifecycle state, an erasure-ledger entry (backup/erasure_ledger.py) and the audit entry. Copies the
  transaction cannot reach (backups, WAL archives, replicas) hold only ciphertext whose key is gone;
  the ledger destroys the key again in any restored copy. On SQLite the WAL is then checkpointed and
  truncated (secure_delete zeroes freed cells), so the wrapped key leaves the database files too.
* **Restriction of processing** (art. 18): the data stays stored, but reads, searches, history and
  $everything of ordinary clients skip or refuse it; only holders of the lifecycle scope read it.
* **Legal hold**: blocks erasure (and the retention job, and tenant purge) until released.

Erasure is refused, with the rule and the date, while a retention rule (domain/retention.py) runs.
The lifecycle state of a patient is a ``meta`` row named by the HMAC of the compartment (no patient
id in clear): one flags byte, then the AEAD-sealed details (reasons, who, when).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhirvault.backup import erasure_ledger as ledger
from fhirvault.domain import errors
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.instants import instant
from fhirvault.domain.retention import (
    ErasureDecision,
    Retention,
    RetentionRules,
    erasure_decision,
    retention_for,
)
from fhirvault.ports import Clock, ResourceStore, StoredVersion, WriteTx
from fhirvault.services.audit import AuditRecord, AuditTrail
from fhirvault.services.coherence import publish
from fhirvault.services.crypto import DecryptionError, associated_data
from fhirvault.services.keys import TENANT_COMPARTMENT, KeyRing, patient_compartment

log = logging.getLogger("fhirvault.erasure")

HOLD, RESTRICTED = 1, 2
DATA_KEYS = "data-keys"  # coherence kind: keys are destroyed data key ids
LIFECYCLE = "lifecycle"  # coherence kind: a patient's restriction or hold changed (keys: its meta names)
# How old this process's copy of the restricted patients may be for work outside a request (a bulk job):
# a request first applies every change committed by another process (services/coherence.py).
RESTRICTED_REFRESH_S = 1.0
LIFECYCLE_PREFIX = "lifecycle/"
MIN_REASON = 10
MAX_REASON = 2000


class ErasureRefused(OperationOutcomeError):
    """409: a rule forbids the erasure now; the OperationOutcome names it and its end date."""

    def __init__(self, decision: ErasureDecision) -> None:
        until = f" until {instant(decision.until_ms)}" if decision.until_ms is not None else " until released"
        text = f"Erasure refused by rule '{decision.rule}'{until}: {decision.detail}."
        super().__init__(409, [Issue("error", "business-rule", text, ("rule:" + str(decision.rule),))])
        self.decision = decision


@dataclass(frozen=True, slots=True)
class PatientState:
    legal_hold: bool = False
    restricted: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # per flag: reason, by, since


@dataclass(frozen=True, slots=True)
class ErasureResult:
    patient_id: str
    key_id: str | None  # None: the patient had no data (nothing to erase)
    resources: int
    versions: int
    erased_ms: int


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str) or not (MIN_REASON <= len(reason.strip()) <= MAX_REASON):
        raise errors.bad_request(f"'reason' is required: {MIN_REASON} to {MAX_REASON} characters.", "reason")
    return reason.strip()


def _details_aad(tenant: str, name: str) -> bytes:
    return associated_data("lifecycle", tenant, name)


class Lifecycle:
    def __init__(self, store: ResourceStore, keys: KeyRing, audit: AuditTrail, clock: Clock, *, tenant: str,
                 rules: RetentionRules | None = None, open_version: Callable[[StoredVersion], bytes] | None = None,
                 after_erasure: Callable[[set[ledger.Entry]], None] | None = None) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit
        self._clock = clock
        self.tenant = tenant
        self.rules = rules or RetentionRules()
        self._open = open_version
        # After each committed erasure: the ledger's other copies (data directory file, backup targets)
        # and the scrub of the database files. Set by the container.
        self.after_erasure = after_erasure
        # The restricted patients' meta names (few), read at once: a read or search checks a set, not the
        # database, for each compartment it returns. (read at, names); the generation guards a re-read
        # that raced with a change.
        self._restricted: tuple[float, frozenset[str]] | None = None
        self._restricted_gen = 0
        self._restricted_lock = threading.Lock()

    # -- state -----------------------------------------------------------------
    def _name(self, pid: str) -> str:
        return f"{LIFECYCLE_PREFIX}{self.tenant}/{self._keys.compartment_lookup(patient_compartment(pid)).hex()}"

    def flags(self, pid: str) -> int:
        raw = self._store.get_meta(self._name(pid))
        return raw[0] if raw else 0

    def restricted_compartment(self, compartment: str) -> bool:
        """Is this compartment's processing restricted? Every process sees a restriction from its next
        request on (the coherence feed drops this copy), and work outside requests within
        ``RESTRICTED_REFRESH_S``."""
        if not compartment.startswith("patient/"):
            return False
        names = self._restricted_names()
        return bool(names) and (
            f"{LIFECYCLE_PREFIX}{self.tenant}/{self._keys.compartment_lookup(compartment).hex()}" in names)

    def _restricted_names(self) -> frozenset[str]:
        now = time.monotonic()
        cached = self._restricted
        if cached is not None and now - cached[0] < RESTRICTED_REFRESH_S:
            return cached[1]
        with self._restricted_lock:
            gen = self._restricted_gen
        rows = self._store.meta_with_prefix(f"{LIFECYCLE_PREFIX}{self.tenant}/")
        names = frozenset(name for name, raw in rows if raw and raw[0] & RESTRICTED)
        with self._restricted_lock:
            if gen == self._restricted_gen:  # no change was announced while we read
                self._restricted = (now, names)
        return names

    def forget_restrictions(self, _names: frozenset[str] | None = None) -> None:
        """A flag changed (here at COMMIT, elsewhere through the coherence feed): re-read at the next check."""
        with self._restricted_lock:
            self._restricted_gen += 1
            self._restricted = None

    def state(self, pid: str) -> PatientState:
        name = self._name(pid)
        raw = self._store.get_meta(name)
        return self._decode(name, raw)

    def _decode(self, name: str, raw: bytes | None) -> PatientState:
        if not raw:
            return PatientState()
        details: dict[str, Any] = {}
        if len(raw) > 1:
            key = self._keys.for_compartment_sync(TENANT_COMPARTMENT)
            try:
                details = orjson.loads(key.aead.open(raw[1:], _details_aad(self.tenant, name)))
            except DecryptionError:
                details = {}
        return PatientState(bool(raw[0] & HOLD), bool(raw[0] & RESTRICTED), details)

    async def set_flag(self, pid: str, flag: int, on: bool, reason: str, by: str,
                       record: AuditRecord) -> PatientState:
        name = self._name(pid)
        key = await self._keys.for_compartment(TENANT_COMPARTMENT)
        now = self._clock.now_ms()
        label = "legal_hold" if flag == HOLD else "restricted"

        def job(tx: WriteTx) -> PatientState:
            tx.serialize(name)
            raw = tx.get_meta(name)
            state = self._decode(name, raw)
            flags = (raw[0] if raw else 0) | flag if on else (raw[0] if raw else 0) & ~flag
            details = dict(state.details)
            details[label] = {"on": on, "reason": reason, "by": by, "at": instant(now)}
            sealed = key.aead.seal(orjson.dumps(details), _details_aad(self.tenant, name))
            tx.set_meta(name, bytes([flags]) + sealed)
            publish(tx, LIFECYCLE, {name}, self.forget_restrictions)
            self._audit.record(tx, record)
            return PatientState(bool(flags & HOLD), bool(flags & RESTRICTED), details)

        return await self._store.write("lifecycle.flag", job)

    # -- retention ---------------------------------------------------------------
    def retention(self, pid: str) -> Retention | None:
        """Until when the patient's record must be kept (None: nothing stored for them)."""
        key = self._keys.existing(patient_compartment(pid))
        if key is None:
            return None
        usage = self._store.key_usage(self.tenant, key)
        return self._retention_of(pid, usage)

    def _retention_of(self, pid: str, usage: list[tuple[str, str, int, int]]) -> Retention | None:
        if not usage:
            return None
        newest_by_type: dict[str, int] = {}
        for rtype, _id, _n, newest in usage:
            newest_by_type[rtype] = max(newest_by_type.get(rtype, 0), newest)
        return retention_for(self.rules, max(newest_by_type.values()), self.birth_date(pid), newest_by_type)

    def birth_date(self, pid: str) -> str | None:
        v = self._store.read_current(self.tenant, "Patient", pid)
        if v is None or v.deleted or self._open is None:
            return None
        try:
            doc = orjson.loads(self._open(v))
        except Exception:
            return None
        birth = doc.get("birthDate") if isinstance(doc, dict) else None
        return birth if isinstance(birth, str) else None

    def census(self) -> dict[str, str]:
        """Every data key of the tenant: key id -> compartment."""
        return self._keys.compartments()

    def decide(self, pid: str, *, override_retention: bool = False) -> ErasureDecision:
        return erasure_decision(self._clock.now_ms(), self.retention(pid),
                                legal_hold=bool(self.flags(pid) & HOLD), override_retention=override_retention)

    # -- erasure -------------------------------------------------------------------
    def erase_job(self, pid: str, record: Callable[[ErasureResult], AuditRecord], *,
                  override_retention: bool = False) -> Callable[[WriteTx], ErasureResult]:
        """The erasure transaction: checks again under the store's lock, then shreds."""
        compartment = patient_compartment(pid)
        lookup = self._keys.compartment_lookup(compartment)
        name = self._name(pid)
        decision_now = self.decide(pid, override_retention=override_retention)
        if not decision_now.allowed:
            raise ErasureRefused(decision_now)
        now = self._clock.now_ms()
        # The versions to delete, read here off the write path (a long scan would hold the writer).
        key = self._keys.existing(compartment)
        since = self._store.max_seq()
        known = (since, self._store.key_versions(self.tenant, key)) if key is not None else None

        def job(tx: WriteTx) -> ErasureResult:
            tx.serialize(name)
            raw = tx.get_meta(name)
            if raw and raw[0] & HOLD:  # a hold set since the decision above
                raise ErasureRefused(erasure_decision(now, None, legal_hold=True))
            row = tx.data_key_by_lookup(self.tenant, lookup)
            if row is None:
                result = ErasureResult(pid, None, 0, 0, now)
            else:
                resources, versions = tx.erase_key(self.tenant, row.key_id,
                                                   known if key == row.key_id else None)
                entries = ledger.decode(tx.get_meta(ledger.LEDGER_META))
                entries.add(ledger.Entry(self.tenant, ledger.PATIENT, row.key_id, now))
                tx.set_meta(ledger.LEDGER_META, ledger.encode(entries))
                result = ErasureResult(pid, row.key_id, resources, versions, now)
                key_id = row.key_id
                # Every process drops the key from its caches (services/coherence.py), this one at COMMIT.
                publish(tx, DATA_KEYS, {key_id}, lambda: self._keys.forget(key_id, lookup))
            tx.delete_meta(name)
            publish(tx, LIFECYCLE, {name}, self.forget_restrictions)
            self._audit.record(tx, record(result))
            return result

        return job

    async def erase(self, pid: str, record: Callable[[ErasureResult], AuditRecord], *,
                    override_retention: bool = False) -> ErasureResult:
        result = await self._store.write("lifecycle.erase", self.erase_job(pid, record,
                                                                           override_retention=override_retention))
        self.finish(result)
        return result

    def erase_sync(self, pid: str, record: Callable[[ErasureResult], AuditRecord], *,
                   override_retention: bool = False) -> ErasureResult:
        result = self._store.write_sync("lifecycle.erase", self.erase_job(pid, record,
                                                                          override_retention=override_retention))
        self.finish(result)
        return result

    def finish(self, result: ErasureResult) -> None:
        if result.key_id is None or self.after_erasure is None:
            return
        try:
            self.after_erasure(ledger.decode(self._store.get_meta(ledger.LEDGER_META)))
        except Exception:  # the erasure is committed; the copies catch up at the next erasure or backup
            log.exception("erasure committed, but a copy of the erasure ledger could not be updated")


def apply_ledger(store: ResourceStore, tenant: str, entries: set[ledger.Entry], now_ms: int) -> tuple[int, bool]:
    """Destroy again every key the ledger lists that this database still holds (a restored backup, a
    copy): before a server or CLI uses it. Returns (keys destroyed, tenant purged). Idempotent."""
    purged = ledger.purged(entries, tenant) is not None
    wanted = [e for e in entries if e.tenant == tenant and e.kind == ledger.PATIENT
              and store.data_key(tenant, e.key_id) is not None]
    known = ledger.decode(store.get_meta(ledger.LEDGER_META))
    if not wanted and not (purged and store.tenant_keys(tenant)) and entries <= known:
        return 0, purged

    def job(tx: WriteTx) -> int:
        for e in wanted:
            tx.erase_key(tenant, e.key_id)
        if purged:
            tx.destroy_tenant_keys(tenant)
        tx.set_meta(ledger.LEDGER_META, ledger.encode(known | entries))
        return len(wanted)

    destroyed = store.write_sync("lifecycle.ledger", job)
    if destroyed or purged:
        log.warning("erasure ledger re-applied: keys destroyed again in this database",
                    extra={"keys": destroyed, "tenant_purged": purged, "at_ms": now_ms})
    return destroyed, purged
