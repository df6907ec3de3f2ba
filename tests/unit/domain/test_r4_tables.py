"""The vendored R4 table and its loader; the generator's pure parts on synthetic input."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fhirvault.domain import r4

ROOT = Path(__file__).resolve().parents[3]
TABLE = ROOT / "src" / "fhirvault" / "domain" / "r4" / "definitions.json.gz"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_r4_tables", ROOT / "scripts" / "gen_r4_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the vendored file


def test_table_file_is_small_gzip_json_with_sorted_keys() -> None:
    raw = TABLE.read_bytes()
    assert len(raw) < 1_500_000
    text = gzip.decompress(raw).decode()
    data = json.loads(text)
    # The generator writes sorted keys and compact separators: re-dumping is a no-op.
    assert json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True) == text
    assert data["format"] == 1
    assert data["fhirVersion"] == "4.0.1"


def test_resource_types() -> None:
    types = r4.resource_types()
    assert len(types) == 146
    assert {"Patient", "Observation", "Bundle", "Questionnaire", "Parameters"} <= types
    assert not {"Resource", "DomainResource", "MetadataResource", "HumanName"} & types
    assert types == r4.RESOURCE_TYPES
    assert r4.is_resource_type("Encounter")
    assert not r4.is_resource_type("patient")
    assert not r4.is_resource_type("")


def test_unknown_module_attribute() -> None:
    with pytest.raises(AttributeError):
        r4.NOT_THERE


def test_load_tables_is_cached() -> None:
    assert r4.load_tables() is r4.load_tables()


def test_patient_table_has_inherited_choice_and_backbone_elements() -> None:
    patient = r4.load_tables()["tables"]["Patient"]
    for inherited in ("id", "meta", "implicitRules", "language", "text", "contained", "extension"):
        assert inherited in patient
    assert patient["id"][0] == "id"  # Resource.id is an `id`, not a plain string
    assert patient["contained"][0] == "Resource"
    assert patient["name"] == ["HumanName", r4.FLAG_ARRAY]
    assert patient["gender"] == ["code", 0, "administrative-gender"]
    assert patient["deceasedBoolean"] == ["boolean", 0, None, "deceased"]
    assert patient["deceasedDateTime"] == ["dateTime", 0, None, "deceased"]
    assert "deceased[x]" not in patient
    assert patient["contact"][0] == "Patient.contact"
    link = r4.load_tables()["tables"]["Patient.link"]
    assert link["other"] == ["Reference", r4.FLAG_REQUIRED]
    assert link["id"] == ["string", 0]  # Element.id on backbones


def test_content_reference_and_profiled_types() -> None:
    tables = r4.load_tables()["tables"]
    assert tables["Questionnaire.item"]["item"][0] == "Questionnaire.item"
    assert tables["Bundle.entry"]["link"][0] == "Bundle.link"
    dose = tables["Dosage.doseAndRate"]
    assert dose["doseQuantity"][0] == "SimpleQuantity"  # name from the type, table from the profile
    assert "comparator" not in tables["SimpleQuantity"]
    assert "comparator" in tables["Quantity"]


def test_extension_value_has_every_type() -> None:
    ext = r4.load_tables()["tables"]["Extension"]
    values = {name for name, entry in ext.items() if len(entry) > 3 and entry[3] == "value"}
    assert {
        "valueString",
        "valueCode",
        "valueReference",
        "valueQuantity",
        "valueBase64Binary",
    } <= values
    assert len(values) == 50
    assert ext["url"] == ["uri", r4.FLAG_REQUIRED]


def test_primitives() -> None:
    prims = r4.load_tables()["primitives"]
    assert prims["integer"]["json"] == "integer"
    assert prims["positiveInt"]["json"] == "integer"
    assert prims["decimal"]["json"] == "decimal"
    assert prims["boolean"]["json"] == "boolean"
    assert prims["date"]["json"] == "string"
    assert prims["id"]["regex"] == "[A-Za-z0-9\\-\\.]{1,64}"
    assert prims["xhtml"]["regex"] is None


def test_value_sets_are_shared_and_expanded() -> None:
    data = r4.load_tables()
    gender = data["valueSets"]["administrative-gender"]
    assert gender == {
        "http://hl7.org/fhir/administrative-gender": ["female", "male", "other", "unknown"]
    }
    # One set, referenced by id from several elements.
    assert data["tables"]["Patient.contact"]["gender"][2] == "administrative-gender"
    assert data["tables"]["Practitioner"]["gender"][2] == "administrative-gender"
    # Value sets that need external code systems are not there: no check.
    assert "mimetypes" not in data["valueSets"]
    assert "ucum-units" not in data["valueSets"]
    # Explicit concepts of a system not defined in the core package do expand.
    assert (
        "http://terminology.hl7.org/CodeSystem/v3-TimingEvent" in data["valueSets"]["event-timing"]
    )


def test_patient_compartment() -> None:
    assert r4.patient_compartment_paths("Observation") == (("subject",), ("performer",))
    assert r4.patient_compartment_paths("Patient") == (("link", "other"),)
    assert r4.patient_compartment_paths("AuditEvent") == (("agent", "who"), ("entity", "what"))
    assert r4.patient_compartment_paths("Appointment") == (("participant", "actor"),)
    assert r4.patient_compartment_paths("Encounter") == (("subject",),)
    assert r4.patient_compartment_paths("Organization") == ()
    assert r4.patient_compartment_paths("NoSuchType") == ()
    assert r4.patient_compartment_params("AllergyIntolerance") == (
        ("patient", ("patient",)),
        ("recorder", ("recorder",)),
        ("asserter", ("asserter",)),
    )


def test_patient_compartment_paths_exist_in_the_element_tables() -> None:
    tables = r4.load_tables()["tables"]
    for rtype in r4.load_tables()["patientCompartment"]:
        for path in r4.patient_compartment_paths(rtype):
            table = rtype
            for segment in path:
                entry = tables[table][segment]
                table = entry[0]
            assert table == "Reference", (rtype, path)


# ---------------------------------------------------------------- generator internals


@pytest.mark.parametrize(
    ("expression", "rtype", "expected"),
    [
        ("Observation.subject", "Observation", ["subject"]),
        ("Observation.subject.where(resolve() is Patient)", "Observation", ["subject"]),
        ("Provenance.target.where(resolve() is Patient)", "Provenance", ["target"]),
        ("Appointment.participant.actor", "Appointment", ["participant.actor"]),
        (
            "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) | Consent.patient",
            "CarePlan",
            ["subject"],
        ),
        (
            "AuditEvent.agent.who.where(resolve() is Patient) | AuditEvent.entity.what",
            "AuditEvent",
            ["agent.who", "entity.what"],
        ),
        ("(Observation.subject as Reference)", "Observation", ["subject"]),
        ("Observation.subject.as(Reference)", "Observation", ["subject"]),
        ("Basic.subject.where(resolve() is Group) | Basic.author", "Basic", ["author"]),
    ],
)
def test_expression_paths(
    gen: ModuleType, expression: str, rtype: str, expected: list[str]
) -> None:
    assert gen.expression_paths(expression, rtype) == expected


def test_expression_paths_rejects_what_it_cannot_parse(gen: ModuleType) -> None:
    with pytest.raises(SystemExit):
        gen.expression_paths("Observation.component.where(code = 'x').value", "Observation")


def _cs(url: str, concepts: list[dict[str, Any]], content: str = "complete") -> dict[str, Any]:
    return {"resourceType": "CodeSystem", "url": url, "content": content, "concept": concepts}


def test_expander(gen: ModuleType) -> None:
    tree = _cs(
        "http://x/cs",
        [
            {
                "code": "a",
                "concept": [{"code": "a1", "concept": [{"code": "a11"}]}, {"code": "a2"}],
            },
            {"code": "b"},
        ],
    )
    value_sets = {
        "http://x/all": {"id": "all", "compose": {"include": [{"system": "http://x/cs"}]}},
        "http://x/isa": {
            "id": "isa",
            "compose": {
                "include": [
                    {
                        "system": "http://x/cs",
                        "filter": [{"property": "concept", "op": "is-a", "value": "a1"}],
                    }
                ]
            },
        },
        "http://x/desc": {
            "id": "desc",
            "compose": {
                "include": [
                    {
                        "system": "http://x/cs",
                        "filter": [{"property": "concept", "op": "descendent-of", "value": "a"}],
                    }
                ],
                "exclude": [{"system": "http://x/cs", "concept": [{"code": "a2"}]}],
            },
        },
        "http://x/import": {
            "id": "import",
            "compose": {"include": [{"valueSet": ["http://x/isa"]}]},
        },
        "http://x/ext": {
            "id": "ext",
            "compose": {"include": [{"system": "http://unitsofmeasure.org"}]},
        },
        "http://x/regex": {
            "id": "regex",
            "compose": {
                "include": [
                    {
                        "system": "http://x/cs",
                        "filter": [{"property": "concept", "op": "regex", "value": "a.*"}],
                    }
                ]
            },
        },
    }
    expander = gen.Expander(value_sets, {"http://x/cs": tree})
    assert expander.expand("http://x/all") == {"http://x/cs": {"a", "a1", "a11", "a2", "b"}}
    assert expander.expand("http://x/isa") == {"http://x/cs": {"a1", "a11"}}
    assert expander.expand("http://x/desc") == {"http://x/cs": {"a1", "a11"}}
    assert expander.expand("http://x/import") == {"http://x/cs": {"a1", "a11"}}
    for url in ("http://x/ext", "http://x/regex", "http://x/missing"):
        with pytest.raises(gen.NotExpandable):
            expander.expand(url)


def test_expander_needs_complete_code_systems(gen: ModuleType) -> None:
    value_sets = {
        "http://x/vs": {"id": "vs", "compose": {"include": [{"system": "http://x/frag"}]}}
    }
    expander = gen.Expander(
        value_sets, {"http://x/frag": _cs("http://x/frag", [{"code": "a"}], "fragment")}
    )
    with pytest.raises(gen.NotExpandable):
        expander.expand("http://x/vs")


def test_compile_structure_expands_choices_and_backbones(gen: ModuleType) -> None:
    sd = {
        "type": "Thing",
        "derivation": "specialization",
        "snapshot": {
            "element": [
                {"path": "Thing", "min": 0, "max": "*"},
                {
                    "path": "Thing.id",
                    "min": 0,
                    "max": "1",
                    "type": [{"code": "http://hl7.org/fhirpath/System.String"}],
                },
                {
                    "path": "Thing.value[x]",
                    "min": 1,
                    "max": "1",
                    "type": [{"code": "string"}, {"code": "Quantity"}],
                },
                {"path": "Thing.part", "min": 0, "max": "*", "type": [{"code": "BackboneElement"}]},
                {
                    "path": "Thing.part.kind",
                    "min": 1,
                    "max": "1",
                    "type": [{"code": "code"}],
                    "binding": {"strength": "required", "valueSet": "http://x/vs|4.0.1"},
                },
                {
                    "path": "Thing.part.part",
                    "min": 0,
                    "max": "*",
                    "contentReference": "#Thing.part",
                },
                {"path": "Thing.gone", "min": 0, "max": "0", "type": [{"code": "string"}]},
            ]
        },
    }
    bindings: dict[str, set[str]] = {}
    tables = gen.compile_structure(sd, owner_is_resource=True, bindings=bindings)
    assert tables["Thing"] == {
        "id": ["id", 0, None],
        "valueString": ["string", 2, None, "value"],
        "valueQuantity": ["Quantity", 2, None, "value"],
        "part": ["Thing.part", 1, None],
    }
    assert tables["Thing.part"] == {
        "kind": ["code", 2, "http://x/vs"],
        "part": ["Thing.part", 1, None],
    }
    assert bindings == {"http://x/vs": {"Thing.part.kind"}}
