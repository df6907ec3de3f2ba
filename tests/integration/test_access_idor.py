"""Cross-patient access (IDOR): a practitioner of patient A must learn nothing about patient B.

Through every interaction and search feature: search by _id, chains, _has, _include,
_revinclude, _total and _summary=count, history (instance, type, system), $everything,
batch and transaction entries, conditional create/update/delete, conditional read, and
the error messages themselves. Also: granular scopes, patient/ launch binding, consent
restrictions by class and by actor, restricted labels.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirvault.services.audit import AuditRecord
from tests.conftest import App
from tests.integration.authz_support import (
    FHIR_JSON,
    bearer,
    care_team,
    consent,
    labelled,
    mint,
    observation,
    patient,
    put,
)

DR = "Practitioner/dr-a"


@pytest.fixture
def env(app: App) -> dict[str, Any]:
    c, admin = app.client, app.auth
    put(c, admin, patient("pa", name=[{"family": "Alpha"}]))
    put(c, admin, patient("pb", name=[{"family": "Zebulon"}]))
    put(c, admin, care_team("pa", "team-a", DR))
    put(c, admin, observation("pa", "obs-a"))
    put(c, admin, {**observation("pa", "obs-a-lab", category="laboratory")})
    b_obs = observation("pb", "obs-b")
    b_obs["identifier"] = [{"system": "urn:secret", "value": "b-only"}]
    b_obs["performer"] = [{"reference": "Patient/pa"}]  # points at A: a _revinclude from A must not surface it
    put(c, admin, b_obs)
    a_obs = observation("pa", "obs-a-panel")
    a_obs["hasMember"] = [{"reference": "Observation/obs-b"}]  # an _include from A must not surface B's
    put(c, admin, a_obs)
    token = mint(app.container, role="practitioner", user="u-dr-a", fhir_user=DR)
    return {"h": bearer(token), "c": c, "admin": admin, "app": app}


def ids(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode") != "outcome"}


def get(env: dict[str, Any], url: str) -> Any:
    r = env["c"].get("/fhir/" + url, headers=env["h"])
    assert r.status_code == 200, r.text
    return r.json()


def test_read_of_another_patient_is_404_and_audited(env: dict[str, Any]) -> None:
    seen: list[AuditRecord] = []
    env["app"].container.audit.observers.append(seen.append)
    c, h = env["c"], env["h"]
    assert c.get("/fhir/Observation/obs-a", headers=h).status_code == 200
    for url in ("Observation/obs-b", "Patient/pb", "Observation/obs-b/_history/1", "Observation/obs-b/_history",
                "Patient/pb/$everything"):
        r = c.get("/fhir/" + url, headers=h)
        assert r.status_code == 404, (url, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
        assert "obs-b" not in r.text and "Zebulon" not in r.text
    # the same answer as a resource that does not exist: existence is not confirmed
    assert c.get("/fhir/Observation/nope", headers=h).json() == c.get("/fhir/Observation/obs-b", headers=h).json()
    refusals = [r for r in seen if r.status == 403]
    assert refusals and all(r.detail == "no care relationship" for r in refusals)
    assert {r.patient for r in refusals} == {"Patient/pb"}


def test_conditional_read_does_not_confirm(env: dict[str, Any]) -> None:
    r = env["c"].get("/fhir/Observation/obs-b", headers={**env["h"], "If-None-Match": 'W/"1"'})
    assert r.status_code == 404


def test_search_filters_every_form(env: dict[str, Any]) -> None:
    assert ids(get(env, "Observation?_id=obs-b")) == set()
    assert ids(get(env, "Observation?subject=Patient/pb")) == set()
    assert ids(get(env, "Observation?identifier=urn:secret|b-only")) == set()
    # chains: through a forbidden Patient reveal nothing; through an allowed one they work
    assert ids(get(env, "Observation?subject:Patient.name=Zebulon")) == set()
    assert "Observation/obs-a" in ids(get(env, "Observation?subject:Patient.name=Alpha"))
    # _has: only patients whose matching Observations the caller may see
    assert ids(get(env, "Patient?_has:Observation:patient:code=8867-4")) == {"Patient/pa"}
    assert ids(get(env, "Patient?_has:Observation:patient:identifier=urn:secret|b-only")) == set()
    # _include / _revinclude never add a forbidden resource
    assert "Observation/obs-b" not in ids(get(env, "Observation?_id=obs-a-panel&_include=Observation:has-member"))
    assert "Observation/obs-b" not in ids(get(env, "Patient?_id=pa&_revinclude=Observation:performer"))
    assert ids(get(env, "Patient?_id=pa&_revinclude=Observation:subject")) == {
        "Patient/pa", "Observation/obs-a", "Observation/obs-a-lab", "Observation/obs-a-panel"}


def test_totals_count_only_visible(env: dict[str, Any]) -> None:
    admin_total = env["c"].get("/fhir/Observation?code=8867-4&_total=accurate", headers=env["admin"]).json()["total"]
    assert admin_total == 4
    assert get(env, "Observation?code=8867-4&_total=accurate")["total"] == 3
    assert get(env, "Observation?code=8867-4&_summary=count")["total"] == 3
    assert get(env, "Observation?code=8867-4&_sort=-_lastUpdated")["total"] == 3
    assert get(env, "Patient?_summary=count")["total"] == 1


def test_history_filters(env: dict[str, Any]) -> None:
    assert "Observation/obs-b" not in ids(get(env, "Observation/_history"))
    assert ids(get(env, "_history")).isdisjoint({"Observation/obs-b", "Patient/pb"})
    assert "Observation/obs-a" in ids(get(env, "Observation/_history"))


def test_everything_of_own_patient_leaves_out_others(env: dict[str, Any]) -> None:
    found = ids(get(env, "Patient/pa/$everything"))
    assert "Patient/pa" in found and "Observation/obs-a" in found and "Observation/obs-b" not in found


def test_batch_and_transaction_entries_are_each_authorised(env: dict[str, Any]) -> None:
    c, h = env["c"], env["h"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/obs-b"}},
        {"request": {"method": "GET", "url": "Observation/obs-a"}},
        {"request": {"method": "GET", "url": "Observation?_id=obs-b"}},
        {"request": {"method": "POST", "url": "Observation"}, "resource": observation("pb", "x")},
    ]}
    out = c.post("/fhir", headers={**h, **FHIR_JSON}, json=batch).json()["entry"]
    # a write into B's compartment is refused like a read of it: 404 (issue #11)
    assert [e["response"]["status"][:3] for e in out] == ["404", "200", "200", "404"]
    assert out[2]["resource"].get("entry", []) == []
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": observation("pa", "y")},
        {"request": {"method": "PUT", "url": "Observation/obs-b"}, "resource": observation("pb", "obs-b")},
    ]}
    r = c.post("/fhir", headers={**h, **FHIR_JSON}, json=tx)
    assert r.status_code == 404, r.text
    assert c.get("/fhir/Observation?subject=Patient/pa&_summary=count", headers=env["admin"]).json()["total"] == 3
    tx["entry"] = [{"request": {"method": "DELETE", "url": "Observation?identifier=urn:secret|b-only"}}]
    assert c.post("/fhir", headers={**h, **FHIR_JSON}, json=tx).status_code == 200
    assert c.get("/fhir/Observation/obs-b", headers=env["admin"]).status_code == 200  # matched nothing visible


def test_conditional_writes_do_not_match_forbidden(env: dict[str, Any]) -> None:
    c, h, admin = env["c"], env["h"], env["admin"]
    mine = observation("pa", "ignored")
    del mine["id"]
    # conditional update matching B's resource: no visible match, so a new resource of A is created
    r = c.put("/fhir/Observation?identifier=urn:secret|b-only", headers={**h, **FHIR_JSON}, json=mine)
    assert r.status_code == 201 and r.json()["id"] != "obs-b"
    assert c.get("/fhir/Observation/obs-b", headers=admin).json()["meta"]["versionId"] == "1"
    # conditional create: If-None-Exist on B's resource does not hand it back
    r = c.post("/fhir/Observation", headers={**h, **FHIR_JSON, "If-None-Exist": "_id=obs-b"}, json=mine)
    assert r.status_code == 201 and r.json()["id"] != "obs-b"
    # writing into B's compartment is refused as a read of it would be: 404, existence not confirmed
    theirs = observation("pb", "z")
    del theirs["id"]
    assert c.post("/fhir/Observation", headers={**h, **FHIR_JSON}, json=theirs).status_code == 404
    r = c.put("/fhir/Observation?_id=obs-b", headers={**h, **FHIR_JSON}, json=theirs)
    assert r.status_code == 404
    # conditional delete: nothing visible matches, B's resource stays
    assert c.delete("/fhir/Observation?_id=obs-b", headers=h).status_code == 204
    assert c.get("/fhir/Observation/obs-b", headers=admin).status_code == 200
    # moving A's resource into B's compartment is refused
    moved = observation("pb", "obs-a")
    assert c.put("/fhir/Observation/obs-a", headers={**h, **FHIR_JSON}, json=moved).status_code == 404


def test_granular_scope_filters_by_category(env: dict[str, Any]) -> None:
    app = env["app"]
    lab_only = mint(app.container, role="practitioner", user="u-dr-a2", fhir_user=DR, scope=(
        "user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory "
        "user/Patient.rs"))
    r = env["c"].get("/fhir/Observation?subject=Patient/pa", headers=bearer(lab_only))
    assert ids(r.json()) == {"Observation/obs-a-lab"}
    assert env["c"].get("/fhir/Observation/obs-a", headers=bearer(lab_only)).status_code == 404
    assert env["c"].get("/fhir/Observation/obs-a-lab", headers=bearer(lab_only)).status_code == 200
    # no scope on Condition at all: 403, not 404
    assert env["c"].get("/fhir/Condition?subject=Patient/pa", headers=bearer(lab_only)).status_code == 403


def test_patient_scope_is_bound_to_the_launch_patient(env: dict[str, Any]) -> None:
    app, c = env["app"], env["c"]
    me = bearer(mint(app.container, role="patient", user="u-pa", fhir_user="Patient/pa", patient="pa",
                     scope="patient/*.rs"))
    assert c.get("/fhir/Observation/obs-a", headers=me).status_code == 200
    assert c.get("/fhir/Observation/obs-b", headers=me).status_code == 404
    assert ids(c.get("/fhir/Observation?code=8867-4", headers=me).json()) == {
        "Observation/obs-a", "Observation/obs-a-lab", "Observation/obs-a-panel"}
    own = observation("pa", "new")
    del own["id"]
    assert c.post("/fhir/Observation", headers={**me, **FHIR_JSON}, json=own).status_code == 403
    # a practitioner's launch context: patient/ scopes reach only that patient, even with a relationship
    launch = bearer(mint(app.container, role="practitioner", user="u-dr-a3", fhir_user=DR, patient="pb",
                         scope="patient/*.rs"))
    assert c.get("/fhir/Observation/obs-a", headers=launch).status_code == 404


def test_consent_restrictions_by_class_and_actor(env: dict[str, Any]) -> None:
    c, h, admin = env["c"], env["h"], env["admin"]
    put(c, admin, {"resourceType": "Condition", "id": "cond-a", "code": {"text": "asthma"},
                   "subject": {"reference": "Patient/pa"}})
    # another practitioner is denied everything: dr-a is unaffected
    put(c, admin, consent("pa", "consent-other", {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"role": {"text": "x"}, "reference": {"reference": "Practitioner/dr-x"}}]}]}))
    assert c.get("/fhir/Observation/obs-a", headers=h).status_code == 200
    # dr-a may no longer see Observations (class restriction for this actor), Conditions stay visible
    put(c, admin, consent("pa", "consent-class", {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"role": {"text": "x"}, "reference": {"reference": DR}}],
         "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}]}))
    assert c.get("/fhir/Observation/obs-a", headers=h).status_code == 404
    assert c.get("/fhir/Condition/cond-a", headers=h).status_code == 200
    assert ids(get(env, "Patient/pa/$everything")).isdisjoint({"Observation/obs-a", "Observation/obs-a-lab"})
    # withdrawing the consent applies at once (the cache is invalidated by the write)
    assert c.delete("/fhir/Consent/consent-class", headers=admin).status_code == 204
    assert c.get("/fhir/Observation/obs-a", headers=h).status_code == 200


def test_restricted_label_needs_clearance_and_is_marked(env: dict[str, Any]) -> None:
    c, admin, app = env["c"], env["admin"], env["app"]
    seen: list[AuditRecord] = []
    app.container.audit.observers.append(seen.append)
    put(c, admin, labelled(observation("pa", "obs-psy"), "R"))
    assert c.get("/fhir/Observation/obs-psy", headers=env["h"]).status_code == 404
    refused = [r for r in seen if r.status == 403]
    assert refused[-1].detail == "restricted label needs clearance R" and refused[-1].restricted
    cleared = bearer(mint(app.container, role="practitioner", user="u-dr-a4", fhir_user=DR, clearance=["R"]))
    assert c.get("/fhir/Observation/obs-psy", headers=cleared).status_code == 200
    assert seen[-1].status == 200 and seen[-1].restricted and seen[-1].purpose_of_use == "TREAT"
    assert "Observation/obs-psy" not in ids(get(env, "Observation?subject=Patient/pa"))
    # V is above R
    put(c, admin, labelled(observation("pa", "obs-vip"), "V"))
    assert c.get("/fhir/Observation/obs-vip", headers=cleared).status_code == 404


def test_relationship_appears_and_disappears_with_the_data(env: dict[str, Any]) -> None:
    c, h, admin = env["c"], env["h"], env["admin"]
    assert c.get("/fhir/Patient/pb", headers=h).status_code == 404
    put(c, admin, care_team("pb", "team-b", DR))
    assert c.get("/fhir/Patient/pb", headers=h).status_code == 200
    ended = care_team("pb", "team-b", DR)
    ended["status"] = "inactive"
    put(c, admin, ended)
    assert c.get("/fhir/Patient/pb", headers=h).status_code == 404


def test_patch_and_delete_of_another_patient_are_404(env: dict[str, Any]) -> None:
    c, h, admin = env["c"], env["h"], env["admin"]
    ops = [{"op": "replace", "path": "/status", "value": "cancelled"}]
    r = c.patch("/fhir/Observation/obs-b", headers={**h, "Content-Type": "application/json-patch+json"}, json=ops)
    assert r.status_code == 404
    assert c.delete("/fhir/Observation/obs-b", headers=h).status_code == 404
    assert c.get("/fhir/Observation/obs-b", headers=admin).json()["status"] == "final"
    # a deleted resource of another patient answers 404, not 410 (410 would confirm it existed)
    assert c.delete("/fhir/Observation/obs-b", headers=admin).status_code == 204
    assert c.get("/fhir/Observation/obs-b", headers=h).status_code == 404
    assert c.get("/fhir/Observation/obs-b", headers=admin).status_code == 410
