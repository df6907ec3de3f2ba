"""fhirvault.domain.validation: valid R4 resources pass, each failure kind has its path."""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhirvault.domain import r4
from fhirvault.domain.validation import ValidationIssue, Validator

Json = dict[str, Any]
SECRET = "SECRET-PHI-7f3a"  # planted in invalid values: must never reach a message


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator.default()


def issues_of(validator: Validator, resource: Any, **kw: Any) -> list[tuple[str, str]]:
    return [(i.path, i.code) for i in validator.validate(resource, **kw)]


def mutated(base: Json, change: Callable[[Json], object]) -> Json:
    resource = copy.deepcopy(base)
    change(resource)
    return resource


# ---------------------------------------------------------------- realistic valid resources

PATIENT: Json = {
    "resourceType": "Patient",
    "id": "example",
    "meta": {
        "versionId": "1",
        "lastUpdated": "2024-03-01T12:30:00.123+01:00",
        "tag": [{"code": "x"}],
    },
    "text": {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Peter Chalmers</div>',
    },
    "identifier": [
        {
            "use": "usual",
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                ]
            },
            "system": "urn:oid:1.2.36.146.595.217.0.1",
            "value": "12345",
            "period": {"start": "2001-05-06"},
            "assigner": {"display": "Acme Healthcare"},
        }
    ],
    "active": True,
    "name": [
        {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
        {"use": "usual", "given": ["Jim"]},
        {
            "use": "maiden",
            "family": "Windsor",
            "given": ["Peter", "James"],
            "period": {"end": "2002"},
        },
    ],
    "telecom": [
        {"use": "home"},
        {"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1},
        {"system": "phone", "value": "(03) 3410 5613", "use": "mobile", "rank": 2},
    ],
    "gender": "male",
    "birthDate": "1974-12-25",
    "deceasedBoolean": False,
    "address": [
        {
            "use": "home",
            "type": "both",
            "text": "534 Erewhon St\nPeasantVille, Rainbow, Vic  3999",
            "line": ["534 Erewhon St"],
            "city": "PleasantVille",
            "district": "Rainbow",
            "state": "Vic",
            "postalCode": "3999",
            "period": {"start": "1974-12-25"},
        }
    ],
    "maritalStatus": {"text": "married"},
    "multipleBirthInteger": 2,
    "photo": [{"contentType": "image/png", "data": "iVBORw0KGgo=", "title": "photo"}],
    "contact": [
        {
            "relationship": [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}
                    ]
                }
            ],
            "name": {
                "family": "du Marché",
                "_family": {
                    "extension": [
                        {
                            "url": "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix",
                            "valueString": "VV",
                        }
                    ]
                },
                "given": ["Bénédicte"],
            },
            "telecom": [{"system": "phone", "value": "+33 (237) 998327"}],
            "gender": "female",
            "period": {"start": "2012"},
        }
    ],
    "communication": [{"language": {"text": "English"}, "preferred": True}],
    "generalPractitioner": [{"reference": "Practitioner/pr-1", "type": "Practitioner"}],
    "managingOrganization": {"reference": "Organization/1"},
    "link": [{"other": {"reference": "Patient/pat2/_history/3"}, "type": "seealso"}],
}

OBSERVATION: Json = {
    "resourceType": "Observation",
    "id": "blood-pressure",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {
        "coding": [{"system": "http://loinc.org", "code": "85354-9"}],
        "text": "Blood pressure",
    },
    "subject": {"reference": "Patient/example"},
    "effectiveDateTime": "2012-09-17",
    "performer": [{"reference": "Practitioner/example"}],
    "interpretation": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": "L",
                }
            ]
        }
    ],
    "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003"}]},
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {
                "value": 107,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {
                "value": 60.5,
                "comparator": "<",
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
            "interpretation": [{"text": "low"}],
        },
        {"code": {"text": "note"}, "valueString": "patient anxious\nre-measured"},
        {"code": {"text": "site"}, "dataAbsentReason": {"text": "not asked"}},
    ],
}

ENCOUNTER: Json = {
    "resourceType": "Encounter",
    "id": "f001",
    "status": "finished",
    "statusHistory": [{"status": "arrived", "period": {"start": "2013-03-08T09:00:00Z"}}],
    "class": {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "AMB",
        "display": "ambulatory",
    },
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "270427003"}]}],
    "priority": {"coding": [{"system": "http://snomed.info/sct", "code": "310361003"}]},
    "subject": {"reference": "Patient/f001", "display": "P. van de Heuvel"},
    "participant": [{"individual": {"reference": "Practitioner/f001"}}],
    "length": {"value": 90, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"},
    "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "34068001"}]}],
    "hospitalization": {
        "preAdmissionIdentifier": {
            "use": "official",
            "system": "http://www.amc.nl/zorgportal/identifiers/pre-admissions",
            "value": "93042",
        },
        "admitSource": {"coding": [{"system": "http://snomed.info/sct", "code": "305956004"}]},
        "dischargeDisposition": {
            "coding": [{"system": "http://snomed.info/sct", "code": "306689006"}]
        },
    },
    "location": [{"location": {"reference": "Location/1"}, "status": "completed"}],
    "serviceProvider": {"reference": "Organization/f001"},
}

MEDICATION_REQUEST: Json = {
    "resourceType": "MedicationRequest",
    "id": "medrx0302",
    "contained": [
        {
            "resourceType": "Medication",
            "id": "med0310",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "430127000"}]},
            "form": {"coding": [{"system": "http://snomed.info/sct", "code": "385055001"}]},
        }
    ],
    "identifier": [
        {"use": "official", "system": "http://www.bmc.nl/portal/prescriptions", "value": "12345689"}
    ],
    "status": "active",
    "intent": "order",
    "medicationReference": {"reference": "#med0310"},
    "subject": {"reference": "Patient/pat1"},
    "authoredOn": "2015-01-15",
    "requester": {"reference": "Practitioner/f007"},
    "dosageInstruction": [
        {
            "sequence": 1,
            "text": "one to two tablets every 4-6 hours as needed",
            "timing": {
                "repeat": {
                    "frequency": 1,
                    "frequencyMax": 2,
                    "period": 4,
                    "periodMax": 6,
                    "periodUnit": "h",
                }
            },
            "asNeededCodeableConcept": {
                "coding": [{"system": "http://snomed.info/sct", "code": "22253000"}]
            },
            "route": {"coding": [{"system": "http://snomed.info/sct", "code": "26643006"}]},
            "doseAndRate": [
                {
                    "doseRange": {
                        "low": {"value": 1, "unit": "TAB"},
                        "high": {"value": 2, "unit": "TAB"},
                    }
                }
            ],
            "maxDosePerPeriod": {
                "numerator": {"value": 6},
                "denominator": {"value": 1, "unit": "day"},
            },
        }
    ],
    "dispenseRequest": {
        "validityPeriod": {"start": "2015-01-15", "end": "2016-01-15"},
        "numberOfRepeatsAllowed": 0,
        "quantity": {"value": 30, "unit": "TAB"},
        "expectedSupplyDuration": {
            "value": 10,
            "unit": "days",
            "system": "http://unitsofmeasure.org",
            "code": "d",
        },
    },
    "substitution": {"allowedBoolean": True, "reason": {"text": "formulary policy"}},
}

QUESTIONNAIRE: Json = {
    "resourceType": "Questionnaire",
    "id": "f201",
    "url": "http://hl7.org/fhir/Questionnaire/f201",
    "status": "active",
    "subjectType": ["Patient"],
    "date": "2010",
    "item": [
        {
            "linkId": "1",
            "text": "Do you have allergies?",
            "type": "boolean",
        },
        {
            "linkId": "2",
            "text": "General questions",
            "type": "group",
            "item": [
                {"linkId": "2.1", "text": "What is your gender?", "type": "string"},
                {"linkId": "2.2", "text": "What is your date of birth?", "type": "date"},
                {
                    "linkId": "2.3",
                    "type": "group",
                    "item": [
                        {
                            "linkId": "2.3.1",
                            "text": "Severity",
                            "type": "choice",
                            "answerOption": [
                                {
                                    "valueCoding": {
                                        "system": "http://snomed.info/sct",
                                        "code": "24484000",
                                    }
                                },
                                {"valueString": "other", "initialSelected": True},
                            ],
                            "enableWhen": [
                                {"question": "1", "operator": "=", "answerBoolean": True}
                            ],
                        },
                        {
                            "linkId": "2.3.2",
                            "type": "integer",
                            "initial": [{"valueInteger": 3}],
                            "maxLength": 3,
                        },
                    ],
                },
            ],
        },
    ],
}

BUNDLE: Json = {
    "resourceType": "Bundle",
    "id": "bundle-transaction",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
            "resource": {
                "resourceType": "Patient",
                "name": [{"family": "Smith", "given": ["Anna"]}],
                "gender": "female",
                "birthDate": "1980-02-29",
            },
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=234234"},
        },
        {
            "fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
            "resource": {
                "resourceType": "Observation",
                "status": "preliminary",
                "code": {"text": "weight"},
                "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                "valueQuantity": {"value": 72.5, "unit": "kg"},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
        {"request": {"method": "DELETE", "url": "Patient/234"}},
    ],
}

PATIENT_EXTENDED: Json = {
    "resourceType": "Patient",
    "id": "ext-1",
    "contained": [
        {"resourceType": "Organization", "id": "org1", "name": "Clinic Ω", "active": True},
        {"resourceType": "Practitioner", "id": "pr1", "name": [{"text": "Dr. Who"}]},
    ],
    "extension": [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
            "valueString": "Nightingale",
        },
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [
                {
                    "url": "ombCategory",
                    "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"},
                },
                {"url": "text", "valueString": "White"},
            ],
        },
        {"url": "http://example.org/weight", "valueQuantity": {"value": 70, "unit": "kg"}},
        {"url": "http://example.org/ref", "valueReference": {"reference": "#org1"}},
    ],
    "modifierExtension": [{"url": "http://example.org/flag", "valueBoolean": False}],
    "name": [
        {
            "family": "van\u00a0Dijk",  # no-break space is fine in a string
            "given": ["Anna", None, "Maria"],
            "_given": [
                None,
                {
                    "extension": [
                        {
                            "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                            "valueCode": "masked",
                        }
                    ]
                },
                None,
            ],
        }
    ],
    "birthDate": "1970-03-30",
    "_birthDate": {
        "id": "bd",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1970-03-30T07:15:00+02:00",
            }
        ],
    },
    "_gender": {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "asked-declined",
            }
        ]
    },
    "managingOrganization": {"reference": "#org1"},
    "generalPractitioner": [{"reference": "#pr1"}],
}

PARAMETERS: Json = {
    "resourceType": "Parameters",
    "parameter": [
        {"name": "count", "valueInteger": 3},
        {"name": "patient", "resource": {"resourceType": "Patient", "id": "p1"}},
        {
            "name": "multi",
            "part": [{"name": "a", "valueString": "x"}, {"name": "b", "valueDecimal": 1.25}],
        },
    ],
}

VALID = {
    "Patient": PATIENT,
    "Observation": OBSERVATION,
    "Encounter": ENCOUNTER,
    "MedicationRequest": MEDICATION_REQUEST,
    "Questionnaire": QUESTIONNAIRE,
    "Bundle": BUNDLE,
    "Patient(contained+extensions)": PATIENT_EXTENDED,
    "Parameters": PARAMETERS,
    "minimal": {"resourceType": "Patient"},
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_resources(validator: Validator, name: str) -> None:
    assert validator.validate(VALID[name]) == []


def test_validate_does_not_mutate(validator: Validator) -> None:
    before = copy.deepcopy(PATIENT_EXTENDED)
    validator.validate(PATIENT_EXTENDED)
    bad = mutated(
        PATIENT_EXTENDED,
        lambda r: r["contained"][0].update(contained=[{"resourceType": "Patient"}]),
    )
    snapshot = copy.deepcopy(bad)
    validator.validate(bad)
    assert before == PATIENT_EXTENDED
    assert bad == snapshot


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient", "birthDate": "2024-02-29"},
        {"resourceType": "Patient", "birthDate": "2000-02-29"},
        {"resourceType": "Patient", "birthDate": "1999"},
        {"resourceType": "Patient", "birthDate": "1999-07"},
        {"resourceType": "Patient", "deceasedDateTime": "2020-01-31T23:59:60.999-14:00"},
        {"resourceType": "Patient", "multipleBirthInteger": 2147483647},
        {"resourceType": "Patient", "multipleBirthInteger": -2147483648},
        {"resourceType": "Patient", "id": "A-z.0" * 12 + "abcd"},
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "t"},
            "valueInteger": 0,
        },
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "t"},
            "valueQuantity": {"value": 1e-3},
        },
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "t"},
            "valueTime": "23:59:59.5",
        },
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "t"},
            "issued": "2020-01-01T00:00:00Z",
        },
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "t"},
            "valueString": "tab\tand 日本語 😀",
        },
        {"resourceType": "Patient", "photo": [{"data": "aGVs\r\nbG8="}]},
        {
            "resourceType": "Patient",
            "managingOrganization": {"reference": "https://example.org/fhir/Organization/1"},
        },
        {"resourceType": "Patient", "managingOrganization": {"reference": "urn:oid:1.2.3.4"}},
        {"resourceType": "Patient", "managingOrganization": {"identifier": {"value": "x"}}},
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:uuid:0f6d8a4e-5c9b-4a2e-9d3f-1a2b3c4d5e6f"}],
        },
        {
            "resourceType": "Condition",
            "subject": {"reference": "Patient/1"},
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
        },
        # A coding from another system is not checked against the required binding.
        {
            "resourceType": "Condition",
            "subject": {"reference": "Patient/1"},
            "clinicalStatus": {"coding": [{"system": "http://example.org/local", "code": "on"}]},
        },
        {
            "resourceType": "Patient",
            "name": [{"_family": {"extension": [{"url": "http://x", "valueCode": "unknown"}]}}],
        },
    ],
)
def test_valid_edge_cases(validator: Validator, resource: Json) -> None:
    assert validator.validate(resource) == []


# ---------------------------------------------------------------- resourceType


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({}, [("resourceType", "required")]),
        ({"resourceType": "Patinet"}, [("resourceType", "invalid")]),
        ({"resourceType": "patient"}, [("resourceType", "invalid")]),
        ({"resourceType": "Resource"}, [("resourceType", "invalid")]),
        ({"resourceType": 7}, [("resourceType", "invalid")]),
        ([], [("Resource", "structure")]),
        ("Patient", [("Resource", "structure")]),
    ],
)
def test_resource_type(
    validator: Validator, resource: Any, expected: list[tuple[str, str]]
) -> None:
    assert issues_of(validator, resource) == expected


# ---------------------------------------------------------------- element names


def test_unknown_element_has_full_path(validator: Validator) -> None:
    resource = mutated(PATIENT, lambda r: r["name"][0].update(famly="Chalmers"))
    assert issues_of(validator, resource) == [("Patient.name[0].famly", "structure")]


def test_unknown_elements_allowed_when_asked(validator: Validator) -> None:
    resource = mutated(PATIENT, lambda r: (r["name"][0].update(famly="x"), r.update(vip=True)))
    assert validator.validate(resource, allow_unknown_elements=True) == []
    assert len(validator.validate(resource)) == 2


def test_lenient_mode_still_checks_known_elements(validator: Validator) -> None:
    resource = {"resourceType": "Patient", "vip": True, "gender": "mail"}
    assert issues_of(validator, resource, allow_unknown_elements=True) == [
        ("Patient.gender", "code-invalid")
    ]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r.update(deceased=True), "Patient.deceased"),
        (lambda r: r.update(**{"deceased[x]": True}), "Patient.deceased[x]"),
        (lambda r: r.update(deceasedString="x"), "Patient.deceasedString"),
        (lambda r: r.update(_name=[{"id": "a"}]), "Patient._name"),  # _foo only for primitives
        (lambda r: r["name"][0].update(resourceType="Patient"), "Patient.name[0].resourceType"),
        (lambda r: r["contact"][0].update(gender2="male"), "Patient.contact[0].gender2"),
    ],
)
def test_unknown_element_variants(
    validator: Validator, change: Callable[[Json], None], path: str
) -> None:
    assert issues_of(validator, mutated(PATIENT, change)) == [(path, "structure")]


def test_hostile_key_is_truncated_in_path(validator: Validator) -> None:
    issues = validator.validate({"resourceType": "Patient", "x" * 10_000: 1, "a\nb": 2})
    assert len(issues) == 2
    assert all(len(i.path) < 100 for i in issues)
    assert all("\n" not in i.path for i in issues)


# ---------------------------------------------------------------- JSON kinds and cardinality


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r.update(active="true"), "Patient.active"),
        (lambda r: r.update(active=1), "Patient.active"),
        (lambda r: r.update(birthDate=19741225), "Patient.birthDate"),
        (lambda r: r.update(gender=["male"]), "Patient.gender"),  # max 1 given an array
        (lambda r: r.update(name={"family": "x"}), "Patient.name"),  # max * given a non-array
        (lambda r: r.update(name=["Chalmers"]), "Patient.name[0]"),
        (lambda r: r.update(managingOrganization="Organization/1"), "Patient.managingOrganization"),
        (lambda r: r["name"][0].update(given="Peter"), "Patient.name[0].given"),
        (lambda r: r["name"][0].update(given=[["Peter"]]), "Patient.name[0].given[0]"),
        (lambda r: r["name"].append([{"family": "x"}]), "Patient.name[3]"),
        (lambda r: r["telecom"][1].update(rank="1"), "Patient.telecom[1].rank"),
        (lambda r: r.update(multipleBirthInteger=2.0), "Patient.multipleBirthInteger"),
        (lambda r: r.update(multipleBirthInteger=True), "Patient.multipleBirthInteger"),
        (lambda r: r.update(contained={"resourceType": "Organization"}), "Patient.contained"),
        (lambda r: r.update(contained=["Organization"]), "Patient.contained[0]"),
        (lambda r: r.update(text="generated"), "Patient.text"),
    ],
)
def test_wrong_json_kind(validator: Validator, change: Callable[[Json], None], path: str) -> None:
    assert issues_of(validator, mutated(PATIENT, change)) == [(path, "structure")]


def test_missing_required_elements(validator: Validator) -> None:
    assert issues_of(validator, {"resourceType": "Observation"}) == [
        ("Observation.code", "required"),
        ("Observation.status", "required"),
    ]
    resource = mutated(PATIENT, lambda r: r.update(link=[{"type": "seealso"}]))
    assert issues_of(validator, resource) == [("Patient.link[0].other", "required")]
    resource = mutated(QUESTIONNAIRE, lambda r: r["item"][1]["item"][2]["item"][0].pop("linkId"))
    assert issues_of(validator, resource) == [
        ("Questionnaire.item[1].item[2].item[0].linkId", "required")
    ]
    narrative = {"resourceType": "Patient", "text": {"status": "generated"}}
    assert issues_of(validator, narrative) == [("Patient.text.div", "required")]


def test_required_primitive_satisfied_by_its_extension(validator: Validator) -> None:
    ext = {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "unknown",
            }
        ]
    }
    resource = {"resourceType": "Observation", "_status": ext, "code": {"text": "x"}}
    assert validator.validate(resource) == []


def test_missing_required_choice(validator: Validator) -> None:
    resource = mutated(MEDICATION_REQUEST, lambda r: r.pop("medicationReference"))
    assert issues_of(validator, resource) == [("MedicationRequest.medication[x]", "required")]


def test_several_choice_alternatives(validator: Validator) -> None:
    resource = mutated(OBSERVATION, lambda r: r.update(valueString="x", valueBoolean=True))
    assert issues_of(validator, resource) == [("Observation.value[x]", "structure")]
    resource = mutated(OBSERVATION, lambda r: r["component"][0].update(valueInteger=1))
    assert issues_of(validator, resource) == [("Observation.component[0].value[x]", "structure")]


def test_choice_alternative_with_its_primitive_extension_is_one(validator: Validator) -> None:
    ext = {"extension": [{"url": "http://x", "valueString": "y"}]}
    resource = mutated(OBSERVATION, lambda r: r.update(valueString="x", _valueString=ext))
    assert validator.validate(resource) == []
    resource = mutated(OBSERVATION, lambda r: r.update(valueString="x", _valueBoolean=ext))
    assert issues_of(validator, resource) == [("Observation.value[x]", "structure")]


# ---------------------------------------------------------------- empty values and nulls


@pytest.mark.parametrize(
    ("change", "path", "code"),
    [
        (lambda r: r["name"][0].update(family=""), "Patient.name[0].family", "value"),
        (lambda r: r.update(birthDate=""), "Patient.birthDate", "value"),
        (lambda r: r.update(maritalStatus={}), "Patient.maritalStatus", "structure"),
        (lambda r: r.update(maritalStatus={"id": "only-id"}), "Patient.maritalStatus", "structure"),
        (lambda r: r.update(name=[]), "Patient.name", "structure"),
        (lambda r: r["name"][0].update(given=[]), "Patient.name[0].given", "structure"),
        (lambda r: r.update(name=[{}]), "Patient.name[0]", "structure"),
        (lambda r: r.update(active=None), "Patient.active", "structure"),
        (lambda r: r.update(name=None), "Patient.name", "structure"),
        (lambda r: r.update(maritalStatus=None), "Patient.maritalStatus", "structure"),
        (lambda r: r.update(name=[None]), "Patient.name[0]", "structure"),
        (
            lambda r: r["name"][0].update(given=["Peter", None]),
            "Patient.name[0].given[1]",
            "structure",
        ),
        (lambda r: r.update(_birthDate=None), "Patient._birthDate", "structure"),
        (lambda r: r.update(_birthDate={}), "Patient._birthDate", "structure"),
    ],
)
def test_empty_and_null(
    validator: Validator, change: Callable[[Json], None], path: str, code: str
) -> None:
    assert issues_of(validator, mutated(PATIENT, change)) == [(path, code)]


def test_primitive_extension_arrays(validator: Validator) -> None:
    ext = {"extension": [{"url": "http://x", "valueString": "y"}]}
    ok = {"resourceType": "Patient", "name": [{"given": ["a", None], "_given": [None, ext]}]}
    assert validator.validate(ok) == []
    short = {"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [ext]}]}
    assert issues_of(validator, short) == [("Patient.name[0]._given", "structure")]
    both_null = {"resourceType": "Patient", "name": [{"given": ["a", None], "_given": [ext, None]}]}
    assert issues_of(validator, both_null) == [("Patient.name[0].given[1]", "structure")]
    not_array = {"resourceType": "Patient", "name": [{"given": ["a"], "_given": ext}]}
    assert issues_of(validator, not_array) == [("Patient.name[0]._given", "structure")]
    single_as_array = {"resourceType": "Patient", "birthDate": "2000", "_birthDate": [ext]}
    assert issues_of(validator, single_as_array) == [("Patient._birthDate", "structure")]
    bad_item = {"resourceType": "Patient", "name": [{"given": ["a"], "_given": ["x"]}]}
    assert issues_of(validator, bad_item) == [("Patient.name[0]._given[0]", "structure")]
    unknown_inside = {"resourceType": "Patient", "birthDate": "2000", "_birthDate": {"value": "x"}}
    assert issues_of(validator, unknown_inside) == [("Patient._birthDate.value", "structure")]


# ---------------------------------------------------------------- primitive formats and ranges


def _obs(**value: Any) -> Json:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "t"}, **value}


@pytest.mark.parametrize(
    ("resource", "path", "code"),
    [
        ({"resourceType": "Patient", "birthDate": "1974-13-01"}, "Patient.birthDate", "value"),
        ({"resourceType": "Patient", "birthDate": "1974-12-32"}, "Patient.birthDate", "value"),
        ({"resourceType": "Patient", "birthDate": "2023-02-29"}, "Patient.birthDate", "value"),
        ({"resourceType": "Patient", "birthDate": "1900-02-29"}, "Patient.birthDate", "value"),
        ({"resourceType": "Patient", "birthDate": "1974-04-31"}, "Patient.birthDate", "value"),
        ({"resourceType": "Patient", "birthDate": "25.12.1974"}, "Patient.birthDate", "value"),
        (
            {"resourceType": "Patient", "birthDate": "1974-12-25T10:00:00Z"},
            "Patient.birthDate",
            "value",
        ),
        (
            {"resourceType": "Patient", "deceasedDateTime": "2020-01-01T10:00:00"},
            "Patient.deceasedDateTime",
            "value",
        ),
        (
            {"resourceType": "Patient", "deceasedDateTime": "2020-01-01T10:00Z"},
            "Patient.deceasedDateTime",
            "value",
        ),
        (_obs(issued="2020-01-01"), "Observation.issued", "value"),
        (_obs(valueTime="24:00:00"), "Observation.valueTime", "value"),
        (_obs(valueInteger=2147483648), "Observation.valueInteger", "value"),
        (_obs(valueInteger=-2147483649), "Observation.valueInteger", "value"),
        (_obs(valueInteger=1.5), "Observation.valueInteger", "structure"),
        (_obs(valueInteger="1"), "Observation.valueInteger", "structure"),
        (_obs(valueQuantity={"value": "1.0"}), "Observation.valueQuantity.value", "structure"),
        (_obs(valueQuantity={"value": True}), "Observation.valueQuantity.value", "structure"),
        (_obs(valueQuantity={"value": float("nan")}), "Observation.valueQuantity.value", "value"),
        (_obs(valueQuantity={"value": float("inf")}), "Observation.valueQuantity.value", "value"),
        (_obs(valueBoolean="false"), "Observation.valueBoolean", "structure"),
        (_obs(valueString="bell\x07"), "Observation.valueString", "value"),
        (_obs(valueString="nul\x00"), "Observation.valueString", "value"),
        (_obs(valueString="x" * (1024 * 1024 + 1)), "Observation.valueString", "value"),
        (
            _obs(
                valueSampledData={"origin": {"value": 0}, "period": 1, "dimensions": 0, "data": "1"}
            ),
            "Observation.valueSampledData.dimensions",
            "value",
        ),
        ({"resourceType": "Patient", "telecom": [{"rank": 0}]}, "Patient.telecom[0].rank", "value"),
        (
            {"resourceType": "Patient", "telecom": [{"rank": -1}]},
            "Patient.telecom[0].rank",
            "value",
        ),
        ({"resourceType": "Patient", "photo": [{"size": -1}]}, "Patient.photo[0].size", "value"),
        (
            {"resourceType": "Patient", "photo": [{"data": "not base64!"}]},
            "Patient.photo[0].data",
            "value",
        ),
        ({"resourceType": "Patient", "photo": [{"data": "abc"}]}, "Patient.photo[0].data", "value"),
        (
            {"resourceType": "Patient", "photo": [{"url": "http://x/a b"}]},
            "Patient.photo[0].url",
            "value",
        ),
        (
            {"resourceType": "Patient", "implicitRules": "has space"},
            "Patient.implicitRules",
            "value",
        ),
        ({"resourceType": "Patient", "language": "en  US"}, "Patient.language", "value"),
        (
            {"resourceType": "Patient", "identifier": [{"system": "urn:uuid:NOT-A-UUID"}]},
            "Patient.identifier[0].system",
            None,
        ),
        (
            {"resourceType": "Patient", "text": {"status": "generated", "div": "plain text"}},
            "Patient.text.div",
            "value",
        ),
        (
            {"resourceType": "Patient", "text": {"status": "generated", "div": ""}},
            "Patient.text.div",
            "value",
        ),
        (
            {"resourceType": "Questionnaire", "status": "draft", "url": "http://x y"},
            "Questionnaire.url",
            "value",
        ),
    ],
)
def test_primitive_formats(
    validator: Validator, resource: Json, path: str, code: str | None
) -> None:
    if code is None:  # Identifier.system is a plain uri: only whitespace is a format error
        assert validator.validate(resource) == []
        return
    assert issues_of(validator, resource) == [(path, code)]


def _official(type_name: str) -> re.Pattern[str]:
    regex = r4.load_tables()["primitives"][type_name]["regex"]
    assert regex is not None
    return re.compile(regex, re.ASCII)


_TEXT = st.text(alphabet=st.sampled_from(list("ab:/ \t\n\r\x0b\x0c\u00a0\u2028é")), max_size=8)


@settings(max_examples=300, deadline=None)
@given(value=_TEXT)
def test_uri_and_code_checks_agree_with_the_official_regex(
    validator: Validator, value: str
) -> None:
    # The validator skips the regex when a cheaper test proves a match: same verdicts.
    for element, type_name in (("implicitRules", "uri"), ("language", "code")):
        issues = validator.validate({"resourceType": "Patient", element: value})
        expected_ok = bool(value) and _official(type_name).fullmatch(value) is not None
        assert (issues == []) == expected_ok, (type_name, value)


@settings(max_examples=300, deadline=None)
@given(
    year=st.integers(min_value=1, max_value=9999),
    month=st.integers(min_value=1, max_value=12),
    day=st.integers(min_value=1, max_value=31),
)
def test_dates_must_exist(validator: Validator, year: int, month: int, day: int) -> None:
    try:
        datetime.date(year, month, day)
        exists = True
    except ValueError:
        exists = False
    value = f"{year:04d}-{month:02d}-{day:02d}"
    for element in ("birthDate", "deceasedDateTime"):
        assert (validator.validate({"resourceType": "Patient", element: value}) == []) == exists


@pytest.mark.parametrize("bad_id", ["", "a b", "a/b", "x" * 65, "ä", "a_b"])
def test_resource_id_format(validator: Validator, bad_id: str) -> None:
    assert issues_of(validator, {"resourceType": "Patient", "id": bad_id}) == [
        ("Patient.id", "value")
    ]


def test_element_id_is_a_string_not_an_id(validator: Validator) -> None:
    resource = {"resourceType": "Patient", "name": [{"id": "any thing_ok", "family": "x"}]}
    assert validator.validate(resource) == []


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/123",
        "Patient/a.b-C",
        "Patient/123/_history/4",
        "http://example.org/fhir/Patient/123",
        "https://example.org/fhir/Patient/123/_history/1",
        "#org1",
        "#",
        "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
        "urn:oid:2.16.840.1.113883",
    ],
)
def test_valid_references(validator: Validator, reference: str) -> None:
    assert (
        validator.validate(
            {"resourceType": "Patient", "managingOrganization": {"reference": reference}}
        )
        == []
    )


@pytest.mark.parametrize(
    "reference",
    [
        "Patient",
        "Patient/",
        "Patient/12 3",
        "Patient/123/_history/",
        "Patient/123/extra",
        "/Patient/123",
        "Foo/123",
        "patient/123",
        "#bad id",
        "urn:uuid:NOT-A-UUID",
        "urn:oid:9.9",
        "http://",
        "ftp://x/Patient/1",
        "Patient?identifier=123",
    ],
)
def test_invalid_references(validator: Validator, reference: str) -> None:
    resource = {"resourceType": "Patient", "managingOrganization": {"reference": reference}}
    assert issues_of(validator, resource) == [("Patient.managingOrganization.reference", "value")]


def test_reference_inside_choice_and_arrays(validator: Validator) -> None:
    resource = mutated(
        PATIENT_EXTENDED, lambda r: r["extension"][3]["valueReference"].update(reference="Nope/1")
    )
    assert issues_of(validator, resource) == [
        ("Patient.extension[3].valueReference.reference", "value")
    ]
    resource = mutated(OBSERVATION, lambda r: r["performer"].append({"reference": "Practitioner"}))
    assert issues_of(validator, resource) == [("Observation.performer[1].reference", "value")]


# ---------------------------------------------------------------- required bindings


def test_required_binding_on_code(validator: Validator) -> None:
    assert issues_of(validator, {"resourceType": "Patient", "gender": "mail"}) == [
        ("Patient.gender", "code-invalid")
    ]
    resource = mutated(OBSERVATION, lambda r: r.update(status="done"))
    assert issues_of(validator, resource) == [("Observation.status", "code-invalid")]
    resource = mutated(PATIENT, lambda r: r["contact"][0].update(gender="F"))
    assert issues_of(validator, resource) == [("Patient.contact[0].gender", "code-invalid")]
    resource = mutated(PATIENT, lambda r: r["telecom"][1].update(system="fax2"))
    assert issues_of(validator, resource) == [("Patient.telecom[1].system", "code-invalid")]


def test_required_binding_on_code_arrays(validator: Validator) -> None:
    resource = mutated(QUESTIONNAIRE, lambda r: r.update(subjectType=["Patient", "Human"]))
    assert issues_of(validator, resource) == [("Questionnaire.subjectType[1]", "code-invalid")]


def test_required_binding_on_codeable_concept(validator: Validator) -> None:
    system = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    resource = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/1"},
        "clinicalStatus": {
            "coding": [
                {"system": "http://example.org", "code": "x"},
                {"system": system, "code": "gone"},
            ]
        },
    }
    assert issues_of(validator, resource) == [
        ("Condition.clinicalStatus.coding[1].code", "code-invalid")
    ]


def test_code_invalid_also_in_contained_and_bundles(validator: Validator) -> None:
    resource = mutated(BUNDLE, lambda r: r["entry"][0]["resource"].update(gender="f"))
    assert issues_of(validator, resource) == [("Bundle.entry[0].resource.gender", "code-invalid")]
    resource = mutated(BUNDLE, lambda r: r["entry"][2]["request"].update(method="REMOVE"))
    assert issues_of(validator, resource) == [("Bundle.entry[2].request.method", "code-invalid")]


def test_unexpandable_value_sets_are_not_checked(validator: Validator) -> None:
    # Attachment.contentType is bound (required) to mime types: not expandable, no check.
    resource = {"resourceType": "Patient", "photo": [{"contentType": "application/x-made-up"}]}
    assert validator.validate(resource) == []


# ---------------------------------------------------------------- contained resources


def test_contained_resources_are_validated(validator: Validator) -> None:
    resource = mutated(PATIENT_EXTENDED, lambda r: r["contained"][0].update(nme="x", active="yes"))
    assert issues_of(validator, resource) == [
        ("Patient.contained[0].active", "structure"),
        ("Patient.contained[0].nme", "structure"),
    ]
    resource = mutated(PATIENT_EXTENDED, lambda r: r["contained"].append({"id": "x"}))
    assert issues_of(validator, resource) == [("Patient.contained[2].resourceType", "required")]
    resource = mutated(PATIENT_EXTENDED, lambda r: r["contained"].append({"resourceType": "Nope"}))
    assert issues_of(validator, resource) == [("Patient.contained[2].resourceType", "invalid")]


def test_contained_must_not_contain(validator: Validator) -> None:
    nested = {
        "resourceType": "Organization",
        "id": "o",
        "contained": [{"resourceType": "Patient", "id": "p"}],
    }
    resource = {"resourceType": "Patient", "contained": [nested]}
    assert issues_of(validator, resource) == [("Patient.contained[0].contained", "invalid")]


def test_contained_meta_rules(validator: Validator) -> None:
    contained = {
        "resourceType": "Organization",
        "id": "o",
        "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"},
    }
    resource = {"resourceType": "Patient", "contained": [contained]}
    assert issues_of(validator, resource) == [
        ("Patient.contained[0].meta.versionId", "invalid"),
        ("Patient.contained[0].meta.lastUpdated", "invalid"),
    ]


def test_bundle_entries_may_contain(validator: Validator) -> None:
    entry = {
        "resource": copy.deepcopy(MEDICATION_REQUEST),
        "request": {"method": "POST", "url": "MedicationRequest"},
    }
    resource = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    assert validator.validate(resource) == []


# ---------------------------------------------------------------- extensions


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        ({"valueString": "x"}, [("Patient.extension[0].url", "required")]),
        (
            {"url": "http://x", "valueString": "x", "valueBoolean": True},
            [("Patient.extension[0].value[x]", "structure")],
        ),
        ({"url": "http://x"}, [("Patient.extension[0]", "invalid")]),
        (
            {
                "url": "http://x",
                "valueString": "x",
                "extension": [{"url": "y", "valueString": "z"}],
            },
            [("Patient.extension[0]", "invalid")],
        ),
        (
            {"url": "http://x", "valueFoo": "x"},
            [("Patient.extension[0].valueFoo", "structure"), ("Patient.extension[0]", "invalid")],
        ),
        (
            {"url": "http://x", "valueInteger": "1"},
            [("Patient.extension[0].valueInteger", "structure")],
        ),
        (
            {"url": "http://x", "extension": [{"url": "a"}]},
            [("Patient.extension[0].extension[0]", "invalid")],
        ),
        ({"url": "", "valueString": "x"}, [("Patient.extension[0].url", "value")]),
    ],
)
def test_extension_rules(
    validator: Validator, extension: Json, expected: list[tuple[str, str]]
) -> None:
    assert issues_of(validator, {"resourceType": "Patient", "extension": [extension]}) == expected


def test_modifier_extension_and_primitive_extension_rules(validator: Validator) -> None:
    resource: Json = {"resourceType": "Patient", "modifierExtension": [{"valueBoolean": True}]}
    assert issues_of(validator, resource) == [("Patient.modifierExtension[0].url", "required")]
    resource = {
        "resourceType": "Patient",
        "_birthDate": {"extension": [{"url": "http://x", "valueDate": "1999-02-30"}]},
    }
    assert issues_of(validator, resource) == [
        ("Patient._birthDate.extension[0].valueDate", "value")
    ]
    resource = {"resourceType": "Patient", "_birthDate": {"extension": "not an array"}}
    assert issues_of(validator, resource) == [("Patient._birthDate.extension", "structure")]


# ---------------------------------------------------------------- messages, limits, depth


def test_messages_never_echo_values(validator: Validator) -> None:
    resource: Json = {
        "resourceType": "Patient",
        "id": SECRET + " x",
        "gender": SECRET,
        "birthDate": SECRET,
        "active": SECRET,
        "multipleBirthInteger": SECRET,
        "name": [{"family": SECRET + "\x01", "given": [SECRET, None]}],
        "telecom": SECRET,
        "managingOrganization": {"reference": SECRET + " bad"},
        "generalPractitioner": [{"reference": "Nope/" + SECRET}],
        "photo": [{"data": SECRET + "!", "size": SECRET}],
        "text": {"status": SECRET, "div": SECRET},
        "extension": [{"url": SECRET + " x", "valueCode": SECRET + "  x"}],
        "contained": [{"resourceType": SECRET}],
        "maritalStatus": {"coding": [{"system": SECRET, "code": SECRET}]},
    }
    issues = validator.validate(resource)
    assert len(issues) >= 15
    for issue in issues:
        assert SECRET not in issue.message
        assert SECRET not in issue.path


def test_issue_fields(validator: Validator) -> None:
    [issue] = validator.validate({"resourceType": "Patient", "gender": "x"})
    assert isinstance(issue, ValidationIssue)
    assert issue == ValidationIssue("Patient.gender", "code-invalid", issue.message)
    assert "administrative-gender" in issue.message
    with pytest.raises(AttributeError):
        issue.code = "value"  # type: ignore[misc]


def test_issue_count_is_limited(validator: Validator) -> None:
    resource: Json = {"resourceType": "Patient", **{f"bad{i}": i for i in range(1000)}}
    issues = validator.validate(resource)
    assert len(issues) == 100
    assert issues[-1].code == "invalid"
    assert "too many" in issues[-1].message
    assert issues[0].path == "Patient.bad0"


def test_custom_limits() -> None:
    small = Validator(r4.load_tables(), max_issues=5, max_depth=3)
    resource: Json = {"resourceType": "Patient", **{f"bad{i}": i for i in range(10)}}
    assert len(small.validate(resource)) == 5
    deep = {
        "resourceType": "Questionnaire",
        "status": "draft",
        "item": [
            {
                "linkId": "1",
                "type": "group",
                "item": [
                    {
                        "linkId": "2",
                        "type": "group",
                        "item": [
                            {
                                "linkId": "3",
                                "type": "group",
                                "item": [{"linkId": "4", "type": "display"}],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    assert issues_of(small, deep) == [
        ("Questionnaire.item[0].item[0].item[0].item[0]", "structure")
    ]
    with pytest.raises(ValueError):
        Validator(r4.load_tables(), max_issues=1)


def test_deep_nesting_gives_an_issue_not_recursion_error(validator: Validator) -> None:
    ext: Json = {"url": "http://x", "valueString": "leaf"}
    for _ in range(5000):
        ext = {"url": "http://x", "extension": [ext]}
    issues = validator.validate({"resourceType": "Patient", "extension": [ext]})
    assert len(issues) == 1
    assert issues[0].code == "structure"
    assert "deeper" in issues[0].message

    item: Json = {"linkId": "leaf", "type": "display"}
    for _ in range(5000):
        item = {"linkId": "x", "type": "group", "item": [item]}
    issues = validator.validate(
        {"resourceType": "Questionnaire", "status": "draft", "item": [item]}
    )
    assert [i.code for i in issues] == ["structure"]

    bundle: Json = {"resourceType": "Parameters"}
    for _ in range(3000):
        bundle = {"resourceType": "Parameters", "parameter": [{"name": "p", "resource": bundle}]}
    assert [i.code for i in validator.validate(bundle)] == ["structure"]


def test_realistic_nesting_depth_is_accepted(validator: Validator) -> None:
    item: Json = {"linkId": "leaf", "type": "display"}
    for _ in range(25):
        item = {"linkId": "x", "type": "group", "item": [item]}
    assert (
        validator.validate({"resourceType": "Questionnaire", "status": "draft", "item": [item]})
        == []
    )


def test_validator_is_reusable_across_threads(validator: Validator) -> None:
    bad = mutated(PATIENT, lambda r: r.update(gender="mail", famly="x"))
    cases = [PATIENT, bad, OBSERVATION, BUNDLE, QUESTIONNAIRE] * 40
    expected = [validator.validate(c) for c in cases]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(validator.validate, cases))
    assert results == expected
    assert Validator.default() is validator
