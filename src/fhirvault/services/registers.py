"""Registers the software keeps for the data protection officer (GDPR art. 28, 30, 33, 12-22).

* **Actors and subcontractors** (art. 28): ``[[actors]]`` in fhirvault.toml (name, role, country, contract,
  contact, the clients and destination hosts they operate), shown with what they can reach.
* **Record of processing** (art. 30): generated from the configuration and the live instance
  (``record_of_processing``): purposes, data categories, recipients (the clients and their scopes,
  owners and purposes), retention, transfers (the residency destinations), security measures enabled.
* **Breach / incident register** (art. 33): entries opened from an alert (or by hand), with the 72-hour
  notification deadline counted from detection, status, notes; overdue flagged.
* **Data-subject requests** (art. 12-22): access, rectification, erasure, portability, restriction,
  objection, due one month after receipt, extendable once by two months with a reason; overdue flagged.

Incidents and requests live in the database (``register_entries``): kind, status and deadline in clear,
the details sealed with the tenant data key (a request names a person). Every change needs a reason and is
written to the audit trail in the same transaction.

Use: ``RegisterService(container)`` then ``open_incident``, ``update_incident``, ``incidents``,
``open_request``, ``update_request``, ``requests``; ``actors_register(container)`` and
``record_of_processing(container)`` return JSON-ready dicts.
"""

from __future__ import annotations

import calendar
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from fhirvault.config import SettingsError
from fhirvault.ports import RegisterRow, WriteTx
from fhirvault.services.audit import AuditRecord
from fhirvault.services.crypto import associated_data
from fhirvault.services.keys import TENANT_COMPARTMENT
from fhirvault.services.residency import check_country

if TYPE_CHECKING:
    from fhirvault.container import Container

INCIDENT, REQUEST = "incident", "request"
NOTIFICATION_HOURS = 72  # GDPR art. 33(1): notify the supervisory authority (CNIL) within 72 hours
REQUEST_TYPES = ("access", "rectification", "erasure", "portability", "restriction", "objection")
INCIDENT_STATUSES = ("open", "notified", "closed")  # closed: assessed, no notification needed (reason kept)
REQUEST_STATUSES = ("open", "extended", "done", "refused")
MIN_REASON = 5
MAX_TEXT = 4000
_ID = re.compile(r"^(inc|dsr)-[0-9a-f]{16}$")


class RegisterError(ValueError):
    """A register change was refused; the message says why (safe to show)."""


class NotFound(RegisterError):
    pass


# -- configuration: actors (art. 28) and the processing described in the record (art. 30) -------------

@dataclass(frozen=True, slots=True)
class ActorSettings:
    name: str
    role: str  # e.g. hosting provider (HDS), subcontractor, backup operator, support
    country: str
    contract: str | None = None  # contract reference (art. 28 clauses)
    contact: str | None = None
    clients: tuple[str, ...] = ()  # OAuth client ids this actor operates
    hosts: tuple[str, ...] = ()  # destination hosts it runs (see [[residency.destinations]])


@dataclass(frozen=True, slots=True)
class ProcessingSettings:
    controller: str | None = None
    dpo_contact: str | None = None
    purposes: tuple[str, ...] = ("hosting of personal health data for the care of patients (HDS)",)
    legal_basis: str = "GDPR art. 6(1)(c)/(e) and art. 9(2)(h): provision of health care"
    data_subjects: tuple[str, ...] = ("patients", "health professionals (users)")


def _str(name: str, raw: Any, *, optional: bool = False) -> str | None:
    if raw is None and optional:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise SettingsError(f"{name}: expected a non-empty string")
    return raw.strip()


def _strs(name: str, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(i, str) and i for i in raw):
        raise SettingsError(f"{name}: expected a list of strings")
    return tuple(raw)


def parse_actors(raw: Any, origin: str) -> tuple[ActorSettings, ...]:
    """Validate ``[[actors]]`` tables."""
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return ()
    try:
        if not isinstance(raw, list):
            raise SettingsError("actors: expected an array of tables ([[actors]])")
        out: list[ActorSettings] = []
        for i, item in enumerate(raw):
            where = f"actors[{i}]"
            if not isinstance(item, Mapping):
                raise SettingsError(f"{where}: expected a table")
            unknown = set(item) - {"name", "role", "country", "contract", "contact", "clients", "hosts"}
            if unknown:
                raise SettingsError(f"{where}: unknown key '{sorted(unknown)[0]}'")
            out.append(ActorSettings(
                str(_str(f"{where}.name", item.get("name"))), str(_str(f"{where}.role", item.get("role"))),
                check_country(f"{where}.country", item.get("country")),
                _str(f"{where}.contract", item.get("contract"), optional=True),
                _str(f"{where}.contact", item.get("contact"), optional=True),
                _strs(f"{where}.clients", item.get("clients", [])),
                tuple(h.lower() for h in _strs(f"{where}.hosts", item.get("hosts", [])))))
        return tuple(out)
    except SettingsError as exc:
        raise SettingsError(f"{exc} (from {origin})") from None


def parse_processing(raw: Any, origin: str) -> ProcessingSettings:
    """Validate the ``[processing]`` table (what the record of processing says beyond the configuration)."""
    try:
        if not isinstance(raw, Mapping):
            raise SettingsError("processing: expected a table")
        unknown = set(raw) - {"controller", "dpo_contact", "purposes", "legal_basis", "data_subjects"}
        if unknown:
            raise SettingsError(f"processing: unknown key '{sorted(unknown)[0]}'")
        default = ProcessingSettings()
        return ProcessingSettings(
            _str("processing.controller", raw.get("controller"), optional=True),
            _str("processing.dpo_contact", raw.get("dpo_contact"), optional=True),
            _strs("processing.purposes", raw["purposes"]) if "purposes" in raw else default.purposes,
            str(_str("processing.legal_basis", raw["legal_basis"])) if "legal_basis" in raw else default.legal_basis,
            _strs("processing.data_subjects", raw["data_subjects"]) if "data_subjects" in raw
            else default.data_subjects)
    except SettingsError as exc:
        raise SettingsError(f"{exc} (from {origin})") from None


# -- deadlines -----------------------------------------------------------------------------------------

def add_months(ms: int, months: int) -> int:
    """The same day ``months`` calendar months later (the last day of a shorter month), same time of day."""
    t = datetime.fromtimestamp(ms / 1000, UTC)
    index = t.month - 1 + months
    year, month = t.year + index // 12, index % 12 + 1
    day = min(t.day, calendar.monthrange(year, month)[1])
    return int(t.replace(year=year, month=month, day=day).timestamp() * 1000) + ms % 1000


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- entries --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Note:
    at_ms: int
    by: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at_ms), "by": self.by, "text": self.text}


@dataclass(frozen=True, slots=True)
class Incident:
    id: str
    title: str
    detected_ms: int
    created_ms: int
    status: str = "open"
    alert_id: str | None = None
    rule: str | None = None
    severity: str | None = None
    personal_data_breach: bool | None = None  # None: not assessed yet
    notified_ms: int | None = None
    authority_reference: str | None = None  # e.g. the CNIL notification number
    closed_ms: int | None = None
    notes: tuple[Note, ...] = ()

    @property
    def notification_due_ms(self) -> int:
        return self.detected_ms + NOTIFICATION_HOURS * 3_600_000

    def overdue(self, now_ms: int) -> bool:
        return self.status == "open" and now_ms > self.notification_due_ms

    def to_json(self, now_ms: int) -> dict[str, Any]:
        left = (self.notification_due_ms - now_ms) / 3_600_000
        return {"id": self.id, "title": self.title, "status": self.status, "alert": self.alert_id,
                "rule": self.rule, "severity": self.severity, "personalDataBreach": self.personal_data_breach,
                "detected": iso(self.detected_ms), "notificationDue": iso(self.notification_due_ms),
                "hoursLeft": round(left, 1) if self.status == "open" else None, "overdue": self.overdue(now_ms),
                "notified": iso(self.notified_ms), "authorityReference": self.authority_reference,
                "closed": iso(self.closed_ms), "created": iso(self.created_ms),
                "notes": [n.to_json() for n in self.notes]}


@dataclass(frozen=True, slots=True)
class SubjectRequest:
    id: str
    type: str
    subject: str  # who asked (name or reference: sealed at rest)
    received_ms: int
    created_ms: int
    status: str = "open"
    patient: str | None = None  # Patient/id when known
    extension_reason: str | None = None
    closed_ms: int | None = None
    outcome: str | None = None
    notes: tuple[Note, ...] = field(default=())

    @property
    def due_ms(self) -> int:
        base = add_months(self.received_ms, 1)  # art. 12(3): one month
        return add_months(base, 2) if self.extension_reason else base  # extendable by two further months

    def overdue(self, now_ms: int) -> bool:
        return self.status in ("open", "extended") and now_ms > self.due_ms

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "subject": self.subject, "patient": self.patient,
                "status": self.status, "received": iso(self.received_ms), "due": iso(self.due_ms),
                "extended": self.extension_reason is not None, "extensionReason": self.extension_reason,
                "overdue": self.overdue(now_ms), "closed": iso(self.closed_ms), "outcome": self.outcome,
                "created": iso(self.created_ms), "notes": [n.to_json() for n in self.notes]}


def _aad(tenant: str, kind: str, entry_id: str) -> bytes:
    return associated_data("register", tenant, kind, entry_id)


def _text(name: str, raw: Any, *, minimum: int = 1) -> str:
    if not isinstance(raw, str) or len(raw.strip()) < minimum or len(raw) > MAX_TEXT:
        raise RegisterError(f"{name}: expected text of {minimum} to {MAX_TEXT} characters")
    return raw.strip()


def _time(name: str, raw: Any, default: int) -> int:
    """An ISO 8601 date-time (or epoch milliseconds); default when absent."""
    if raw is None:
        return default
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
        return raw
    if isinstance(raw, str):
        try:
            t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)
    raise RegisterError(f"{name}: expected an ISO 8601 date-time, e.g. 2026-05-04T10:00:00Z")


class RegisterService:
    """Incidents and data-subject requests: sealed in the store, every change audited with its reason."""

    def __init__(self, container: Container) -> None:
        self._c = container
        self._tenant = container.settings.tenant

    # -- storage --
    def _seal(self, kind: str, entry_id: str, body: dict[str, Any]) -> tuple[str, bytes]:
        key = self._c.keys.for_compartment_sync(TENANT_COMPARTMENT)
        return key.key_id, key.aead.seal(orjson.dumps(body), _aad(self._tenant, kind, entry_id))

    def _open(self, row: RegisterRow) -> dict[str, Any]:
        key = self._c.keys.by_id(row.key_id)
        data = orjson.loads(key.aead.open(row.blob, _aad(self._tenant, row.kind, row.entry_id)))
        assert isinstance(data, dict)
        return data

    def _write(self, kind: str, entry_id: str, created_ms: int, status: str, due_ms: int | None,
               body: dict[str, Any], *, actor: str, action: str, reason: str, expect_new: bool) -> None:
        now = self._c.clock.now_ms()
        key_id, blob = self._seal(kind, entry_id, body)
        row = RegisterRow(self._tenant, kind, entry_id, created_ms, now, status, due_ms, key_id, blob)
        record = AuditRecord(now, "register-change", "0", 200, "-", user=actor, entity=f"register/{kind}/{entry_id}",
                             detail=f"{kind} {entry_id} {action}: {reason}", category="system")

        def job(tx: WriteTx) -> None:
            existing = tx.register_entry_for_update(self._tenant, kind, entry_id)
            if expect_new and existing is not None:
                raise RegisterError(f"{kind} {entry_id} exists already")
            tx.put_register_entry(row)
            self._c.audit.record(tx, record)

        self._c.store.write_sync(f"register.{kind}", job)

    # -- incidents --
    @staticmethod
    def _incident(d: dict[str, Any]) -> Incident:
        return Incident(d["id"], d["title"], d["detected_ms"], d["created_ms"], d["status"], d.get("alert_id"),
                        d.get("rule"), d.get("severity"), d.get("personal_data_breach"), d.get("notified_ms"),
                        d.get("authority_reference"), d.get("closed_ms"),
                        tuple(Note(n["at"], n["by"], n["text"]) for n in d.get("notes", ())))

    @staticmethod
    def _incident_body(i: Incident) -> dict[str, Any]:
        return {"id": i.id, "title": i.title, "detected_ms": i.detected_ms, "created_ms": i.created_ms,
                "status": i.status, "alert_id": i.alert_id, "rule": i.rule, "severity": i.severity,
                "personal_data_breach": i.personal_data_breach, "notified_ms": i.notified_ms,
                "authority_reference": i.authority_reference, "closed_ms": i.closed_ms,
                "notes": [{"at": n.at_ms, "by": n.by, "text": n.text} for n in i.notes]}

    def _save_incident(self, i: Incident, *, actor: str, action: str, reason: str, new: bool = False) -> Incident:
        due = i.notification_due_ms if i.status == "open" else None
        self._write(INCIDENT, i.id, i.created_ms, i.status, due, self._incident_body(i), actor=actor, action=action,
                    reason=reason, expect_new=new)
        return i

    def open_incident(self, *, actor: str, reason: Any, alert_id: str | None = None, title: str | None = None,
                      detected: Any = None) -> Incident:
        """A new incident, from an alert (its first detection time starts the 72-hour clock) or by hand."""
        reason = _text("reason", reason, minimum=MIN_REASON)
        now = self._c.clock.now_ms()
        rule = severity = None
        detected_ms = _time("detected", detected, now)
        if alert_id is not None:
            alert = self._alert(alert_id)
            if alert is None:
                raise NotFound(f"no alert {alert_id}")
            for other in self.incidents():
                if other.alert_id == alert_id:
                    raise RegisterError(f"alert {alert_id} is already in the register as {other.id}")
            rule, severity = alert.rule, alert.severity
            title = title or f"{alert.rule}: {alert.summary}"
            detected_ms = alert.first_ms if detected is None else detected_ms
        incident = Incident("inc-" + secrets.token_hex(8), _text("title", title or "", minimum=3), detected_ms, now,
                            alert_id=alert_id, rule=rule, severity=severity,
                            notes=(Note(now, actor, reason),))
        return self._save_incident(incident, actor=actor, action="opened", reason=reason, new=True)

    def _alert(self, alert_id: str) -> Any:
        alerts = self._c.alerts
        if alerts is not None:
            return alerts.get(alert_id)
        from fhirvault.container import alert_store

        store = alert_store(self._c.settings)
        try:
            return store.get(alert_id)
        finally:
            store.close()

    def incident(self, incident_id: str) -> Incident:
        row = self._c.store.register_entry(self._tenant, INCIDENT, incident_id) if _ID.match(incident_id) else None
        if row is None:
            raise NotFound(f"no incident {incident_id}")
        return self._incident(self._open(row))

    def incidents(self, status: str | None = None) -> list[Incident]:
        return [self._incident(self._open(r)) for r in self._c.store.register_entries(self._tenant, INCIDENT,
                                                                                        status=status)]

    def update_incident(self, incident_id: str, *, actor: str, reason: Any, status: str | None = None,
                        personal_data_breach: bool | None = None, notified: Any = None,
                        authority_reference: str | None = None) -> Incident:
        """Add a note (``reason``), and optionally change status (notified, closed), breach assessment."""
        reason = _text("reason", reason, minimum=MIN_REASON)
        current = self.incident(incident_id)
        now = self._c.clock.now_ms()
        changes: dict[str, Any] = {"notes": (*current.notes, Note(now, actor, reason))}
        action = "noted"
        if personal_data_breach is not None:
            changes["personal_data_breach"] = personal_data_breach
            action = "assessed"
        if authority_reference is not None:
            changes["authority_reference"] = _text("authority_reference", authority_reference)
        if status is not None and status != current.status:
            if status not in INCIDENT_STATUSES:
                raise RegisterError(f"status: one of {', '.join(INCIDENT_STATUSES)}")
            if current.status == "closed":
                raise RegisterError("a closed incident cannot change status")
            changes["status"] = status
            if status == "notified":
                changes["notified_ms"] = _time("notified", notified, now)
            elif status == "closed":
                changes["closed_ms"] = now
            action = status
        return self._save_incident(replace(current, **changes), actor=actor, action=action, reason=reason)

    # -- data-subject requests --
    @staticmethod
    def _request(d: dict[str, Any]) -> SubjectRequest:
        return SubjectRequest(d["id"], d["type"], d["subject"], d["received_ms"], d["created_ms"], d["status"],
                              d.get("patient"), d.get("extension_reason"), d.get("closed_ms"), d.get("outcome"),
                              tuple(Note(n["at"], n["by"], n["text"]) for n in d.get("notes", ())))

    def _save_request(self, r: SubjectRequest, *, actor: str, action: str, reason: str,
                      new: bool = False) -> SubjectRequest:
        body = {"id": r.id, "type": r.type, "subject": r.subject, "received_ms": r.received_ms,
                "created_ms": r.created_ms, "status": r.status, "patient": r.patient,
                "extension_reason": r.extension_reason, "closed_ms": r.closed_ms, "outcome": r.outcome,
                "notes": [{"at": n.at_ms, "by": n.by, "text": n.text} for n in r.notes]}
        due = r.due_ms if r.status in ("open", "extended") else None
        self._write(REQUEST, r.id, r.created_ms, r.status, due, body, actor=actor, action=action, reason=reason,
                    expect_new=new)
        return r

    def open_request(self, *, actor: str, type: str, subject: Any, reason: Any, received: Any = None,
                     patient: str | None = None) -> SubjectRequest:
        if type not in REQUEST_TYPES:
            raise RegisterError(f"type: one of {', '.join(REQUEST_TYPES)}")
        reason = _text("reason", reason, minimum=MIN_REASON)
        if patient is not None and not re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", patient):
            raise RegisterError("patient: expected Patient/<id>")
        now = self._c.clock.now_ms()
        request = SubjectRequest("dsr-" + secrets.token_hex(8), type, _text("subject", subject, minimum=2),
                                 _time("received", received, now), now, patient=patient,
                                 notes=(Note(now, actor, reason),))
        return self._save_request(request, actor=actor, action="received", reason=reason, new=True)

    def request(self, request_id: str) -> SubjectRequest:
        row = self._c.store.register_entry(self._tenant, REQUEST, request_id) if _ID.match(request_id) else None
        if row is None:
            raise NotFound(f"no request {request_id}")
        return self._request(self._open(row))

    def requests(self, status: str | None = None) -> list[SubjectRequest]:
        return [self._request(self._open(r)) for r in self._c.store.register_entries(self._tenant, REQUEST,
                                                                                       status=status)]

    def update_request(self, request_id: str, *, actor: str, reason: Any, status: str | None = None,
                       outcome: str | None = None) -> SubjectRequest:
        """A note (``reason``); ``status="extended"`` extends the deadline by two months (once, the reason
        is the justification given to the person); done/refused close it (``outcome``)."""
        reason = _text("reason", reason, minimum=MIN_REASON)
        current = self.request(request_id)
        now = self._c.clock.now_ms()
        changes: dict[str, Any] = {"notes": (*current.notes, Note(now, actor, reason))}
        action = "noted"
        if status is not None and status != current.status:
            if status not in REQUEST_STATUSES or status == "open":
                raise RegisterError("status: extended, done or refused")
            if current.status in ("done", "refused"):
                raise RegisterError("a closed request cannot change status")
            if status == "extended":
                changes["extension_reason"] = reason
            else:
                changes["closed_ms"] = now
                changes["outcome"] = _text("outcome", outcome or reason)
            changes["status"] = status
            action = status
        elif status == "extended":
            raise RegisterError("the deadline was already extended (once only: two further months)")
        return self._save_request(replace(current, **changes), actor=actor, action=action, reason=reason)


# -- generated registers ----------------------------------------------------------------------------------

CLINICAL_CONTEXTS = ("system", "user", "patient")


def has_clinical_scopes(scope: str) -> bool:
    """Whether a scope string grants any FHIR resource access (anything but operational scopes)."""
    from fhirvault.domain.scopes import ScopeError, parse_scopes

    try:
        return bool(parse_scopes(scope))
    except ScopeError:
        return True  # unparsable: treat as clinical (deny by default)


def client_rows(container: Container) -> list[dict[str, Any]]:
    """Every client with its scopes and, for backend clients, the owner and purpose given at creation."""
    from fhirvault.services.client_owners import owner_of

    out = []
    for c in container.store.clients(container.settings.tenant):
        app = container.store.app(c.client_id)
        owner = owner_of(container.store, c.client_id)
        out.append({"client_id": c.client_id, "name": c.name, "kind": "smart-app" if app else "service",
                    "scope": c.scopes, "clinical": has_clinical_scopes(c.scopes), "disabled": c.disabled,
                    "owner": owner.owner if owner else None, "purpose": owner.purpose if owner else None})
    return out


def actors_register(container: Container) -> list[dict[str, Any]]:
    """Art. 28: each configured actor with what it can reach (clients' scopes, destinations it runs)."""
    from fhirvault.services.residency import destinations

    clients = {c["client_id"]: c for c in client_rows(container)}
    dests = destinations(container.settings)
    out = []
    for a in container.settings.actors:
        reach = [{"client": cid, "scope": clients[cid]["scope"] if cid in clients else None,
                  "registered": cid in clients} for cid in a.clients]
        hosts = [d.to_json() for d in dests if d.host is not None and d.host in a.hosts]
        out.append({"name": a.name, "role": a.role, "country": a.country, "contract": a.contract,
                    "contact": a.contact, "clients": reach, "destinations": hosts})
    return out


def record_of_processing(container: Container) -> dict[str, Any]:
    """Art. 30(1), generated from the configuration and the instance (nothing typed twice)."""
    from fhirvault.domain.r4 import resource_types
    from fhirvault.services.residency import destinations

    s = container.settings
    p = s.processing or ProcessingSettings()
    counts = {t: n for t in sorted(resource_types()) if (n := container.store.count_current(s.tenant, t))}
    recipients = [c for c in client_rows(container) if not c["disabled"]]
    dests = [d.to_json() for d in destinations(s)]
    retention: dict[str, Any] = {"backups": None, "clinical_records": (getattr(s, "retention", None) and
                                 repr(getattr(s, "retention", None))) or "not configured"}
    if s.backup is not None:
        r = s.backup.retention
        retention["backups"] = (f"every backup {r.keep_all_days} days, daily {r.daily_days} days, monthly"
                                f" {r.monthly_months} months")
    return {
        "controller": p.controller, "dpo_contact": p.dpo_contact, "purposes": list(p.purposes),
        "legal_basis": p.legal_basis, "data_subjects": list(p.data_subjects),
        "data_categories": {"health data (art. 9)": counts, "identification": ["Patient", "Practitioner"]
                            if counts.get("Patient") or counts.get("Practitioner") else []},
        "recipients": recipients,
        "processors": [{"name": a.name, "role": a.role, "country": a.country, "contract": a.contract}
                       for a in s.actors],
        "transfers_outside_eea": [d for d in dests if d["eea"] is False],
        "destinations": dests,
        "retention": retention,
        "security_measures": security_measures(container),
        "mode": s.mode,
    }


def security_measures(container: Container) -> list[str]:
    """The technical measures actually enabled on this instance (art. 32), each stated from settings."""
    s = container.settings
    out = ["encryption at rest: AES-256-GCM, per-patient data keys under a tenant key and a root key",
           "tamper-evident audit log (Merkle tree, signed checkpoints, "
           f"{len(s.audit_witness_specs)} witness(es), full verification every {s.audit_verify_hours} h)",
           f"sessions end after {s.session_idle_minutes} min idle, {s.session_max_hours} h at most",
           f"access tokens live {s.token_ttl_seconds} s"]
    out.append("TLS served by fhirvault" if s.tls_cert is not None else
               "TLS: not served by fhirvault (expected at a reverse proxy)")
    if s.audit_hash_source_ips:
        out.append("source IP addresses stored as keyed hashes (minimisation)")
    if s.backup is not None and s.backup.targets:
        out.append(f"encrypted backups to {len(s.backup.targets)} target(s)" +
                   (f", every {s.backup.schedule.interval_seconds // 60} min" if s.backup.schedule.interval_seconds
                    else "") + (", restore drills" if s.backup.drill_interval_seconds else ""))
    out.append("detection rules and alerting" + (f" to {len(s.alerts.sinks)} sink(s)" if s.alerts else ""))
    out.append("outbound connections limited to the configured destinations")
    return out


__all__ = ["INCIDENT", "REQUEST", "REQUEST_TYPES", "ActorSettings", "Incident", "NotFound", "ProcessingSettings",
           "RegisterError", "RegisterService", "SubjectRequest", "actors_register", "add_months", "client_rows",
           "has_clinical_scopes", "parse_actors", "parse_processing", "record_of_processing", "security_measures"]
