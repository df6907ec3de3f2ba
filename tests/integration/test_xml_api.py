"""FHIR XML through HTTP: every interaction reads and writes XML, errors come back in XML."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PATIENT, App, observation
from tests.unit.fhir.test_xml import canonical

F = "{http://hl7.org/fhir}"
XML_IN = {"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"}

PATIENT_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<Patient xmlns="http://hl7.org/fhir">
  <text>
    <status value="generated"/>
    <div xmlns="http://www.w3.org/1999/xhtml"><p>Claire <b>MARTIN</b> &amp; co</p></div>
  </text>
  <identifier><system value="urn:oid:1.2.250.1.213.1.4.8"/><value value="184057512345625"/></identifier>
  <name><use value="official"/><family value="Martin"/><given value="Claire"/><given value="Anne"/></name>
  <gender value="female"/>
  <birthDate value="1984-05-12">
    <extension url="http://hl7.org/fhir/StructureDefinition/patient-birthTime">
      <valueDateTime value="1984-05-12T14:35:45+02:00"/>
    </extension>
  </birthDate>
</Patient>"""


def parse(r: object) -> ET.Element:
    assert r.headers["content-type"].startswith("application/fhir+xml"), r.headers  # type: ignore[attr-defined]
    return ET.fromstring(r.content)  # type: ignore[attr-defined]


def value(root: ET.Element, path: str) -> str | None:
    found = root.find("/".join(F + p for p in path.split("/")))
    return None if found is None else found.get("value")


def outcome_xml(r: object) -> ET.Element:
    root = parse(r)
    assert root.tag == F + "OperationOutcome"
    return root


def test_create_read_update_in_xml(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=PATIENT_XML, headers={**app.auth, **XML_IN})
    assert r.status_code == 201, r.text
    created = parse(r)
    pid = value(created, "id")
    assert pid and r.headers["location"].endswith(f"/Patient/{pid}/_history/1")
    # the same resource in JSON: the primitive's extension is the JSON _birthDate
    j = app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).json()
    assert j["name"][0]["given"] == ["Claire", "Anne"]
    assert j["_birthDate"]["extension"][0]["valueDateTime"] == "1984-05-12T14:35:45+02:00"
    assert j["text"]["div"] == '<div xmlns="http://www.w3.org/1999/xhtml"><p>Claire <b>MARTIN</b> &amp; co</p></div>'
    # read in XML three ways
    for kwargs in ({"params": {"_format": "xml"}}, {"params": {"_format": "application/fhir+xml"}},
                   {"headers": {"Accept": "application/xml"}}):
        headers = {**app.auth, **kwargs.get("headers", {})}
        r = app.client.get(f"/fhir/Patient/{pid}", params=kwargs.get("params"), headers=headers)
        assert r.status_code == 200
        root = parse(r)
        assert [c.tag for c in root][:3] == [F + "id", F + "meta", F + "text"]  # definition order
        assert root.find(f"{F}text/{{http://www.w3.org/1999/xhtml}}div/{{http://www.w3.org/1999/xhtml}}p") is not None
        assert [g.get("value") for g in root.iter(F + "given")] == ["Claire", "Anne"]
        ext = root.find(f"{F}birthDate/{F}extension")
        assert ext is not None and ext.get("url").endswith("patient-birthTime")
    # update in XML, with If-Match
    body = PATIENT_XML.replace(b"<Patient xmlns=\"http://hl7.org/fhir\">",
                               f'<Patient xmlns="http://hl7.org/fhir"><id value="{pid}"/>'.encode())
    body = body.replace(b'<gender value="female"/>', b'<gender value="other"/>')
    r = app.client.put(f"/fhir/Patient/{pid}", content=body, headers={**app.auth, **XML_IN, "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert value(parse(r), "gender") == "other" and r.headers["etag"] == 'W/"2"'
    # a JSON write answered in XML (Accept decides the answer, Content-Type the input)
    r = app.client.put(f"/fhir/Patient/{pid}", json={**j, "gender": "male"},
                       headers={**app.auth, "Content-Type": "application/fhir+json", "Accept": "application/fhir+xml"})
    assert r.status_code == 200 and value(parse(r), "gender") == "male"


def test_search_history_and_metadata_in_xml(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=PATIENT_XML, headers={**app.auth, **XML_IN})
    pid = value(parse(r), "id")
    r = app.client.get("/fhir/Patient", params={"family": "Martin", "_format": "xml"}, headers=app.auth)
    assert r.status_code == 200
    bundle = parse(r)
    assert bundle.tag == F + "Bundle" and value(bundle, "type") == "searchset"
    nested = bundle.find(f"{F}entry/{F}resource/{F}Patient")
    assert nested is not None and value(nested, "id") == pid
    r = app.client.get(f"/fhir/Patient/{pid}/_history", headers={**app.auth, "Accept": "application/fhir+xml"})
    assert value(parse(r), "type") == "history"
    r = app.client.get("/fhir/metadata", params={"_format": "xml"})
    cap = parse(r)
    assert cap.tag == F + "CapabilityStatement"
    assert "application/fhir+xml" in [f.get("value") for f in cap.findall(F + "format")]


def test_transaction_in_xml(app: App) -> None:
    bundle = b"""<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/>
      <entry><fullUrl value="urn:uuid:0b2f3e58-7d43-4d84-9d7c-7f1c3c8c1b11"/>
        <resource><Patient><name><family value="Durand"/></name></Patient></resource>
        <request><method value="POST"/><url value="Patient"/></request></entry>
      <entry><resource><Observation><status value="final"/>
          <code><coding><system value="http://loinc.org"/><code value="8867-4"/></coding></code>
          <subject><reference value="urn:uuid:0b2f3e58-7d43-4d84-9d7c-7f1c3c8c1b11"/></subject>
          <valueQuantity><value value="72"/><unit value="/min"/></valueQuantity></Observation></resource>
        <request><method value="POST"/><url value="Observation"/></request></entry>
    </Bundle>"""
    r = app.client.post("/fhir", content=bundle, headers={**app.auth, **XML_IN})
    assert r.status_code == 200, r.text
    root = parse(r)
    assert value(root, "type") == "transaction-response"
    statuses = [value(e, "status") for e in root.iter(F + "response")]
    assert statuses == ["201 Created", "201 Created"]
    obs = app.client.get("/fhir/Observation", params={"code": "8867-4"}, headers=app.auth).json()
    assert obs["entry"][0]["resource"]["subject"]["reference"].startswith("Patient/")


@pytest.mark.parametrize(("body", "status"), [
    (b"<Patient xmlns='http://hl7.org/fhir'><gender value='female'>", 400),  # not well-formed
    (b"<Patient xmlns='http://hl7.org/fhir'><colour value='blue'/></Patient>", 400),  # unknown element
    (b"<Patient><gender value='female'/></Patient>", 400),  # no FHIR namespace
    (b"<Spaceship xmlns='http://hl7.org/fhir'/>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><active value='yes'/></Patient>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><gender value='female'/><gender value='male'/></Patient>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><name id='a'><id value='b'/></name></Patient>", 400),
    (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>"
     b"<Patient xmlns='http://hl7.org/fhir'><name><family value='&lol2;'/></name></Patient>", 400),
    (b"<?xml version='1.0'?><!DOCTYPE p [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
     b"<Patient xmlns='http://hl7.org/fhir'><name><family value='&xxe;'/></name></Patient>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><name><family value='&nbsp;'/></name></Patient>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'>" + b"<extension url='u'>" * 300 + b"</extension>" * 300
     + b"</Patient>", 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><gender value='robot'/></Patient>", 422),  # JSON validation applies
])
def test_bad_xml_is_a_4xx_outcome_in_xml(app: App, body: bytes, status: int) -> None:
    r = app.client.post("/fhir/Patient", content=body, headers={**app.auth, **XML_IN})
    assert r.status_code == status, r.text
    outcome_xml(r)
    assert "root:" not in r.text and "robot" not in r.text


@pytest.mark.parametrize("div", [
    b"<div xmlns='http://www.w3.org/1999/xhtml'><script>alert(1)</script>x</div>",
    b"<div xmlns='http://www.w3.org/1999/xhtml'><p onclick='alert(1)'>x</p></div>",
    b"<div xmlns='http://www.w3.org/1999/xhtml'><a href='javascript:alert(1)'>x</a></div>",
    b"<div xmlns='http://www.w3.org/1999/xhtml'><iframe src='https://evil.example'/>x</div>",
    b"<div xmlns='http://www.w3.org/1999/xhtml'><p style='background:url(https://evil.example/t)'>x</p></div>",
    b"<div xmlns='http://www.w3.org/1999/xhtml'>   </div>",
])
def test_unsafe_narrative_is_refused(app: App, div: bytes) -> None:
    body = b"<Patient xmlns='http://hl7.org/fhir'><text><status value='generated'/>" + div + b"</text></Patient>"
    r = app.client.post("/fhir/Patient", content=body, headers={**app.auth, **XML_IN})
    assert r.status_code == 400, r.text
    issue = outcome_xml(r).find(f"{F}issue/{F}expression")
    assert issue is not None and issue.get("value") == "Narrative.div"


def test_errors_answer_in_the_negotiated_format(app: App) -> None:
    r = app.client.get("/fhir/Patient/nope", headers={**app.auth, "Accept": "application/fhir+xml"})
    assert r.status_code == 404 and value(outcome_xml(r), "issue/code") == "not-found"
    r = app.client.get("/fhir/Patient/nope", params={"_format": "xml"})
    assert r.status_code == 401 and outcome_xml(r) is not None
    r = app.client.get("/fhir/Patient/nope", headers=app.auth)
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    # q-values: XML preferred over JSON
    r = app.client.get("/fhir/metadata", headers={"Accept": "application/fhir+json;q=0.5, application/fhir+xml"})
    assert parse(r).tag == F + "CapabilityStatement"
    r = app.client.get("/fhir/metadata", headers={"Accept": "text/html"})
    assert r.status_code == 406 and r.json()["resourceType"] == "OperationOutcome"
    # the SMART configuration is plain JSON whatever the Accept header
    r = app.client.get("/fhir/.well-known/smart-configuration", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")


def test_prefer_operation_outcome_in_xml(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=PATIENT_XML,
                        headers={**app.auth, **XML_IN, "Prefer": "return=OperationOutcome"})
    assert r.status_code == 201 and value(outcome_xml(r), "issue/severity") == "information"


OFFICIAL = sorted((Path(__file__).parents[1] / "data" / "fhir-r4-xml").glob("*.xml"))


@pytest.mark.parametrize("path", OFFICIAL, ids=[p.name for p in OFFICIAL])
def test_official_examples_stored_and_served_in_xml(app: App, path: Path) -> None:
    original = ET.fromstring(path.read_bytes())
    rtype, rid = original.tag.removeprefix(F), value(original, "id")
    r = app.client.put(f"/fhir/{rtype}/{rid}", content=path.read_bytes(), headers={**app.auth, **XML_IN})
    assert r.status_code == 201, r.text
    served = parse(app.client.get(f"/fhir/{rtype}/{rid}", params={"_format": "xml"}, headers=app.auth))
    meta = served.find(F + "meta")
    assert meta is not None and value(meta, "versionId") == "1"
    for root in (served, original):  # the server stamps its own meta
        for element in root.findall(F + "meta"):
            root.remove(element)
    assert canonical(served) == canonical(original)


def test_interop_with_an_independent_fhir_xml_library(app: App) -> None:
    """fhir.resources (pydantic FHIR models, its own XML writer and reader) talks to the server in XML."""
    from fhir.resources.R4B.observation import Observation as LibObservation
    from fhir.resources.R4B.patient import Patient as LibPatient
    from lxml import etree as lxml_etree

    patient = LibPatient.model_validate({**PATIENT, "active": True})
    r = app.client.post("/fhir/Patient", content=patient.model_dump_xml(), headers={**app.auth, **XML_IN})
    assert r.status_code == 201, r.text
    served = LibPatient.model_validate_xml(r.content)
    assert served.id and served.meta.versionId == "1"
    assert served.name[0].given == ["Claire", "Anne"] and str(served.birthDate) == "1984-05-12"
    obs = LibObservation.model_validate(observation(served.id) | {"valueQuantity": {
        "value": "37.50", "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}})
    r = app.client.post("/fhir/Observation", content=obs.model_dump_xml(), headers={**app.auth, **XML_IN})
    assert r.status_code == 201, r.text
    r = app.client.get("/fhir/Observation", params={"subject": f"Patient/{served.id}", "_format": "xml"},
                       headers=app.auth)
    nested = lxml_etree.fromstring(r.content).find(f"{F}entry/{F}resource/{F}Observation")
    assert nested is not None
    lib_obs = LibObservation.model_validate_xml(lxml_etree.tostring(nested))
    assert float(lib_obs.valueQuantity.value) == 37.5 and lib_obs.subject.reference == f"Patient/{served.id}"


_names = st.sampled_from(["Patient", "Bundle", "Observation", "name", "given", "family", "gender", "birthDate",
                          "extension", "contained", "resource", "entry", "text", "div", "id", "valueQuantity",
                          "value", "meta", "p", "script"])
_attrs = st.dictionaries(st.sampled_from(["value", "id", "url", "xmlns", "onclick"]),
                         st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=8), max_size=2)
_trees = st.recursive(
    st.builds(lambda n, a: (n, a, []), _names, _attrs),
    lambda kids: st.builds(lambda n, a, k: (n, a, k), _names, _attrs, st.lists(kids, max_size=3)),
    max_leaves=20,
)


def _render(tree: tuple[str, dict[str, str], list[Any]], top: bool = False) -> str:
    name, attrs, kids = tree
    attr = "".join(f' {k}="{v}"' for k, v in attrs.items() if k != "xmlns")
    ns = ' xmlns="http://hl7.org/fhir"' if top else (' xmlns="http://www.w3.org/1999/xhtml"' if name == "div" else "")
    return f"<{name}{ns}{attr}>" + "".join(_render(k) for k in kids) + f"</{name}>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_trees, st.binary(max_size=40))
def test_random_xml_never_500(app: App, tree: tuple[str, dict[str, str], list[Any]], noise: bytes) -> None:
    for body in (_render(tree, top=True).encode("utf-8", "surrogatepass"), noise, b"<Patient " + noise):
        r = app.client.post("/fhir/Patient", content=body, headers={**app.auth, **XML_IN})
        assert r.status_code in (201, 400, 422), r.text
        outcome = parse(r)
        assert outcome.tag in (F + "OperationOutcome", F + "Patient")


@pytest.mark.parametrize("div", [
    '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script>x</div>',
    '<div xmlns="http://www.w3.org/1999/xhtml"><img src="x" onerror="alert(1)"/>x</div>',
    '<div xmlns="http://www.w3.org/1999/xhtml"><p>unclosed</div>',
])
def test_unsafe_narrative_is_refused_in_json_too(app: App, div: str) -> None:
    body = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    r = app.client.post("/fhir/Patient", json=body, headers={**app.auth, "Content-Type": "application/fhir+json"})
    assert r.status_code == 422, r.text
    assert "Patient.text.div" in [e for i in r.json()["issue"] for e in i.get("expression", [])]
    assert "alert" not in r.text


def test_audit_trail_and_everything_in_xml(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=PATIENT_XML, headers={**app.auth, **XML_IN})
    pid = value(parse(r), "id")
    r = app.client.get("/fhir/AuditEvent", params={"_format": "xml", "_count": "20"}, headers=app.auth)
    assert r.status_code == 200, r.text
    events = parse(r).findall(f"{F}entry/{F}resource/{F}AuditEvent")
    assert events and all(e.find(F + "recorded") is not None for e in events)
    r = app.client.get(f"/fhir/Patient/{pid}/$access-history", params={"_format": "xml"}, headers=app.auth)
    assert r.status_code == 200 and parse(r).tag == F + "Bundle"
    r = app.client.get(f"/fhir/Patient/{pid}/$everything", params={"_format": "xml"}, headers=app.auth)
    assert r.status_code == 200 and parse(r).find(f"{F}entry/{F}resource/{F}Patient") is not None
