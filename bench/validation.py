"""Throughput of fhirvault.domain.validation on realistic R4 resources.

Run: .venv/bin/python bench/validation.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from fhirvault.domain import r4
from fhirvault.domain.validation import Validator

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat-1",
    "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z"},
    "text": {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Jane Doe</div>',
    },
    "extension": [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
            "valueCode": "F",
        }
    ],
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
        }
    ],
    "active": True,
    "name": [
        {"use": "official", "family": "Doe", "given": ["Jane", "Q"]},
        {"use": "maiden", "family": "Roe", "given": ["Jane"], "period": {"end": "2002"}},
    ],
    "telecom": [
        {"system": "phone", "value": "+1 555 0100", "use": "home", "rank": 1},
        {"system": "email", "value": "jane@example.org"},
    ],
    "gender": "female",
    "birthDate": "1974-12-25",
    "_birthDate": {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1974-12-25T14:35:45-05:00",
            }
        ]
    },
    "deceasedBoolean": False,
    "address": [
        {
            "use": "home",
            "line": ["534 Erewhon St"],
            "city": "PleasantVille",
            "postalCode": "3999",
            "country": "AU",
        }
    ],
    "maritalStatus": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}
        ]
    },
    "contact": [
        {
            "relationship": [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}
                    ]
                }
            ],
            "name": {"family": "Doe", "given": ["John"]},
            "telecom": [{"system": "phone", "value": "+1 555 0101"}],
            "gender": "male",
        }
    ],
    "communication": [
        {
            "language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en-US"}]},
            "preferred": True,
        }
    ],
    "generalPractitioner": [{"reference": "Practitioner/prac-1", "display": "Dr. A"}],
    "managingOrganization": {"reference": "Organization/org-1"},
}

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "bp-1",
    "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]},
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                    "display": "Vital Signs",
                }
            ]
        }
    ],
    "code": {
        "coding": [
            {"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}
        ],
        "text": "Blood pressure",
    },
    "subject": {"reference": "Patient/pat-1"},
    "encounter": {"reference": "Encounter/enc-1"},
    "effectiveDateTime": "2024-05-01T09:30:00+02:00",
    "issued": "2024-05-01T09:35:12.123Z",
    "performer": [{"reference": "Practitioner/prac-1"}],
    "interpretation": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": "N",
                }
            ]
        }
    ],
    "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003"}]},
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {
                "value": 120,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {
                "value": 78.5,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
            "referenceRange": [
                {"low": {"value": 60, "unit": "mmHg"}, "high": {"value": 80, "unit": "mmHg"}}
            ],
        },
    ],
}

ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
    "subject": {"reference": "Patient/pat-1"},
    "participant": [
        {
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "PPRF",
                        }
                    ]
                }
            ],
            "individual": {"reference": "Practitioner/prac-1"},
        }
    ],
    "period": {"start": "2024-05-01T09:00:00+02:00", "end": "2024-05-01T09:45:00+02:00"},
    "reasonCode": [{"text": "Routine check-up"}],
    "diagnosis": [{"condition": {"reference": "Condition/cond-1"}, "rank": 1}],
    "serviceProvider": {"reference": "Organization/org-1"},
}

MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "medrx-1",
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "582620"}],
        "text": "Nizatidine 15 MG/ML Oral Solution",
    },
    "subject": {"reference": "Patient/pat-1"},
    "authoredOn": "2024-05-01",
    "requester": {"reference": "Practitioner/prac-1"},
    "dosageInstruction": [
        {
            "sequence": 1,
            "text": "10 mL twice daily",
            "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
            "route": {"coding": [{"system": "http://snomed.info/sct", "code": "26643006"}]},
            "doseAndRate": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/dose-rate-type",
                                "code": "ordered",
                            }
                        ]
                    },
                    "doseQuantity": {
                        "value": 10,
                        "unit": "mL",
                        "system": "http://unitsofmeasure.org",
                        "code": "mL",
                    },
                }
            ],
        }
    ],
    "dispenseRequest": {
        "validityPeriod": {"start": "2024-05-01", "end": "2024-11-01"},
        "numberOfRepeatsAllowed": 3,
        "quantity": {
            "value": 480,
            "unit": "mL",
            "system": "http://unitsofmeasure.org",
            "code": "mL",
        },
        "expectedSupplyDuration": {
            "value": 30,
            "unit": "days",
            "system": "http://unitsofmeasure.org",
            "code": "d",
        },
    },
}

QUESTIONNAIRE: dict[str, Any] = {
    "resourceType": "Questionnaire",
    "id": "phq-2",
    "url": "http://example.org/Questionnaire/phq-2",
    "status": "active",
    "title": "PHQ-2",
    "item": [
        {
            "linkId": "g1",
            "type": "group",
            "text": "Over the last two weeks",
            "item": [
                {
                    "linkId": "q1",
                    "type": "choice",
                    "text": "Little interest or pleasure in doing things",
                    "required": True,
                    "answerOption": [
                        {"valueCoding": {"system": "http://loinc.org", "code": "LA6568-5"}},
                        {"valueCoding": {"system": "http://loinc.org", "code": "LA6569-3"}},
                    ],
                },
                {
                    "linkId": "q2",
                    "type": "boolean",
                    "text": "Feeling down?",
                    "enableWhen": [{"question": "q1", "operator": "exists", "answerBoolean": True}],
                    "item": [{"linkId": "q2.1", "type": "string", "text": "Details"}],
                },
            ],
        }
    ],
}


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                "resource": copy.deepcopy(r),
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for i, r in enumerate(resources)
        ],
    }


CASES: dict[str, dict[str, Any]] = {
    "Patient": PATIENT,
    "Observation": OBSERVATION,
    "Encounter": ENCOUNTER,
    "MedicationRequest": MEDICATION_REQUEST,
    "Questionnaire": QUESTIONNAIRE,
    "Bundle(4 entries)": bundle(PATIENT, OBSERVATION, ENCOUNTER, MEDICATION_REQUEST),
}


def measure(validator: Validator, resource: dict[str, Any], seconds: float) -> tuple[int, float]:
    """(iterations, elapsed) of back-to-back validations, after a warm-up."""
    for _ in range(50):
        validator.validate(resource)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            validator.validate(resource)
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.5, help="time per resource")
    args = parser.parse_args()

    start = time.perf_counter()
    tables = r4.load_tables()
    loaded = time.perf_counter()
    validator = Validator(tables)
    compiled = time.perf_counter()
    print(
        f"load table: {(loaded - start) * 1e3:.1f} ms, compile validator: {(compiled - loaded) * 1e3:.1f} ms"
    )

    for name, resource in CASES.items():
        issues = validator.validate(resource)
        if issues:
            raise SystemExit(f"{name} is not valid: {issues}")
        count, elapsed = measure(validator, resource, args.seconds)
        print(
            f"{name:20s} {count / elapsed:10,.0f} validations/s  {elapsed / count * 1e6:8.1f} µs/resource"
        )


if __name__ == "__main__":
    main()
