"""Audit records → BALP AuditEvents: codes per interaction kind, validity, nothing beyond references."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from fhirvault.domain.validation import Validator
from fhirvault.fhir.auditevent import DCM, EVENT_TYPE, INTERACTION, to_audit_event, to_patient_view
from fhirvault.services.audit import AuditRecord

TS = 1_795_000_000_123  # 2026-11-18T11:06:40.123Z
SERVER = "urn:fhirvault:test-instance"
BASE = "https://fhir.example.org/fhir"


def record(interaction: str, status: int = 200, **fields: Any) -> dict[str, Any]:
    """The decrypted form of an AuditRecord, as the trail hands it over."""
    outcome = "0" if status < 400 else "4" if status < 500 else "8"
    rec = AuditRecord(ts_ms=TS, interaction=interaction, outcome=outcome, status=status, request_id="req-1",
                      client_id="app-1", source_ip="192.0.2.7", **fields)
    data = orjson.loads(rec.to_json())
    assert isinstance(data, dict)
    return data


def event(rec: dict[str, Any], seq: int = 42) -> dict[str, Any]:
    ev = to_audit_event(seq, rec, server_id=SERVER, base_url=BASE)
    assert Validator.default().validate(ev) == [], ev
    return ev


def coding(c: dict[str, Any]) -> tuple[str, str]:
    return c["system"], c["code"]


def entity_by_role(ev: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [e for e in ev.get("entity", []) if e.get("role", {}).get("code") == code]


REST_CASES = [
    ("create", 201, "C", ["create"], "Observation/o1/_history/1", "PatientCreate"),
    ("read", 200, "R", ["read"], "Observation/o1/_history/3", "PatientRead"),
    ("vread", 200, "R", ["vread"], "Observation/o1/_history/2", "PatientRead"),
    ("update", 200, "U", ["update"], "Observation/o1/_history/4", "PatientUpdate"),
    ("patch", 200, "U", ["patch"], "Observation/o1/_history/5", "PatientUpdate"),
    ("delete", 204, "D", ["delete"], "Observation/o1/_history/6", "PatientDelete"),
    ("history-instance", 200, "R", ["history-instance"], "Observation/o1", None),
]


@pytest.mark.parametrize(("interaction", "status", "action", "subtypes", "entity", "profile"), REST_CASES)
def test_rest_interactions(interaction: str, status: int, action: str, subtypes: list[str], entity: str,
                           profile: str | None) -> None:
    ev = event(record(interaction, status, entity=entity, patient="Patient/p1"))
    assert ev["id"] == "audit-42"
    assert coding(ev["type"]) == (EVENT_TYPE, "rest")
    assert [coding(c) for c in ev["subtype"]] == [(INTERACTION, s) for s in subtypes]
    assert ev["action"] == action
    assert ev["outcome"] == "0" and "outcomeDesc" not in ev
    assert ev["recorded"] == ev["meta"]["lastUpdated"] == "2026-11-18T11:06:40.123Z"
    data = entity_by_role(ev, "4")
    assert [e["what"]["reference"] for e in data] == [entity]
    patients = entity_by_role(ev, "1")
    assert [(e["what"]["reference"], e["type"]["code"]) for e in patients] == [("Patient/p1", "1")]
    if profile:
        assert ev["meta"]["profile"] == [f"https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.{profile}"]
    else:
        assert "profile" not in ev["meta"]


def test_agents_source_and_request_id() -> None:
    ev = event(record("read", entity="Patient/p1/_history/1", patient="Patient/p1"))
    client, server = ev["agent"]
    assert client["who"] == {"identifier": {"system": "urn:fhirvault:client", "value": "app-1"}}
    assert client["requestor"] is True
    assert client["network"] == {"address": "192.0.2.7", "type": "2"}
    assert coding(client["type"]["coding"][0]) == (DCM, "110153")
    assert coding(server["type"]["coding"][0]) == (DCM, "110152") and server["requestor"] is False
    assert ev["source"]["observer"] == {"display": SERVER}
    assert ev["source"]["type"][0]["code"] == "4"
    request = [e for e in ev["entity"] if e["type"]["code"] == "XrequestId"]
    assert request == [{"what": {"identifier": {"value": "req-1"}},
                        "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                                 "code": "XrequestId", "display": "X-Request-Id"}}]
    # reading a Patient names it twice, as BALP PatientRead does: the data and the patient
    assert ev["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")


def test_user_role_and_purpose_of_use() -> None:
    ev = event(record("read", entity="Observation/o1/_history/1", patient="Patient/p1", user="dr-house",
                      role="practitioner", purpose_of_use="ETREAT"))
    client, user, _server = ev["agent"]
    assert client["requestor"] is False and user["requestor"] is True
    assert user["who"]["identifier"] == {"system": "urn:fhirvault:user", "value": "dr-house"}
    assert user["role"][0]["coding"][0]["code"] == "practitioner"
    purposes = [c["code"] for c in user["purposeOfUse"][0]["coding"]]
    assert purposes == ["ETREAT", "BTG"]  # an emergency treatment is flagged as break-the-glass
    assert [c["code"] for c in ev["purposeOfEvent"][0]["coding"]] == ["ETREAT", "BTG"]


def test_search_has_the_query_base64_and_the_result_count() -> None:
    query = "subject=Patient%2Fp1&code=8867-4"
    ev = event(record("search", entity="Observation", patient="Patient/p1,Patient/p2", query=query, result_count=3))
    assert [c["code"] for c in ev["subtype"]] == ["search", "search-type"]
    assert ev["action"] == "E"
    assert ev["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientQuery")
    (q,) = entity_by_role(ev, "24")
    assert base64.b64decode(q["query"]).decode() == query
    assert q["detail"] == [{"type": "result-count", "valueString": "3"}]
    assert "name" not in q  # sev-1: a query or a name, not both
    searched = [e for e in ev["entity"] if e["type"].get("system") == "http://hl7.org/fhir/resource-types"]
    assert [e["type"]["code"] for e in searched] == ["Observation"]
    assert sorted(e["what"]["reference"] for e in entity_by_role(ev, "1")) == ["Patient/p1", "Patient/p2"]


def test_operation_names_the_operation() -> None:
    ev = event(record("operation", entity="Patient/p1/$everything", patient="Patient/p1", query="_type=*"))
    assert [c["code"] for c in ev["subtype"]] == ["operation"]
    (data,) = entity_by_role(ev, "4")
    assert data["what"]["reference"] == "Patient/p1" and data["description"] == "$everything"


def test_refusal_has_outcome_description() -> None:
    ev = event(record("read", 403, entity="Patient/p1", detail="scope does not allow 'r' on Patient"))
    assert ev["outcome"] == "4"
    assert ev["outcomeDesc"] == "HTTP 403: scope does not allow 'r' on Patient"
    # the refused target is still known to be about that patient
    assert [e["what"]["reference"] for e in entity_by_role(ev, "1")] == ["Patient/p1"]
    assert event(record("search", 500))["outcome"] == "8"


@pytest.mark.parametrize(("interaction", "category", "type_code", "subtype"), [
    ("token", "rest", "110114", "110122"),
    ("authenticate", "rest", "110114", "110122"),
    ("login", "security", "110114", "110122"),
    ("mfa", "security", "110114", "110122"),
    ("logout", "security", "110114", "110123"),
    ("token-revoke", "security", "110114", "110123"),
    ("break-glass-start", "security", "110113", "110127"),
    ("break-glass-end", "security", "110113", "110138"),
    ("key-rotation", "system", "110113", "110129"),
    ("config", "system", "110113", "110131"),
    ("backup", "system", "110106", None),
    ("restore", "system", "110107", None),
])
def test_security_and_system_events(interaction: str, category: str, type_code: str, subtype: str | None) -> None:
    ev = event(record(interaction, category=category))
    assert coding(ev["type"]) == (DCM, type_code)
    assert [coding(c) for c in ev.get("subtype", [])] == ([(DCM, subtype)] if subtype else [])
    assert ev["action"] == "E"
    (client,) = ev["agent"]  # no server agent outside REST exchanges
    assert coding(client["type"]["coding"][0]) == (DCM, "110150")
    if interaction.startswith("break-glass"):
        assert ev["purposeOfEvent"][0]["coding"][0]["code"] == "BTG"


def test_unknown_events_keep_their_name_in_a_local_subtype() -> None:
    ev = event(record("frobnicate", category="system"))
    assert coding(ev["type"]) == (DCM, "110100")
    assert [coding(c) for c in ev["subtype"]] == [("urn:fhirvault:audit-interaction", "frobnicate")]
    ev = event(record("frobnicate"))
    assert coding(ev["type"]) == (EVENT_TYPE, "rest")


def test_unauthenticated_request_has_an_agent_without_identity() -> None:
    rec = record("authenticate", 401, detail="no access token")
    del rec["client_id"]
    ev = event(rec)
    assert ev["agent"][0]["who"] == {"display": "unauthenticated client"}
    assert ev["outcomeDesc"] == "HTTP 401: no access token"


def test_success_detail_is_not_shown() -> None:
    ev = event(record("token", detail="token issued to app-1"))
    assert "outcomeDesc" not in ev


def test_only_references_and_codes_leave_the_record() -> None:
    """Every string of the event is a code, a reference, the query, or the record's own fields."""
    rec = record("search", entity="Observation", patient="Patient/p1", query="code=8867-4", result_count=1,
                 user="u1", role="nurse", purpose_of_use="TREAT")
    ev = event(rec)
    allowed_keys = {"resourceType", "id", "meta", "versionId", "lastUpdated", "profile", "type", "subtype",
                    "action", "recorded", "outcome", "purposeOfEvent", "agent", "source", "entity", "system",
                    "code", "display", "coding", "who", "identifier", "value", "requestor", "network",
                    "address", "role", "purposeOfUse", "observer", "site", "what", "reference", "query",
                    "detail", "valueString"}

    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        if isinstance(node, list):
            return {k for v in node for k in keys(v)}
        return set()

    assert keys(ev) <= allowed_keys


def test_patient_view_is_reduced() -> None:
    rec = record("search", entity="Observation", patient="Patient/p1,Patient/p2", query="subject=Patient%2Fp1",
                 user="dr-house", role="practitioner", purpose_of_use="TREAT", result_count=2)
    view = to_patient_view(7, rec, "Patient/p1", server_id=SERVER, show_names=False)
    assert Validator.default().validate(view) == []
    text = orjson.dumps(view).decode()
    for hidden in ("192.0.2.7", "req-1", "dr-house", "Patient/p2", "subject"):
        assert hidden not in text
    (agent,) = view["agent"]
    assert agent["role"][0]["coding"][0]["code"] == "practitioner"
    assert agent["who"] == {"identifier": {"system": "urn:fhirvault:client", "value": "app-1"}}
    assert agent["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    assert view["recorded"] == "2026-11-18T11:06:40.123Z"
    named = to_patient_view(7, rec, "Patient/p1", server_id=SERVER, show_names=True)
    assert named["agent"][0]["who"]["identifier"] == {"system": "urn:fhirvault:user", "value": "dr-house"}
    org = to_patient_view(7, dict(rec, organization="Hôpital Nord"), "Patient/p1", server_id=SERVER, show_names=False)
    assert org["agent"][0]["who"] == {"display": "Hôpital Nord"}


def test_patient_view_hides_another_patients_resource() -> None:
    rec = record("read", entity="Patient/p2/_history/1", patient="Patient/p1,Patient/p2")
    view = to_patient_view(8, rec, "Patient/p1", server_id=SERVER, show_names=False)
    assert [e["what"]["reference"] for e in view["entity"]] == ["Patient/p1"]
    btg = to_patient_view(9, record("read", entity="Patient/p1/_history/1", patient="Patient/p1",
                                    purpose_of_use="BTG"), "Patient/p1", server_id=SERVER, show_names=False)
    assert btg["purposeOfEvent"][0]["coding"][0]["code"] == "BTG"
    assert Validator.default().validate(btg) == []
