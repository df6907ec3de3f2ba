"""GET /fhir/AuditEvent and Patient/$access-history: the trail, queried through the FHIR API."""

from __future__ import annotations

import base64
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirvault.domain.validation import Validator
from tests.conftest import PATIENT, App, get_token, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _create(app: App, resource: dict[str, Any]) -> str:
    r = app.client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _search(app: App, query: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else app.auth
    r = app.client.get(f"/fhir/AuditEvent?{query}", headers=headers)
    assert r.status_code == 200, r.text
    bundle: dict[str, Any] = r.json()
    assert bundle["type"] == "searchset"
    return bundle


def _events(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def _subtypes(event: dict[str, Any]) -> set[str]:
    return {c["code"] for c in event.get("subtype", [])}


def _refs(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})}


def _scenario(app: App) -> tuple[str, str, str]:
    """Two patients; reads, a search and a refusal about the first one."""
    a = _create(app, PATIENT)
    b = _create(app, dict(PATIENT, gender="male"))
    obs = _create(app, observation(a))
    assert app.client.get(f"/fhir/Patient/{a}", headers=app.auth).status_code == 200
    assert app.client.get(f"/fhir/Observation/{obs}", headers=app.auth).status_code == 200
    assert app.client.get(f"/fhir/Observation?subject=Patient/{a}", headers=app.auth).status_code == 200
    assert app.client.get(f"/fhir/Patient/{b}", headers=app.auth).status_code == 200
    reader = get_token(app.client, app.creds, "system/Observation.rs")
    refused = app.client.get(f"/fhir/Patient/{a}", headers={"Authorization": f"Bearer {reader}"})
    assert refused.status_code == 403
    return a, b, obs


def test_search_by_patient_gives_exactly_its_accesses(app: App) -> None:
    a, b, obs = _scenario(app)
    events = _events(_search(app, f"patient=Patient/{a}&_count=100"))
    kinds = [(ev["action"], sorted(_subtypes(ev)), ev["outcome"]) for ev in events]
    # newest first: refused read, search, read of the observation, read, create obs, create patient
    assert kinds == [
        ("R", ["read"], "4"),
        ("E", ["search", "search-type"], "0"),
        ("R", ["read"], "0"),
        ("R", ["read"], "0"),
        ("C", ["create"], "0"),
        ("C", ["create"], "0"),
    ]
    assert all(f"Patient/{a}" in _refs(ev) for ev in events)
    assert not any(f"Patient/{b}" in _refs(ev) for ev in events)
    assert f"Observation/{obs}/_history/1" in _refs(events[2])
    # the bare id works as well, and so does the absolute URL
    assert len(_events(_search(app, f"patient={a}&_count=100"))) == 6 + 1  # + the previous trail search
    validator = Validator.default()
    for ev in events:
        assert validator.validate(ev) == [], ev


def test_search_by_agent_action_outcome_and_date(app: App) -> None:
    a, _, _ = _scenario(app)
    client = app.creds["client_id"]
    refused = _events(_search(app, "outcome=4"))
    # the 403 read; the token requests themselves succeeded
    assert [sorted(_subtypes(ev)) for ev in refused] == [["read"]]
    assert refused[0]["outcomeDesc"].startswith("HTTP 403")
    creates = _events(_search(app, f"action=C&agent={client}"))
    assert len(creates) == 3 and all(ev["action"] == "C" for ev in creates)
    assert _events(_search(app, "agent=nobody")) == []
    both = _events(_search(app, "action=C,D&outcome=0&_count=50"))
    assert len(both) == 3
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert len(_events(_search(app, f"date={today}&action=C"))) == 3
    assert _events(_search(app, "date=lt2000-01-01")) == []
    assert _events(_search(app, f"date=gt{today}")) == []
    later = _events(_search(app, f"date=ge{today}&entity=Patient/{a}&action=R"))
    assert [ev["outcome"] for ev in later] == ["4", "0"]


def test_paging_with_the_cursor_walks_the_whole_trail_once(app: App) -> None:
    _scenario(app)
    everything = _events(_search(app, "_count=1000&action=C,R"))
    seen: list[str] = []
    url: str | None = "/fhir/AuditEvent?action=C,R&_count=2"
    pages = 0
    while url:
        r = app.client.get(url, headers=app.auth)
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert len(bundle.get("entry", [])) <= 2
        seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = nxt[0].replace("http://testserver", "") if nxt else None
        pages += 1
    assert seen == [ev["id"] for ev in everything]
    assert pages == (len(everything) + 1) // 2
    oldest_first = _events(_search(app, "_count=1000&action=C,R&_sort=date"))
    assert [ev["id"] for ev in oldest_first] == list(reversed(seen))


def test_post_search_and_head(app: App) -> None:
    _scenario(app)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = app.client.post("/fhir/AuditEvent/_search?action=C", content=b"outcome=0&_count=50",
                        headers={**app.auth, **form})
    assert r.status_code == 200, r.text
    assert len(_events(r.json())) == 3
    assert app.client.head("/fhir/AuditEvent?action=C", headers=app.auth).status_code == 200


def test_read_one_audit_event(app: App) -> None:
    _scenario(app)
    first = _events(_search(app, "action=C&_sort=date&_count=1"))[0]
    r = app.client.get(f"/fhir/AuditEvent/{first['id']}", headers=app.auth)
    assert r.status_code == 200
    assert r.json() == first
    assert app.client.get("/fhir/AuditEvent/audit-999999", headers=app.auth).status_code == 404
    assert app.client.get("/fhir/AuditEvent/not-ours", headers=app.auth).status_code == 404


def test_search_event_carries_the_query_but_no_clear_values_elsewhere(app: App) -> None:
    a, _, _ = _scenario(app)
    search = [ev for ev in _events(_search(app, "action=E&_count=100")) if "search-type" in _subtypes(ev)]
    obs_search = next(ev for ev in search if any(e.get("type", {}).get("code") == "Observation"
                                                 for e in ev["entity"]))
    queries = [e["query"] for e in obs_search["entity"] if "query" in e]
    assert base64.b64decode(queries[0]).decode() == f"subject=Patient%2F{a}"
    text = str(obs_search)
    assert "Martin" not in text and "1984" not in text


def test_malformed_and_unknown_parameters_are_400(app: App) -> None:
    for query, param in (("foo=1", "foo"), ("date=yesterday", "date"), ("action=X", "action"),
                         ("outcome=3", "outcome"), ("_count=-1", "_count"), ("_sort=agent", "_sort"),
                         ("_cursor=zz", "_cursor"), ("patient:missing=true", "patient:missing")):
        r = app.client.get(f"/fhir/AuditEvent?{query}", headers=app.auth)
        assert r.status_code == 400, query
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["expression"] == [param], query


def test_scopes_are_enforced_and_refusals_audited(app: App) -> None:
    no_audit = get_token(app.client, app.creds, "system/Patient.rs")
    headers = {"Authorization": f"Bearer {no_audit}"}
    r = app.client.get("/fhir/AuditEvent", headers=headers)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert app.client.get("/fhir/AuditEvent/audit-1", headers=headers).status_code == 403
    assert app.client.get("/fhir/Patient/x/$access-history", headers=headers).status_code == 403
    read_only = get_token(app.client, app.creds, "system/AuditEvent.r")
    assert app.client.get("/fhir/AuditEvent", headers={"Authorization": f"Bearer {read_only}"}).status_code == 403
    assert app.client.get("/fhir/AuditEvent/audit-1", headers={"Authorization": f"Bearer {read_only}"}).status_code == 200
    search_only = get_token(app.client, app.creds, "system/AuditEvent.s")
    assert _search(app, "outcome=4", token=search_only)
    refusals = _events(_search(app, "outcome=4&_count=100"))
    entities = [next(e.get("what", {}).get("reference") or e["type"]["code"] for e in ev["entity"]) for ev in refusals]
    assert entities == ["AuditEvent", "Patient/x", "AuditEvent/audit-1", "AuditEvent"]


def test_writes_to_the_trail_are_refused(app: App) -> None:
    event = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-01T00:00:00Z",
             "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
    assert app.client.post("/fhir/AuditEvent", json=event, headers={**app.auth, **FHIR_JSON}).status_code == 405
    assert app.client.put("/fhir/AuditEvent/audit-1", json=dict(event, id="audit-1"),
                          headers={**app.auth, **FHIR_JSON}).status_code == 405
    assert app.client.delete("/fhir/AuditEvent/audit-1", headers=app.auth).status_code == 405
    assert app.client.patch("/fhir/AuditEvent/audit-1", json=[],
                            headers={**app.auth, "Content-Type": "application/json-patch+json"}).status_code == 405
    transaction = {"resourceType": "Bundle", "type": "transaction",
                   "entry": [{"resource": event, "request": {"method": "POST", "url": "AuditEvent"}}]}
    r = app.client.post("/fhir", json=transaction, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    batch = dict(transaction, type="batch")
    r = app.client.post("/fhir", json=batch, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"] == "405"
    # nothing reached the resource store, and every attempt is in the trail
    assert app.client.get("/fhir/AuditEvent/_history", headers=app.auth).status_code == 405
    attempts = _events(_search(app, "outcome=4&_count=100"))
    assert len(attempts) == 6
    assert all(ev["outcomeDesc"].startswith("HTTP 405") for ev in attempts)


def test_reading_the_trail_is_audited(app: App) -> None:
    a, _, _ = _scenario(app)
    before = _events(_search(app, f"patient={a}&_count=100"))
    after = _events(_search(app, f"patient={a}&_count=100"))
    assert len(after) == len(before) + 1
    newest = after[0]
    assert newest["action"] == "E" and "search-type" in _subtypes(newest)
    assert any(e.get("type", {}).get("code") == "AuditEvent" for e in newest["entity"])
    assert any(e.get("detail") == [{"type": "result-count", "valueString": str(len(before))}]
               for e in newest["entity"])
    one = app.client.get(f"/fhir/AuditEvent/{before[-1]['id']}", headers=app.auth)
    assert one.status_code == 200
    reads = _events(_search(app, f"entity=AuditEvent/{before[-1]['id']}"))
    assert len(reads) == 1 and reads[0]["action"] == "R"


def test_access_history_shows_accesses_to_that_patient_only(app: App) -> None:
    a, b, obs = _scenario(app)
    r = app.client.get(f"/fhir/Patient/{a}/$access-history", headers=app.auth)
    assert r.status_code == 200, r.text
    events = _events(r.json())
    assert [sorted(_subtypes(ev)) for ev in events] == [
        ["read"], ["search", "search-type"], ["read"], ["read"], ["create"], ["create"]]
    assert f"Observation/{obs}/_history/1" in _refs(events[2])  # what was accessed
    text = str(events)
    assert "testclient" not in text  # no source address
    assert f"Patient/{b}" not in text
    for ev in events:
        assert Validator.default().validate(ev) == [], ev
        assert len(ev["agent"]) == 1 and "network" not in ev["agent"][0]
        assert all("query" not in e and "identifier" not in e.get("what", {}) for e in ev["entity"])
        assert ev["agent"][0]["who"] == {"identifier": {"system": "urn:fhirvault:client",
                                                        "value": app.creds["client_id"]}}
    # paging and the date filter work there too; other parameters are refused
    first = app.client.get(f"/fhir/Patient/{a}/$access-history?_count=2&action=R", headers=app.auth).json()
    assert len(first["entry"]) == 2
    assert any(link["relation"] == "next" for link in first["link"])
    assert app.client.get(f"/fhir/Patient/{a}/$access-history?agent=x", headers=app.auth).status_code == 400
    # the access-history request itself is in the trail, about that patient
    ops = _events(_search(app, f"patient={a}&subtype=operation"))
    assert len(ops) == 2
    assert all(any(e.get("description") == "$access-history" for e in ev["entity"]) for ev in ops)
    assert len(_events(_search(app, f"patient={b}&subtype=operation"))) == 0


def test_capability_statement_lists_what_audit_event_supports(app: App) -> None:
    cs = app.client.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    audit = resources["AuditEvent"]
    assert [i["code"] for i in audit["interaction"]] == ["read", "search-type"]
    assert sorted(p["name"] for p in audit["searchParam"]) == [
        "action", "agent", "date", "entity", "outcome", "patient", "subtype"]
    assert "access-history" in [o["name"] for o in resources["Patient"]["operation"]]
    assert not any(i.startswith("AuditEvent:") for i in resources["Patient"].get("searchRevInclude", []))


_names = st.sampled_from(["patient", "agent", "date", "action", "outcome", "entity", "subtype", "_count", "_sort",
                          "_cursor", "patient:missing", "x", "_format"])
_values = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30) | st.sampled_from(
    ["ge2026", "Patient/x", "b1", "a9999999999999999999", "2026-02-30", "0,4", "C,", "http://testserver/fhir/Patient/x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_names, _values), max_size=4), st.sampled_from(["AuditEvent", "Patient/x/$access-history"]))
def test_hostile_trail_queries_never_500(app: App, params: list[tuple[str, str]], path: str) -> None:
    r = app.client.get(f"/fhir/{path}", params=params, headers=app.auth)
    assert r.status_code in (200, 400, 406), (params, r.text)
