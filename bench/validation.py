"""Throughput of fhirvault.domain.validation on realistic R4 resources (CPU time).

Corpus: the hand-written resources below, a carebundle cohort (``--patients``, the data of
bench/ingest.py and bench/bulk_import.py: every resource has a generated narrative), the
R4 XML examples of tests/data converted to JSON, and resources with a large narrative.

Run:
  .venv/bin/python bench/validation.py                  # this checkout, rates + cProfile top 20
  .venv/bin/python bench/validation.py --old OLD/src     # old vs new in the same run: the two
                                                         # sides alternate in child processes
Rates are resources per CPU second (time.process_time; a Bundle counts as one), the median
of the rounds. "cold" clears the narrative verdict cache before each pass over a part of the
corpus (repeats within it, as in real data, still hit it); "warm" keeps it between passes.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fhirvault.domain import r4, xhtml
from fhirvault.domain.validation import Validator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def _narrative_table(rows: int) -> str:
    """A discharge-summary-like narrative: headings, a table of results, a list."""
    cells = "".join(
        f"<tr><td>2024-05-{1 + i % 28:02d}</td><td>Creatinine [Mass/volume] in Serum</td>"
        f'<td style="text-align:right">{0.7 + i / 100:.2f} mg/dL</td><td>N</td></tr>'
        for i in range(rows)
    )
    return (
        '<div xmlns="http://www.w3.org/1999/xhtml"><h2>Discharge summary</h2>'
        "<p>Admitted for <b>community-acquired pneumonia</b>; treated with amoxicillin. "
        'See <a href="https://example.org/guidelines/cap">the guideline</a>.</p>'
        "<table><thead><tr><th>Date</th><th>Test</th><th>Value</th><th>Flag</th></tr></thead>"
        f"<tbody>{cells}</tbody></table><ul><li>Follow-up in 2 weeks</li>"
        "<li>Repeat chest X-ray in 6 weeks</li></ul></div>"
    )


def narrative_resources() -> list[dict[str, Any]]:
    out = []
    for i, rows in enumerate((5, 40, 120)):
        out.append({
            "resourceType": "Composition",
            "id": f"comp-{i}",
            "text": {"status": "generated", "div": _narrative_table(rows)},
            "status": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
            "subject": {"reference": "Patient/pat-1"},
            "date": "2024-05-02T10:00:00Z",
            "author": [{"reference": "Practitioner/prac-1"}],
            "title": "Discharge summary",
            "section": [{"title": "Hospital course", "text": {
                "status": "generated", "div": _narrative_table(rows // 5 + 1)}}],
        })
    return out


def xml_examples() -> list[dict[str, Any]]:
    from fhirvault.fhir.xml import xml_to_json

    folder = ROOT / "tests" / "data" / "fhir-r4-xml"
    return [json.loads(xml_to_json(p.read_bytes())) for p in sorted(folder.glob("*.xml"))]


def cohort(patients: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(transaction Bundles, their resources) of a carebundle cohort, cached on disk."""
    import _synthetic as syn

    path = syn.ensure_cohort(syn.DEFAULT_CACHE, patients, 1, log=lambda _m: None)
    bundles = [json.loads(body) for _n, body in syn.load_bundles(path, patients)]
    return bundles, [e["resource"] for b in bundles for e in b["entry"]]


def corpus(patients: int) -> dict[str, list[dict[str, Any]]]:
    bundles, resources = cohort(patients)
    return {
        "hand-written": list(CASES.values()),
        "carebundle resources": resources,
        "carebundle bundles": bundles,
        "R4 XML examples": xml_examples(),
        "large narratives": narrative_resources(),
    }


def timed_passes(validator: Validator, resources: list[dict[str, Any]], cold: bool,
                 seconds: float) -> float:
    """Resources per CPU second over passes of `resources` lasting `seconds` in all."""
    total = 0.0
    count = 0
    while total < seconds:
        if cold and hasattr(xhtml, "clear_cache"):
            xhtml.clear_cache()
        start = time.process_time()
        for resource in resources:
            validator.validate(resource)
        total += time.process_time() - start
        count += len(resources)
    return count / total


def rates(patients: int, seconds: float) -> dict[str, dict[str, float]]:
    """Resources per CPU second of each part of the corpus, cold and warm."""
    validator = Validator.default()
    out: dict[str, dict[str, float]] = {}
    for name, resources in corpus(patients).items():
        for resource in resources:
            if issues := validator.validate(resource):
                raise SystemExit(f"{name}: {resource.get('resourceType')} is not valid: {issues}")
        out[name] = {
            mode: timed_passes(validator, resources, mode == "cold", seconds)
            for mode in ("cold", "warm")
        }
    return out


def profile(patients: int) -> None:
    validator = Validator.default()
    _bundles, resources = cohort(patients)
    resources = resources + narrative_resources()
    profiler = cProfile.Profile()
    for _ in range(3):
        if hasattr(xhtml, "clear_cache"):
            xhtml.clear_cache()
        profiler.runcall(lambda: [validator.validate(r) for r in resources])
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def child(src: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, __file__, "--json", "--patients", str(args.patients),
           "--seconds", str(args.seconds)]
    result: dict[str, dict[str, float]] = json.loads(
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    )
    return result


def compare(args: argparse.Namespace) -> None:
    sides = {"old": str(Path(args.old).resolve()), "new": str(ROOT / "src")}
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for side, src in sides.items():  # alternate, so that load changes hit both
            runs[side].append(child(src, args))
    print(f"{'part':24s} {'mode':5s} {'old res/s':>12s} {'new res/s':>12s} {'speed-up':>9s}")
    for name in runs["new"][0]:
        for mode in ("cold", "warm"):
            old = statistics.median(r[name][mode] for r in runs["old"])
            new = statistics.median(r[name][mode] for r in runs["new"])
            print(f"{name:24s} {mode:5s} {old:12,.0f} {new:12,.0f} {new / old:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=20, help="carebundle patients")
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU time per part and mode")
    parser.add_argument("--old", help="src/ folder of the build to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --old")
    parser.add_argument("--json", action="store_true", help="print the rates as JSON")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    if args.old:
        compare(args)
        return
    if args.json:
        print(json.dumps(rates(args.patients, args.seconds)))
        return
    start = time.process_time()
    Validator(r4.load_tables())
    print(f"load + compile: {(time.process_time() - start) * 1e3:.1f} ms CPU")
    for name, row in rates(args.patients, args.seconds).items():
        print(f"{name:24s} cold {row['cold']:10,.0f} res/s  warm {row['warm']:10,.0f} res/s")
    if not args.no_profile:
        profile(args.patients)


if __name__ == "__main__":
    main()
