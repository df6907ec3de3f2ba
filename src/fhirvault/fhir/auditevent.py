"""Audit records → FHIR R4 AuditEvents following IHE BALP (Basic Audit Log Patterns).

The trail stores compact encrypted records (``services.audit.AuditRecord``); the
AuditEvent is built when the trail is read, so the mapping can evolve without
rewriting the log. Two views:

* ``to_audit_event``: the auditor's view, everything the record holds (who,
  from where, which patient, what, the query, the request id);
* ``to_patient_view``: what a patient sees of accesses to their own record —
  role and organisation (the person only if the deployment says so), what,
  when, why; no network address, request id or query text.

Codes: DICOM (DCM) event types and subtypes, FHIR restful-interaction,
audit-entity-type, object-role; mapping table in docs/audit.md.
"""

from __future__ import annotations

import base64
from typing import Any

from fhirvault.domain.instants import instant
from fhirvault.services.audit_query import audit_event_id, patients_of

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
CLIENT_SYSTEM = "urn:fhirvault:client"
USER_SYSTEM = "urn:fhirvault:user"
ROLE_SYSTEM = "urn:fhirvault:role"
ORGANIZATION_SYSTEM = "urn:fhirvault:organization"
INTERACTION_SYSTEM = "urn:fhirvault:audit-interaction"  # subtype of events no standard code fits

_ACTION_DISPLAY = {"C": "Create", "R": "Read/View/Print", "U": "Update", "D": "Delete", "E": "Execute"}
_OUTCOME_DISPLAY = {"0": "Success", "4": "Minor failure", "8": "Serious failure", "12": "Major failure"}

# FHIR REST interactions: record interaction → restful-interaction subtype codes. BALP's
# Query profile uses the generic "search"; "search-type" says which kind it was.
REST_SUBTYPES: dict[str, tuple[str, ...]] = {
    "read": ("read",), "vread": ("vread",), "update": ("update",), "patch": ("patch",),
    "delete": ("delete",), "create": ("create",), "search": ("search", "search-type"),
    "history-instance": ("history-instance",), "history-type": ("history-type",),
    "history-system": ("history-system",), "operation": ("operation",), "transaction": ("transaction",),
    "batch": ("batch",), "capabilities": ("capabilities",), "export": ("operation",),
}
# BALP profile by interaction (Patient* when a patient is named).
_PROFILES = {"create": "Create", "read": "Read", "vread": "Read", "update": "Update", "patch": "Update",
             "delete": "Delete", "search": "Query"}

# Security and system events: interaction → (DCM event type, DCM subtype or None).
SECURITY_EVENTS: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "token": (("110114", "User Authentication"), ("110122", "Login")),
    "authenticate": (("110114", "User Authentication"), ("110122", "Login")),
    "login": (("110114", "User Authentication"), ("110122", "Login")),
    "mfa": (("110114", "User Authentication"), ("110122", "Login")),
    "logout": (("110114", "User Authentication"), ("110123", "Logout")),
    "token-revoke": (("110114", "User Authentication"), ("110123", "Logout")),
    "break-glass-start": (("110113", "Security Alert"), ("110127", "Emergency Override Started")),
    "break-glass-end": (("110113", "Security Alert"), ("110138", "Emergency Override Stopped")),
    "access-refused": (("110113", "Security Alert"), ("110132", "Use of Restricted Function")),
    "config": (("110113", "Security Alert"), ("110131", "Software Configuration")),
    "key-rotation": (("110113", "Security Alert"), ("110129", "Security Configuration")),
    "key-change": (("110113", "Security Alert"), ("110129", "Security Configuration")),
    "role-change": (("110113", "Security Alert"), ("110136", "Security Roles Changed")),
    "user-change": (("110113", "Security Alert"), ("110137", "User Security Attributes Changed")),
    "audit-verify": (("110101", "Audit Log Used"), None),
    "backup": (("110106", "Export"), None),
    "restore": (("110107", "Import"), None),
    "start": (("110100", "Application Activity"), ("110120", "Application Start")),
    "stop": (("110100", "Application Activity"), ("110121", "Application Stop")),
}
_DEFAULT_BY_CATEGORY = {"security": ("110114", "User Authentication"), "system": ("110100", "Application Activity")}
# Purposes that mean an emergency access (break-the-glass).
EMERGENCY_PURPOSES = frozenset({"BTG", "ETREAT", "ERTREAT"})


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _str(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    return value if isinstance(value, str) and value else None


def _event_type(record: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, str]]]:
    interaction = _str(record, "interaction") or "unknown"
    category = _str(record, "category") or "rest"
    if category == "rest" and interaction in REST_SUBTYPES:
        return (_coding(EVENT_TYPE, "rest", "RESTful Operation"),
                [_coding(INTERACTION, code) for code in REST_SUBTYPES[interaction]])
    known = SECURITY_EVENTS.get(interaction)
    if known is not None:
        (tcode, tdisplay), sub = known
        return _coding(DCM, tcode, tdisplay), ([_coding(DCM, *sub)] if sub else [])
    if category == "rest":
        return _coding(EVENT_TYPE, "rest", "RESTful Operation"), [_coding(INTERACTION_SYSTEM, interaction)]
    tcode, tdisplay = _DEFAULT_BY_CATEGORY.get(category, _DEFAULT_BY_CATEGORY["system"])
    return _coding(DCM, tcode, tdisplay), [_coding(INTERACTION_SYSTEM, interaction)]


def _purpose(record: dict[str, Any]) -> list[dict[str, Any]]:
    purpose = _str(record, "purpose_of_use")
    if purpose is None:
        emergency = str(record.get("interaction", "")).startswith("break-glass")
        return [{"coding": [_coding(ACT_REASON, "BTG", "break the glass")]}] if emergency else []
    codings = [_coding(ACT_REASON, purpose)]
    if purpose in EMERGENCY_PURPOSES and purpose != "BTG":
        codings.append(_coding(ACT_REASON, "BTG", "break the glass"))
    return [{"coding": codings}]


def _client_who(record: dict[str, Any]) -> dict[str, Any]:
    client = _str(record, "client_id")
    if client is None:
        return {"display": "unauthenticated client"}
    return {"identifier": {"system": CLIENT_SYSTEM, "value": client}}


def _agents(record: dict[str, Any], server_id: str, base_url: str | None, rest: bool) -> list[dict[str, Any]]:
    user, role = _str(record, "user"), _str(record, "role")
    purpose = _purpose(record)
    client: dict[str, Any] = {
        # BALP: the client is the Source Role of a REST exchange; otherwise an Application.
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID") if rest else _coding(DCM, "110150", "Application")]},
        "who": _client_who(record),
        "requestor": user is None,  # BALP: the user, when known, is the requestor
    }
    if role and user is None:
        client["role"] = [{"coding": [_coding(ROLE_SYSTEM, role)]}]
    if ip := _str(record, "source_ip"):
        client["network"] = {"address": ip, "type": "2"}
    if purpose and user is None:
        client["purposeOfUse"] = purpose
    agents = [client]
    if user is not None:
        person: dict[str, Any] = {
            "type": {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]},
            "who": {"identifier": {"system": USER_SYSTEM, "value": user}},
            "requestor": True,
        }
        if role:
            person["role"] = [{"coding": [_coding(ROLE_SYSTEM, role)]}]
        if purpose:
            person["purposeOfUse"] = purpose
        agents.append(person)
    if rest:
        server: dict[str, Any] = {
            "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
            "who": {"display": server_id},
            "requestor": False,
        }
        if base_url:
            server["network"] = {"address": base_url, "type": "5"}
        agents.append(server)
    return agents


def _data_entity(entity: str) -> dict[str, Any]:
    """The resource acted on: ``Type/id[/_history/n]``, ``Type/id/$op``, or a bare type."""
    ref, _, operation = entity.partition("/$")
    parts = ref.split("/")
    out: dict[str, Any]
    if len(parts) == 1:  # type-level: searches, type history
        out = {"type": _coding(RESOURCE_TYPES, parts[0])}
    else:
        out = {"what": {"reference": ref}, "type": _coding(ENTITY_TYPE, "2", "System Object"),
               "role": _coding(OBJECT_ROLE, "4", "Domain Resource")}
    if operation:
        out["description"] = "$" + operation
    return out


def _patient_entity(ref: str) -> dict[str, Any]:
    return {"what": {"reference": ref}, "type": _coding(ENTITY_TYPE, "1", "Person"),
            "role": _coding(OBJECT_ROLE, "1", "Patient")}


def _entities(record: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if entity := _str(record, "entity"):
        out.append(_data_entity(entity))
    out.extend(_patient_entity(p) for p in patients_of(record))
    if query := _str(record, "query"):
        q: dict[str, Any] = {"type": _coding(ENTITY_TYPE, "2", "System Object"),
                             "role": _coding(OBJECT_ROLE, "24", "Query"),
                             "query": base64.b64encode(query.encode()).decode("ascii")}
        if isinstance(count := record.get("result_count"), int):
            q["detail"] = [{"type": "result-count", "valueString": str(count)}]
        out.append(q)
    if request_id := _str(record, "request_id"):
        out.append({"what": {"identifier": {"value": request_id}},
                    "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id")})
    return out


def _outcome(record: dict[str, Any]) -> tuple[str, str | None]:
    outcome = str(record.get("outcome") or "0")
    if outcome not in _OUTCOME_DISPLAY:
        outcome = "8"
    if outcome == "0":
        return outcome, None  # detail of a success (e.g. "token issued to …") is not needed
    status, detail = record.get("status"), _str(record, "detail")
    text = f"HTTP {status}" if isinstance(status, int) else "failed"
    return outcome, f"{text}: {detail}" if detail else text


def to_audit_event(seq: int, record: dict[str, Any], *, server_id: str, base_url: str | None) -> dict[str, Any]:
    """The full (auditor's) AuditEvent of one trail record."""
    ts = instant(int(record.get("ts_ms") or 0))
    event_type, subtypes = _event_type(record)
    rest = event_type["system"] == EVENT_TYPE
    action = str(record.get("action") or "E")
    outcome, outcome_desc = _outcome(record)
    meta: dict[str, Any] = {"versionId": "1", "lastUpdated": ts}
    interaction = _str(record, "interaction") or ""
    if rest and interaction in _PROFILES:
        meta["profile"] = [BALP_PROFILE + ("Patient" if patients_of(record) else "") + _PROFILES[interaction]]
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": audit_event_id(seq), "meta": meta,
                             "type": event_type}
    if subtypes:
        event["subtype"] = subtypes
    event["action"] = action if action in _ACTION_DISPLAY else "E"
    event["recorded"] = ts
    event["outcome"] = outcome
    if outcome_desc:
        event["outcomeDesc"] = outcome_desc
    if purpose := _purpose(record):
        event["purposeOfEvent"] = purpose
    event["agent"] = _agents(record, server_id, base_url, rest)
    source: dict[str, Any] = {"observer": {"display": server_id},
                              "type": [_coding(SOURCE_TYPE, "4", "Application Server")]}
    if base_url:
        source["site"] = base_url
    event["source"] = source
    if entities := _entities(record):
        event["entity"] = entities
    return event


def to_patient_view(seq: int, record: dict[str, Any], patient: str, *, server_id: str,
                    show_names: bool) -> dict[str, Any]:
    """What ``patient`` (``Patient/x``) sees of one access to their record: who (role,
    organisation), what, when, why. Other patients named by the same record are left out."""
    ts = instant(int(record.get("ts_ms") or 0))
    event_type, subtypes = _event_type(record)
    outcome, _ = _outcome(record)
    user, role = _str(record, "user"), _str(record, "role")
    agent: dict[str, Any] = {"requestor": True}
    if role:
        agent["role"] = [{"coding": [_coding(ROLE_SYSTEM, role)]}]
    who: dict[str, Any] = {}
    if user and show_names:
        who["identifier"] = {"system": USER_SYSTEM, "value": user}
    if org := _str(record, "organization"):
        who["display"] = org
    elif client := _str(record, "client_id"):
        # No organisation recorded yet: the application that accessed, by its client id.
        who.setdefault("identifier", {"system": CLIENT_SYSTEM, "value": client})
    else:
        who["display"] = "unauthenticated client"
    agent["who"] = who
    if purpose := _purpose(record):
        agent["purposeOfUse"] = purpose
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": audit_event_id(seq),
                             "meta": {"versionId": "1", "lastUpdated": ts}, "type": event_type}
    if subtypes:
        event["subtype"] = subtypes
    action = str(record.get("action") or "E")
    event["action"] = action if action in _ACTION_DISPLAY else "E"
    event["recorded"] = ts
    event["outcome"] = outcome
    if purpose:
        event["purposeOfEvent"] = purpose
    event["agent"] = [agent]
    event["source"] = {"observer": {"display": server_id}}
    entities: list[dict[str, Any]] = []
    entity = _str(record, "entity")
    if entity and (not entity.startswith("Patient/") or patients_of({"entity": entity}) == [patient]):
        entities.append(_data_entity(entity))
    entities.append(_patient_entity(patient))
    event["entity"] = entities
    return event


def is_emergency(record: dict[str, Any]) -> bool:
    """Break-the-glass: an emergency purpose of use, or the break-the-glass events themselves."""
    return (record.get("purpose_of_use") in EMERGENCY_PURPOSES
            or str(record.get("interaction", "")).startswith("break-glass"))
