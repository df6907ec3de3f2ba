"""FHIR XML <-> JSON: round trips over official and generated examples, and hostile input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import orjson
import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.domain.r4 import FLAG_ARRAY, load_tables, resource_types
from fhirvault.fhir.xml import RawNumber, json_to_xml, to_xml, xml_to_json

OFFICIAL = sorted((Path(__file__).parents[2] / "data" / "fhir-r4-xml").glob("*.xml"))
FHIR = "{http://hl7.org/fhir}"
XHTML = "{http://www.w3.org/1999/xhtml}"
DIV = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Some <b>narrative</b> &amp; <a href="#x">a link</a></p></div>'


def canonical(elem: ET.Element) -> Any:
    """An element tree as comparable data: comments and FHIR-side whitespace do not count."""
    in_xhtml = elem.tag.startswith(XHTML)
    text = elem.text if in_xhtml else (elem.text or "").strip() or None
    children = []
    for child in elem:
        children.append(canonical(child))
        if in_xhtml and child.tail:
            children.append(child.tail)
    return (elem.tag, sorted(elem.attrib.items()), text, children)


def assert_equivalent(xml_a: bytes, xml_b: bytes) -> None:
    assert canonical(ET.fromstring(xml_a)) == canonical(ET.fromstring(xml_b))


@pytest.mark.parametrize("path", OFFICIAL, ids=[p.name for p in OFFICIAL])
def test_official_examples_round_trip(path: Path) -> None:
    original = path.read_bytes()
    as_json = xml_to_json(original)
    back = json_to_xml(as_json)
    assert_equivalent(original, back)
    assert xml_to_json(back) == as_json


def test_official_example_json_form() -> None:
    j = json.loads(xml_to_json((OFFICIAL[0].parent / "observation-example-bmd.xml").read_bytes()))
    assert j["valueQuantity"] == {"value": 0.887, "unit": "g/cm²", "system": "http://unitsofmeasure.org",
                                  "code": "g/cm-2"}
    assert "g/cm²" in j["text"]["div"] and j["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')


# ---------------------------------------------------------------- generated examples

SAMPLE = {
    "boolean": True, "integer": -7, "positiveInt": 3, "unsignedInt": 0, "decimal": RawNumber("1.50"),
    "date": "2024-02-29", "dateTime": "2024-02-29T10:11:12+01:00", "instant": "2024-02-29T10:11:12.345Z",
    "time": "10:11:12", "base64Binary": "aGVsbG8=", "oid": "urn:oid:1.2.250.1", "id": "an-id",
    "uuid": "urn:uuid:0b2f3e58-7d43-4d84-9d7c-7f1c3c8c1b11", "xhtml": DIV,
}


def _sample(type_name: str, name: str) -> Any:
    return SAMPLE.get(type_name, f"{name} <&> \"é\" {type_name}")


def generate(table_name: str, depth: int, datatypes: int = 0) -> dict[str, Any]:
    """Every element of a type once, choice types by their first type, primitive arrays twice.

    Backbone elements are always filled (to 6 levels: Questionnaire.item nests itself), data
    types inside data types near the root, so that every element of every resource is covered.
    """
    tables = load_tables()
    out: dict[str, Any] = {}
    groups: set[str] = set()
    for name, entry in tables["tables"][table_name].items():
        type_name, flags = entry[0], entry[1]
        if len(entry) > 3 and entry[3]:
            if entry[3] in groups:
                continue
            groups.add(entry[3])
        array = bool(flags & FLAG_ARRAY)
        value: Any = None
        if type_name in tables["primitives"]:
            value = "example" if name == "id" and table_name in resource_types() else _sample(type_name, name)
            if array and type_name != "xhtml":
                out[name] = [value, None]
                out[f"_{name}"] = [None, {"id": "p2", "extension": [{"url": "http://e.x/p", "valueCode": "c"}]}]
                continue
        elif type_name == "Resource":
            if depth < 2:
                value = {"resourceType": "Basic", "id": "inner", "code": {"text": "in"}}
        elif "." in type_name:
            if depth < 6:
                value = generate(type_name, depth + 1, datatypes) or None
        elif datatypes < 1 or (datatypes < 2 and depth < 2):
            value = generate(type_name, depth + 1, datatypes + 1) or None
        if value is not None:
            out[name] = [value] if array else value
    return out


def generated(rtype: str) -> dict[str, Any]:
    return {"resourceType": rtype, **generate(rtype, 0)}


@pytest.mark.parametrize("rtype", sorted(resource_types()))
def test_every_resource_type_round_trips(rtype: str) -> None:
    resource = generated(rtype)
    xml = to_xml(resource)
    as_json = xml_to_json(xml)
    # JSON -> XML -> JSON is the identity (decimals keep their digits)
    assert json.loads(as_json, parse_float=RawNumber) == json.loads(json.dumps(resource), parse_float=RawNumber)
    # and XML -> JSON -> XML too
    assert_equivalent(xml, json_to_xml(as_json))


def test_generated_examples_follow_definition_order() -> None:
    xml = to_xml(generated("Patient"))
    names = [c.tag.removeprefix(FHIR) for c in ET.fromstring(xml)]
    assert names[:7] == ["id", "meta", "implicitRules", "language", "text", "contained", "extension"]
    assert names.index("birthDate") < names.index("deceasedBoolean") < names.index("address")


# ---------------------------------------------------------------- details of the format

def test_primitives_id_and_extensions() -> None:
    resource = {"resourceType": "Patient", "name": [{"id": "n1", "given": ["A", None, "C"],
                                                     "_given": [None, {"extension": [{"url": "u", "valueString": "B"}]},
                                                                {"id": "g3"}]}],
                "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                              "valueCode": "unknown"}]}}
    xml = to_xml(resource).decode()
    assert '<name id="n1"><given value="A"/><given><extension url="u"><valueString value="B"/></extension></given>' \
           '<given id="g3" value="C"/></name>' in xml
    assert '<birthDate><extension url="http://hl7.org/fhir/StructureDefinition/data-absent-reason">' in xml
    assert json.loads(xml_to_json(xml.encode())) == resource


def test_decimals_keep_their_digits() -> None:
    body = b'{"resourceType":"Observation","status":"final","code":{"text":"x"},' \
           b'"valueQuantity":{"value":1.50},"referenceRange":[{"low":{"value":1e-7}}]}'
    xml = json_to_xml(body)
    assert b'<value value="1.50"/>' in xml and b'<value value="1e-7"/>' in xml
    assert b'"value":1.50' in xml_to_json(xml)


def test_escaping_is_round_tripped() -> None:
    resource = {"resourceType": "Basic", "code": {"text": 'a "quoted" <b>&amp; line\nbreak\ttab'}}
    xml = to_xml(resource)
    assert b"<b>" not in xml
    assert json.loads(xml_to_json(xml)) == resource


def test_unsafe_stored_narrative_is_served_as_text() -> None:
    # JSON validation only checks that a narrative starts with <div: never serve script as markup
    body = orjson.dumps({"resourceType": "Basic", "code": {"text": "x"}, "text": {
        "status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script></div>'}})
    xml = json_to_xml(body)
    assert b"<script>" not in xml and b"&lt;script&gt;" in xml
    div = ET.fromstring(xml).find(f"{FHIR}text/{XHTML}div")
    assert div is not None and len(div) == 0


def test_narrative_without_namespace_is_taken_as_xhtml() -> None:
    body = orjson.dumps({"resourceType": "Basic", "code": {"text": "x"},
                         "text": {"status": "generated", "div": "<div><p>hi</p></div>"}})
    div = ET.fromstring(json_to_xml(body)).find(f"{FHIR}text/{XHTML}div")
    assert div is not None and div.find(f"{XHTML}p") is not None


@pytest.mark.parametrize("body", [
    b"",
    b"not xml",
    b"<Patient xmlns='http://hl7.org/fhir'><name><family value='x'/></name>",
    b"<?xml version='1.0'?><!DOCTYPE a [<!ENTITY a '1234567890'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>"
    b"<Patient xmlns='http://hl7.org/fhir'><name><family value='&b;'/></name></Patient>",
    b"<?xml version='1.0'?><!DOCTYPE a SYSTEM 'http://127.0.0.1:1/x.dtd'><Patient xmlns='http://hl7.org/fhir'/>",
    b"<?xml version='1.0'?><!DOCTYPE a [<!ENTITY e SYSTEM 'file:///etc/hostname'>]>"
    b"<Patient xmlns='http://hl7.org/fhir'><name><family value='&e;'/></name></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'>" + b"<contained><Patient>" * 200 + b"</Patient></contained>" * 200
    + b"</Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><name><family value='x'/><family value='y'/></name></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><name>text</name></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><name><family/></name></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir' onload='x'/>",
    b"<Patient xmlns='http://hl7.org/fhir'><birthDate value='1984' other='1'/></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><multipleBirthInteger value='1.5'/></Patient>",
    b"<Observation xmlns='http://hl7.org/fhir'><valueQuantity><value value='1,5'/></valueQuantity></Observation>",
    b"<Observation xmlns='http://hl7.org/fhir'><valueQuantity><value value='1}'/></valueQuantity></Observation>",
    b"<Patient xmlns='http://hl7.org/fhir'><extension><url value='u'/></extension></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><contained/></Patient>",
    b"<Patient xmlns='http://hl7.org/fhir'><text><status value='generated'/><div>no namespace</div></text></Patient>",
])
def test_bad_xml_is_a_400(body: bytes) -> None:
    with pytest.raises(OperationOutcomeError) as info:
        xml_to_json(body)
    assert info.value.status == 400
    assert "1234567890" not in str(info.value)


def test_characters_xml_cannot_carry_are_not_served_as_broken_xml() -> None:
    from fhirvault.fhir.xml import NotRepresentable

    with pytest.raises(NotRepresentable):
        to_xml({"resourceType": "Basic", "code": {"text": "a\ufffeb"}})
    assert b"\xf0\x9f\x98\x80" in to_xml({"resourceType": "Basic", "code": {"text": "emoji \U0001f600"}})


def test_schema_location_on_the_root_is_ignored() -> None:
    xml = (b'<Patient xmlns="http://hl7.org/fhir" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
           b'xsi:schemaLocation="http://hl7.org/fhir ../../schema/patient.xsd"><active value="true"/></Patient>')
    assert json.loads(xml_to_json(xml)) == {"resourceType": "Patient", "active": True}
