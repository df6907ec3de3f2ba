#!/usr/bin/env python3
"""FHIR R4 CRUD load generator (the CRUD workload of Health Samurai's FHIR server benchmark).

With ``--mode crud`` (the default) each virtual user loops over iterations of:

1. create Patient, Location, Organization, Practitioner, then an Encounter
   (subject, participant, location, serviceProvider), an Observation (subject,
   encounter) and a MedicationRequest (subject, encounter, requester);
2. read each one (GET by id);
3. update each one (PUT with a small change, body carries the id);
4. delete each one, in reverse dependency order.

``--mode create`` runs step 1 only (an iteration is seven creates, nothing is
read, updated or deleted during the run). ``--mode read`` first lets the users
create a pool of ``--read-pool`` resources (step 1 repeated, not measured), then
each user loops GETting a random pool resource (an iteration is one read), and
at the end deletes the pool (unless ``--no-cleanup``; not measured either).

Resource bodies are generated once per process from ``--seed`` (a pool of
``--pool`` variants per type), serialized up front, and only have placeholders
(ids, references, an identifier suffix) substituted per request.

Example::

    python bench/crud.py --base-url http://127.0.0.1:8080/fhir \\
        --client-file /tmp/fv/admin-client.json \\
        --token-url http://127.0.0.1:8080/oauth2/token --clients 32 --duration 30 \\
        [--mode crud|create|read] [--read-pool 2000] [--cleanup | --no-cleanup]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import _loadgen as lg
from yarl import URL

# ---------------------------------------------------------------------------
# Workload definition
# ---------------------------------------------------------------------------

ORDER: tuple[str, ...] = (
    "Patient",
    "Location",
    "Organization",
    "Practitioner",
    "Encounter",
    "Observation",
    "MedicationRequest",
)
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "Encounter": ("Patient", "Location", "Organization", "Practitioner"),
    "Observation": ("Patient", "Encounter"),
    "MedicationRequest": ("Patient", "Encounter", "Practitioner"),
}
KINDS: tuple[str, ...] = ("create", "read", "update", "delete")
# --mode -> the operation kinds measured (and printed) in that mode
MODES: dict[str, tuple[str, ...]] = {"crud": KINDS, "create": ("create",), "read": ("read",)}
DEFAULT_READ_POOL = 2000

PH_ID = "@@ID@@"  # the resource's own id (update bodies)
PH_N = "@@N@@"  # per-iteration unique suffix for business identifiers
PH_ID_B = PH_ID.encode()
PH_N_B = PH_N.encode()


def ref_placeholder(rt: str) -> str:
    return f"@@{rt}@@"


FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

# --- vocabularies (real code systems; displays as published) ---------------

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V3_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ROLECODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V3_MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
V3_PARTTYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NPI = "http://hl7.org/fhir/sid/us-npi"

GIVEN = {
    "female": ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Sarah", "Maria",
               "Aiko", "Fatima", "Ingrid", "Amara", "Chloe", "Priya", "Sofia", "Hannah"),
    "male": ("James", "John", "Robert", "Michael", "William", "David", "Thomas", "Carlos",
             "Wei", "Ahmed", "Lars", "Kofi", "Raj", "Dmitri", "Mateo", "Noah"),
}  # fmt: skip
FAMILY = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
          "Martinez", "Lopez", "Nguyen", "Kim", "Okafor", "Schmidt", "Rossi", "Haddad",
          "Tanaka", "Novak", "Silva", "O'Brien", "Kowalski", "Andersen", "Patel", "Cohen")  # fmt: skip
STREETS = ("Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Washington Blvd",
           "Lake View Rd", "Park Pl", "Hillcrest Ave", "River Rd", "Sunset Blvd", "2nd St")  # fmt: skip
CITIES = (("Boston", "MA", "021"), ("Springfield", "IL", "627"), ("Austin", "TX", "787"),
          ("Portland", "OR", "972"), ("Denver", "CO", "802"), ("Madison", "WI", "537"),
          ("Raleigh", "NC", "276"), ("Columbus", "OH", "432"), ("Tucson", "AZ", "857"),
          ("Albany", "NY", "122"))  # fmt: skip
MARITAL = (("M", "Married"), ("S", "Never Married"), ("D", "Divorced"), ("W", "Widowed"))
LANGUAGES = (("en-US", "English (United States)"), ("es", "Spanish"), ("de", "German"),
             ("zh", "Chinese"), ("fr", "French"))  # fmt: skip
ENCOUNTER_CLASS = (("AMB", "ambulatory"), ("AMB", "ambulatory"), ("EMER", "emergency"),
                   ("IMP", "inpatient encounter"))  # fmt: skip
ENCOUNTER_TYPE = (("185349003", "Encounter for check up (procedure)"),
                  ("185345009", "Encounter for symptom (procedure)"),
                  ("390906007", "Follow-up encounter (procedure)"),
                  ("162673000", "General examination of patient (procedure)"))  # fmt: skip
REASONS = (("38341003", "Hypertensive disorder, systemic arterial (disorder)"),
           ("44054006", "Diabetes mellitus type 2 (disorder)"),
           ("195662009", "Acute viral pharyngitis (disorder)"),
           ("10509002", "Acute bronchitis (disorder)"),
           ("55822004", "Hyperlipidemia (disorder)"))  # fmt: skip
# (LOINC code, display, UCUM code, unit, low, high, decimals, category)
OBSERVATIONS = (
    ("8867-4", "Heart rate", "/min", "beats/minute", 52, 110, 0, "vital-signs"),
    ("9279-1", "Respiratory rate", "/min", "breaths/minute", 11, 22, 0, "vital-signs"),
    ("8310-5", "Body temperature", "Cel", "C", 36.0, 38.6, 1, "vital-signs"),
    ("29463-7", "Body weight", "kg", "kg", 45.0, 125.0, 1, "vital-signs"),
    ("8302-2", "Body height", "cm", "cm", 150.0, 198.0, 1, "vital-signs"),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "kg/m2", 18.0, 36.0, 1, "vital-signs"),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", "%", 92, 100, 0,
     "vital-signs"),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", "mg/dL", 70, 190, 0, "laboratory"),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "%", 4.6, 9.5, 1, "laboratory"),
)  # fmt: skip
MEDICATIONS = (("314076", "lisinopril 10 MG Oral Tablet"),
               ("197361", "amlodipine 5 MG Oral Tablet"),
               ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
               ("310798", "hydrochlorothiazide 25 MG Oral Tablet"),
               ("312961", "simvastatin 20 MG Oral Tablet"),
               ("313782", "acetaminophen 325 MG Oral Tablet"))  # fmt: skip
LOCATION_TYPES = (("HOSP", "Hospital"), ("GIM", "General internal medicine clinic"),
                  ("ER", "Emergency room"), ("PEDC", "Pediatrics clinic"))  # fmt: skip
ORG_SUFFIX = ("General Hospital", "Medical Center", "Community Clinic", "Health Partners",
              "Family Practice")  # fmt: skip


# --- helpers ---------------------------------------------------------------


def coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    cc: dict[str, Any] = {"coding": [coding(system, code, display)]}
    if text:
        cc["text"] = text
    return cc


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def phone(rng: random.Random) -> str:
    return f"+1 {rng.randint(201, 989)}-555-{digits(rng, 4)}"


def address(rng: random.Random, use: str) -> dict[str, Any]:
    city, state, zip3 = rng.choice(CITIES)
    return {
        "use": use,
        "type": "both",
        "line": [f"{rng.randint(1, 9999)} {rng.choice(STREETS)}"],
        "city": city,
        "state": state,
        "postalCode": f"{zip3}{digits(rng, 2)}",
        "country": "US",
    }


def date(rng: random.Random, y0: int, y1: int) -> str:
    return f"{rng.randint(y0, y1):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def datetime_(rng: random.Random, y0: int = 2023, y1: int = 2025) -> str:
    return f"{date(rng, y0, y1)}T{rng.randint(7, 19):02d}:{rng.choice((0, 15, 30, 45)):02d}:00Z"


def later(ts: str, minutes: int) -> str:
    """Shift an ``...THH:MM:00Z`` timestamp produced by datetime_ by < 4 h (stays same day)."""
    hh, mm = int(ts[11:13]), int(ts[14:16])
    total = hh * 60 + mm + minutes
    return f"{ts[:11]}{total // 60:02d}:{total % 60:02d}:00Z"


def person_name(rng: random.Random, gender: str) -> tuple[str, list[str]]:
    pool = GIVEN.get(gender) or GIVEN[rng.choice(("female", "male"))]
    given = [rng.choice(pool)]
    if rng.random() < 0.4:
        given.append(rng.choice(pool))
    return rng.choice(FAMILY), given


def email(given: str, family: str, domain: str) -> str:
    local = f"{given}.{family}".lower().replace("'", "")
    return f"{local}@{domain}"


def other_gender(g: str) -> str:
    return "other" if g == "unknown" else "unknown"


# --- resource builders: (create body, update body), placeholders as strings


def make_patient(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    gender = rng.choices(("female", "male", "other", "unknown"), (48, 48, 2, 2))[0]
    family, given = person_name(rng, gender)
    ms_code, ms_display = rng.choice(MARITAL)
    lang_code, lang_display = rng.choice(LANGUAGES)
    cfamily, cgiven = person_name(rng, rng.choice(("female", "male")))
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": concept(V2_0203, "MR", "Medical record number"),
                "system": "http://hospital.example.org/mrn",
                "value": f"MRN-{PH_N}",
            },
            {
                "use": "official",
                "type": concept(V2_0203, "SS", "Social Security number"),
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": f"999-{digits(rng, 2)}-{digits(rng, 4)}",
            },
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": given}],
        "telecom": [
            {"system": "phone", "value": phone(rng), "use": rng.choice(("home", "mobile"))},
            {"system": "email", "value": email(given[0], family, "example.com"), "use": "home"},
        ],
        "gender": gender,
        "birthDate": date(rng, 1935, 2020),
        "address": [address(rng, "home")],
        "maritalStatus": concept(V3_MARITAL, ms_code, ms_display),
        "contact": [
            {
                "relationship": [
                    concept(
                        "http://terminology.hl7.org/CodeSystem/v2-0131", "C", "Emergency Contact"
                    )
                ],
                "name": {"family": cfamily, "given": cgiven},
                "telecom": [{"system": "phone", "value": phone(rng), "use": "mobile"}],
            }
        ],
        "communication": [
            {"language": concept("urn:ietf:bcp:47", lang_code, lang_display), "preferred": True}
        ],
    }
    upd = dict(res, gender=other_gender(gender))
    return res, upd


def make_practitioner(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    gender = rng.choice(("female", "male"))
    family, given = person_name(rng, gender)
    res: dict[str, Any] = {
        "resourceType": "Practitioner",
        "identifier": [{"system": NPI, "value": f"1{digits(rng, 9)}"}],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": family,
                "given": given,
                "prefix": ["Dr."],
                "suffix": ["MD"],
            }
        ],
        "telecom": [
            {"system": "phone", "value": phone(rng), "use": "work"},
            {
                "system": "email",
                "value": email(given[0], family, "clinic.example.org"),
                "use": "work",
            },
        ],
        "address": [address(rng, "work")],
        "gender": gender,
        "birthDate": date(rng, 1950, 1995),
        "qualification": [
            {
                "identifier": [
                    {
                        "system": "http://example.org/medical-license",
                        "value": f"ML-{digits(rng, 6)}",
                    }
                ],
                "code": concept(
                    "http://terminology.hl7.org/CodeSystem/v2-0360", "MD", "Doctor of Medicine"
                ),
                "period": {"start": date(rng, 1980, 2015)},
            }
        ],
        "communication": [concept("urn:ietf:bcp:47", "en-US", "English (United States)")],
    }
    upd = dict(res, gender=other_gender(gender))
    return res, upd


def make_organization(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    city, _, _ = rng.choice(CITIES)
    name = f"{city} {rng.choice(ORG_SUFFIX)}"
    res: dict[str, Any] = {
        "resourceType": "Organization",
        "identifier": [
            {"system": NPI, "value": f"1{digits(rng, 9)}"},
            {
                "system": "urn:oid:2.16.840.1.113883.4.4",
                "value": f"{digits(rng, 2)}-{digits(rng, 7)}",
            },
        ],
        "active": True,
        "type": [
            concept(
                "http://terminology.hl7.org/CodeSystem/organization-type",
                "prov",
                "Healthcare Provider",
            )
        ],
        "name": name,
        "telecom": [
            {"system": "phone", "value": phone(rng), "use": "work"},
            {
                "system": "url",
                "value": f"https://{city.lower()}-health-{digits(rng, 3)}.example.org",
            },
        ],
        "address": [address(rng, "work")],
    }
    upd = dict(res, name=f"{name} (renamed)")
    return res, upd


def make_location(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    code, display = rng.choice(LOCATION_TYPES)
    addr = address(rng, "work")
    name = f"{addr['city']} {display} {rng.choice('ABCDEFGH')}{rng.randint(1, 9)}"
    res: dict[str, Any] = {
        "resourceType": "Location",
        "identifier": [{"system": "http://hospital.example.org/location", "value": f"LOC-{PH_N}"}],
        "status": "active",
        "name": name,
        "description": f"{display}, building {rng.choice('ABCDEFGH')}",
        "mode": "instance",
        "type": [concept(V3_ROLECODE, code, display)],
        "telecom": [{"system": "phone", "value": phone(rng), "use": "work"}],
        "address": addr,
        "physicalType": concept(
            "http://terminology.hl7.org/CodeSystem/location-physical-type", "bu", "Building"
        ),
        "position": {
            "longitude": round(rng.uniform(-122.5, -71.0), 6),
            "latitude": round(rng.uniform(30.0, 47.5), 6),
        },
    }
    upd = dict(res, name=f"{name} (renamed)")
    return res, upd


def make_encounter(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    cls_code, cls_display = rng.choice(ENCOUNTER_CLASS)
    type_code, type_display = rng.choice(ENCOUNTER_TYPE)
    reason_code, reason_display = rng.choice(REASONS)
    start = datetime_(rng)
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "identifier": [{"system": "http://hospital.example.org/encounter", "value": f"ENC-{PH_N}"}],
        "status": "in-progress",
        "class": coding(V3_ACTCODE, cls_code, cls_display),
        "type": [concept(SNOMED, type_code, type_display)],
        "subject": {"reference": ref_placeholder("Patient")},
        "participant": [
            {
                "type": [concept(V3_PARTTYPE, "PPRF", "primary performer")],
                "period": {"start": start},
                "individual": {"reference": ref_placeholder("Practitioner")},
            }
        ],
        "period": {"start": start},
        "reasonCode": [concept(SNOMED, reason_code, reason_display)],
        "location": [{"location": {"reference": ref_placeholder("Location")}, "status": "active"}],
        "serviceProvider": {"reference": ref_placeholder("Organization")},
    }
    upd = dict(res, status="finished", period={"start": start, "end": later(start, 45)})
    return res, upd


def make_observation(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    code, display, ucum, unit, lo, hi, decimals, category = rng.choice(OBSERVATIONS)
    value: float | int = (
        round(rng.uniform(lo, hi), decimals) if decimals else rng.randint(int(lo), int(hi))
    )
    effective = datetime_(rng)
    issued = f"{later(effective, 20)[:-1]}.000Z"
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            concept(
                "http://terminology.hl7.org/CodeSystem/observation-category",
                category,
                "Vital Signs" if category == "vital-signs" else "Laboratory",
            )
        ],
        "code": concept(LOINC, code, display, text=display),
        "subject": {"reference": ref_placeholder("Patient")},
        "encounter": {"reference": ref_placeholder("Encounter")},
        "effectiveDateTime": effective,
        "issued": issued,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }
    upd = dict(res, status="amended", issued=f"{later(effective, 90)[:-1]}.000Z")
    return res, upd


def make_medication_request(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    rx_code, rx_display = rng.choice(MEDICATIONS)
    reason_code, reason_display = rng.choice(REASONS)
    per_day = rng.choice((1, 1, 2, 3))
    res: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "identifier": [{"system": "http://hospital.example.org/rx", "value": f"RX-{PH_N}"}],
        "status": "active",
        "intent": "order",
        "category": [
            concept(
                "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                "outpatient",
                "Outpatient",
            )
        ],
        "medicationCodeableConcept": concept(RXNORM, rx_code, rx_display, text=rx_display),
        "subject": {"reference": ref_placeholder("Patient")},
        "encounter": {"reference": ref_placeholder("Encounter")},
        "authoredOn": datetime_(rng),
        "requester": {"reference": ref_placeholder("Practitioner")},
        "reasonCode": [concept(SNOMED, reason_code, reason_display)],
        "dosageInstruction": [
            {
                "sequence": 1,
                "text": f"Take 1 tablet by mouth {('once', 'twice', 'three times')[per_day - 1]} daily",
                "timing": {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}},
                "route": concept(SNOMED, "26643006", "Oral route"),
                "doseAndRate": [
                    {
                        "type": concept(
                            "http://terminology.hl7.org/CodeSystem/dose-rate-type",
                            "ordered",
                            "Ordered",
                        ),
                        "doseQuantity": {
                            "value": 1,
                            "unit": "tablet",
                            "system": UCUM,
                            "code": "{tbl}",
                        },
                    }
                ],
            }
        ],
        "dispenseRequest": {
            "numberOfRepeatsAllowed": rng.randint(0, 5),
            "quantity": {"value": 30 * per_day, "unit": "tablet", "system": UCUM, "code": "{tbl}"},
            "expectedSupplyDuration": {"value": 30, "unit": "days", "system": UCUM, "code": "d"},
        },
    }
    upd = dict(res, status="on-hold")
    return res, upd


BUILDERS = {
    "Patient": make_patient,
    "Location": make_location,
    "Organization": make_organization,
    "Practitioner": make_practitioner,
    "Encounter": make_encounter,
    "Observation": make_observation,
    "MedicationRequest": make_medication_request,
}


# --- pre-serialized templates ------------------------------------------------


class Template:
    """Serialized create and update bodies plus the placeholders each contains."""

    __slots__ = ("create", "create_keys", "update", "update_keys")

    def __init__(self, create: dict[str, Any], update: dict[str, Any]) -> None:
        # Put "id" right after resourceType in the update body, as servers echo it.
        update = {"resourceType": update["resourceType"], "id": PH_ID, **update}
        self.create = lg.dumps(create)
        self.update = lg.dumps(update)
        self.create_keys = self._keys(self.create)
        self.update_keys = self._keys(self.update)

    @staticmethod
    def _keys(body: bytes) -> tuple[bytes, ...]:
        found = re.findall(rb"@@[A-Za-z]+@@", body)
        return tuple(dict.fromkeys(found))

    @staticmethod
    def render(body: bytes, keys: tuple[bytes, ...], values: dict[bytes, bytes]) -> bytes:
        for key in keys:
            body = body.replace(key, values[key])
        return body


def build_pool(seed: int, size: int) -> dict[str, list[Template]]:
    """Deterministic (per seed) pool of ``size`` serialized variants per resource type."""
    pool: dict[str, list[Template]] = {}
    for rt in ORDER:
        rng = random.Random(f"{seed}/pool/{rt}")
        pool[rt] = [Template(*BUILDERS[rt](rng)) for _ in range(size)]
    return pool


# ---------------------------------------------------------------------------
# Virtual users
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class TypeSpec:
    rt: str
    url: URL
    prefix: str  # f"{base}/{rt}/"
    ref_key: bytes  # b"@@Patient@@"
    dep_keys: tuple[bytes, ...]
    templates: list[Template]
    create: lg.Op
    read: lg.Op
    update: lg.Op
    delete: lg.Op


def extract_id(rt: str, body: bytes, location: str | None = None) -> str | None:
    if body:
        try:
            doc = lg.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            return str(doc["id"])
    if location:
        parts = location.split("?", 1)[0].rstrip("/").split("/")
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == rt:
                return parts[i + 1]
    return None


Created = tuple[TypeSpec, Template, bytes, URL]  # spec, template, id, resource URL


def pool_quota(read_pool: int, clients: int, uidx: int) -> int:
    """Resources virtual user ``uidx`` creates for the read pool (all users: ``read_pool``)."""
    base, extra = divmod(read_pool, clients)
    return base + (1 if uidx < extra else 0)


class Workload:
    def __init__(
        self,
        client: lg.Client,
        specs: list[TypeSpec],
        seed: int,
        max_iterations: int,
        mode: str = "crud",
        keep_created: bool = False,
    ) -> None:
        self.client = client
        self.specs = specs
        self.seed = seed
        self.max_iterations = max_iterations
        self.mode = mode
        self.keep_created = keep_created  # create mode: remember what to clean up
        self.iterations = 0  # measured iterations, all users of this process
        # Resources each user created and did not delete (read pool, create mode
        # with cleanup), in creation order: deleted in reverse by cleanup_user().
        self.created: dict[int, list[tuple[TypeSpec, URL]]] = {}
        self.pool: list[tuple[TypeSpec, URL]] = []  # read mode: what users GET

    async def user(self, uidx: int) -> None:
        rec = self.client.rec
        rng = random.Random(f"{self.seed}/user/{uidx}")
        mode = self.mode
        keep = self.created.setdefault(uidx, []) if self.keep_created else None
        done = 0
        it = 0
        while True:
            now = lg.perf_counter_ns()
            if now >= rec.measure_end:
                break
            measured = now >= rec.measure_start
            if measured and self.max_iterations and done >= self.max_iterations:
                break
            if mode == "read":
                await self.read_random(rng)
            elif mode == "create":
                created = await self.create_chain(rng, {PH_N_B: f"{uidx}-{it}".encode()})
                if keep is not None:
                    keep.extend((c[0], c[3]) for c in created)
            else:
                await self.iteration(rng, f"{uidx}-{it}".encode())
            it += 1
            if measured:
                done += 1
        self.iterations += done

    async def create_chain(
        self, rng: random.Random, values: dict[bytes, bytes], limit: int = len(ORDER)
    ) -> list[Created]:
        """POST the first ``limit`` types of ORDER; references go to the ones just created.

        ``values`` holds the placeholder values (``@@N@@`` on entry) and gets the
        references added. A type whose dependency failed is skipped.
        """
        call = self.client.call
        created: list[Created] = []
        for spec in self.specs[:limit]:
            if not all(k in values for k in spec.dep_keys):
                continue  # a dependency failed to be created (already counted)
            tmpl = spec.templates[rng.randrange(len(spec.templates))]
            t0 = lg.perf_counter_ns()
            res = await call(
                spec.create, "POST", spec.url, tmpl.render(tmpl.create, tmpl.create_keys, values)
            )
            if res is None:
                continue
            rid = extract_id(spec.rt, res[1], res[2])
            if rid is None or not FHIR_ID.fullmatch(rid):
                self.client.fail(spec.create, t0, f"HTTP {res[0]} without valid id", res[1])
                continue
            values[spec.ref_key] = f"{spec.rt}/{rid}".encode()
            created.append((spec, tmpl, rid.encode(), URL(spec.prefix + rid, encoded=True)))
        return created

    async def iteration(self, rng: random.Random, n: bytes) -> None:
        call = self.client.call
        values: dict[bytes, bytes] = {PH_N_B: n}
        created = await self.create_chain(rng, values)
        for spec, _, _, url in created:
            await call(spec.read, "GET", url, None)
        for spec, tmpl, rid_b, url in created:
            values[PH_ID_B] = rid_b
            await call(spec.update, "PUT", url, tmpl.render(tmpl.update, tmpl.update_keys, values))
        for spec, _, _, url in reversed(created):
            await call(spec.delete, "DELETE", url, None)

    async def read_random(self, rng: random.Random) -> None:
        spec, url = self.pool[rng.randrange(len(self.pool))]
        await self.client.call(spec.read, "GET", url, None)

    # --- read pool setup / cleanup (run outside the measured window) ----------

    async def setup_user(self, uidx: int, quota: int) -> None:
        """Create ``quota`` resources (whole chains, then a partial one) for the read pool."""
        rng = random.Random(f"{self.seed}/setup/{uidx}")
        mine = self.created.setdefault(uidx, [])
        attempted = 0
        chain = 0
        while attempted < quota:
            limit = min(len(self.specs), quota - attempted)
            values = {PH_N_B: f"pool-{uidx}-{chain}".encode()}
            created = await self.create_chain(rng, values, limit)
            mine.extend((c[0], c[3]) for c in created)
            attempted += limit
            chain += 1

    def build_read_pool(self) -> None:
        """The process's pool, in a deterministic order (by user, then creation)."""
        self.pool = [item for uidx in sorted(self.created) for item in self.created[uidx]]

    async def cleanup_user(self, uidx: int) -> int:
        """Delete what user ``uidx`` kept, newest first (dependents before references)."""
        call = self.client.call
        deleted = 0
        mine = self.created.pop(uidx, [])
        while mine:
            spec, url = mine.pop()
            if await call(spec.delete, "DELETE", url, None) is not None:
                deleted += 1
        return deleted


async def run_worker_async(spec: lg.WorkerSpec, barrier: lg.Barrier) -> dict[str, Any]:
    o = spec.options
    mode = o["mode"]
    ops = {(k, rt): lg.Op(k, rt) for rt in ORDER for k in KINDS}
    rec = lg.Recorder(ops.values())
    auth = lg.Auth(
        token=o["token"],
        client_file=o["client_file"],
        token_url=o["token_url"],
        scope=o["scope"],
        timeout_s=o["timeout"],
    )
    session = lg.make_session(spec.n_users, o["timeout"])
    uidxs = range(spec.first_user, spec.first_user + spec.n_users)
    try:
        await auth.start()
        pool = build_pool(o["seed"], o["pool"])
        base = o["base_url"].rstrip("/")
        specs = [
            TypeSpec(
                rt=rt,
                url=URL(f"{base}/{rt}"),
                prefix=str(URL(f"{base}/{rt}")) + "/",
                ref_key=ref_placeholder(rt).encode(),
                dep_keys=tuple(ref_placeholder(d).encode() for d in DEPENDS_ON.get(rt, ())),
                templates=pool[rt],
                create=ops["create", rt],
                read=ops["read", rt],
                update=ops["update", rt],
                delete=ops["delete", rt],
            )
            for rt in ORDER
        ]
        client = lg.Client(session, auth, rec)
        work = Workload(
            client,
            specs,
            o["seed"],
            o["iterations"],
            mode=mode,
            keep_created=mode == "create" and o["cleanup"],
        )
        setup = {"created": 0, "seconds": 0.0}
        barrier_timeout = 120.0
        if mode == "read":
            # Before rec.start(): nothing here is in the measured window.
            t_setup = time.perf_counter()
            await asyncio.gather(
                *(work.setup_user(u, pool_quota(o["read_pool"], o["clients"], u)) for u in uidxs)
            )
            work.build_read_pool()
            setup = {"created": len(work.pool), "seconds": time.perf_counter() - t_setup}
            if not work.pool:
                first = next(iter(rec.error_samples.items()), None)
                detail = f" (first error: {first[0]} {first[1][1]})" if first else ""
                raise RuntimeError(f"read pool setup created no resources{detail}")
            barrier_timeout += o["read_pool"] / 10  # processes wait for the slowest setup
        lg.tune_gc()
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, barrier_timeout)
        now = lg.perf_counter_ns()
        rec.start(now, o["warmup"], o["duration"])
        cpu_mark: list[float] = []
        loop = asyncio.get_running_loop()
        loop.call_later(o["warmup"], lambda: cpu_mark.append(time.process_time()))
        users = [asyncio.create_task(work.user(u)) for u in uidxs]
        await asyncio.gather(*users)
        cpu_end = time.process_time()
        end_ns = lg.perf_counter_ns()
        wall_s = (min(end_ns, rec.measure_end) - rec.measure_start) / 1e9
        cpu_s = cpu_end - cpu_mark[0] if cpu_mark else 0.0
        rec.stop(end_ns)  # cleanup below is not measured
        cleanup = {"deleted": 0, "seconds": 0.0}
        if o["cleanup"] and mode != "crud":
            t_cleanup = time.perf_counter()
            counts = await asyncio.gather(*(work.cleanup_user(u) for u in uidxs))
            cleanup = {"deleted": sum(counts), "seconds": time.perf_counter() - t_cleanup}
        result = rec.result(work.iterations, cpu_s, max(wall_s, 0.0))
        result["token_fetches"] = auth.refreshes
        result["setup"] = setup
        result["cleanup"] = cleanup
        return result
    finally:
        await session.close()
        await auth.close()


def run_worker(spec: lg.WorkerSpec, barrier: lg.Barrier) -> dict[str, Any]:
    return lg.run_async(run_worker_async(spec, barrier), use_uvloop=spec.options["uvloop"])


# ---------------------------------------------------------------------------
# CLI / report
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FHIR R4 CRUD load generator (Health Samurai benchmark CRUD workload).",
    )
    lg.add_server_args(p)
    p.add_argument(
        "--mode",
        choices=tuple(MODES),
        default="crud",
        help="crud: create/read/update/delete iterations; create: creates only; "
        "read: GETs of a pool created first (default: %(default)s)",
    )
    p.add_argument(
        "--read-pool",
        type=int,
        metavar="N",
        help=f"read mode: resources created (spread over the seven types) before measuring "
        f"(default: {DEFAULT_READ_POOL})",
    )
    p.add_argument(
        "--cleanup",
        action=argparse.BooleanOptionalAction,
        help="read/create mode: delete what the run created, after measuring "
        "(default: on in read mode, off in create mode)",
    )
    p.add_argument("--clients", type=int, default=32, help="virtual users (default: %(default)s)")
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="measured seconds after warmup; 0 = no limit, needs --iterations (default: %(default)s)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="stop each user after N measured iterations (default: duration only)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds excluded from the stats (default: %(default)s)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generator processes; clients are split across them (default: 1)",
    )
    p.add_argument("--seed", type=int, default=1, help="data seed (default: %(default)s)")
    p.add_argument(
        "--pool",
        type=int,
        default=128,
        help="pre-serialized variants per resource type (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error("--clients must be >= 1")
    if args.processes < 1:
        p.error("--processes must be >= 1")
    if args.duration < 0 or args.warmup < 0 or args.iterations < 0 or args.pool < 1:
        p.error("--duration, --warmup, --iterations must be >= 0 and --pool >= 1")
    if args.duration == 0 and args.iterations == 0:
        p.error("--duration 0 needs --iterations")
    if args.mode == "crud" and args.cleanup is not None:
        p.error("--cleanup/--no-cleanup apply to --mode read and create (crud deletes as it goes)")
    if args.mode != "read" and args.read_pool is not None:
        p.error("--read-pool only makes sense with --mode read")
    if args.read_pool is None:
        args.read_pool = DEFAULT_READ_POOL
    if args.mode == "read" and args.read_pool < args.clients:
        p.error("--read-pool must be >= --clients (each user creates part of the pool)")
    if args.cleanup is None:
        args.cleanup = args.mode == "read"
    if args.token_url and not args.client_file:
        p.error("--token-url only makes sense with --client-file")
    if args.client_file and not args.token_url:
        origin = URL(args.base_url).origin()
        args.token_url = str(origin / "oauth2" / "token")
    return args


def build_report(
    args: argparse.Namespace,
    merged: lg.Merged,
    n_procs: int,
    results: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    elapsed = merged.elapsed_s
    operations: dict[str, Any] = {}
    for kind in KINDS:
        samples, errors = lg.group(merged, (f"{kind} {rt}" for rt in ORDER))
        operations[kind] = lg.summarize(samples, errors, elapsed)
    samples, errors = lg.group(merged, (f"{k} {rt}" for k in KINDS for rt in ORDER))
    operations["overall"] = lg.summarize(samples, errors, elapsed)
    resources = {
        rt: {kind: lg.summarize(*lg.group(merged, [f"{kind} {rt}"]), elapsed) for kind in KINDS}
        for rt in ORDER
    }
    error_samples = [
        {
            "operation": key.split("|", 1)[0],
            "status": key.split("|", 1)[1],
            "count": count,
            "body": snippet,
        }
        for key, (count, snippet) in sorted(merged.error_samples.items(), key=lambda kv: -kv[1][0])
    ]
    measured_errors = operations["overall"]["errors"]
    phases: dict[str, dict[str, Any]] = {}
    for phase, count in (("setup", "created"), ("cleanup", "deleted")):
        per_proc = [r.get(phase, {}) for r in results or ()]
        phases[phase] = {
            count: sum(x.get(count, 0) for x in per_proc),
            "seconds": round(max((x.get("seconds", 0.0) for x in per_proc), default=0.0), 3),
        }
    return {
        "benchmark": "crud",
        "config": {
            "mode": args.mode,
            "base_url": args.base_url,
            "clients": args.clients,
            "processes": n_procs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "iterations": args.iterations,
            "seed": args.seed,
            "pool": args.pool,
            "read_pool": args.read_pool if args.mode == "read" else None,
            "cleanup": args.cleanup if args.mode != "crud" else None,
            "json_lib": lg.JSON_LIB,
            "uvloop": not args.no_uvloop and lg.uvloop_available(),
        },
        "elapsed_s": round(elapsed, 3),
        "iterations": merged.iterations,
        "iterations_per_s": round(merged.iterations / elapsed, 2) if elapsed > 0 else 0.0,
        "loadgen_cpu_s": round(merged.cpu_s, 2),
        "token_fetches": merged.token_fetches,
        "setup": phases["setup"],
        "cleanup": phases["cleanup"],
        "operations": operations,
        "resources": resources,
        "errors": {
            "measured": measured_errors,
            "outside_window": merged.outside_errors,
            "total": measured_errors + merged.outside_errors,
            "samples": error_samples,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    c = report["config"]
    mode = c.get("mode", "crud")
    kinds = MODES[mode]
    print(
        f"CRUD benchmark  {c['base_url']}  clients={c['clients']} processes={c['processes']} "
        f"warmup={c['warmup_s']:g}s duration={c['duration_s']:g}s seed={c['seed']} mode={mode}"
    )
    setup, cleanup = report.get("setup", {}), report.get("cleanup", {})
    if mode == "read":
        print(
            f"read pool: {setup['created']} of {c['read_pool']} resources created in "
            f"{setup['seconds']:.2f} s before measuring (not in the figures)"
        )
    elapsed = report["elapsed_s"]
    cpu_pct = 100.0 * report["loadgen_cpu_s"] / elapsed if elapsed > 0 else 0.0
    print(
        f"measured {elapsed:.2f} s, {report['iterations']} iterations "
        f"({report['iterations_per_s']:.1f}/s), load-generator CPU {cpu_pct:.0f}% of one core, "
        f"{report['token_fetches']} token fetches"
    )
    if c.get("cleanup"):
        print(
            f"cleanup: {cleanup['deleted']} resources deleted in {cleanup['seconds']:.2f} s "
            "after measuring (not in the figures)"
        )
    elif mode != "crud":
        print("cleanup: off, the created resources were left on the server")
    print()
    print(lg.HEADER)
    for kind, s in report["operations"].items():
        if kind in kinds or kind == "overall":
            print(lg.format_row(kind, s))
    print()
    print(lg.HEADER.replace(" " * 26, f"{'resource / operation':<26}", 1))
    for rt, per in report["resources"].items():
        for kind, s in per.items():
            if kind in kinds:
                print(lg.format_row(f"{rt} {kind}", s))
    e = report["errors"]
    if e["total"]:
        print(
            f"\nERRORS: {e['measured']} in the measured window, "
            f"{e['outside_window']} during warmup/drain{'' if mode == 'crud' else '/setup/cleanup'}"
        )
        for s in e["samples"][:8]:
            print(f"  {s['operation']}: {s['status']} x{s['count']}: {s['body']}")
    else:
        print("\nno errors")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {
        "base_url": args.base_url,
        "token": args.token,
        "client_file": args.client_file,
        "token_url": args.token_url,
        "scope": args.scope,
        "timeout": args.timeout,
        "seed": args.seed,
        "pool": args.pool,
        "mode": args.mode,
        "clients": args.clients,
        "read_pool": args.read_pool,
        "cleanup": args.cleanup,
        "warmup": args.warmup,
        "duration": args.duration,
        "iterations": args.iterations,
        "uvloop": not args.no_uvloop,
    }
    specs = [
        lg.WorkerSpec(index=i, first_user=first, n_users=n, options=options)
        for i, (first, n) in enumerate(lg.split_users(args.clients, args.processes))
    ]
    try:
        results = lg.run_processes(run_worker, specs)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = build_report(args, lg.merge(results), len(specs), results)
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    return 1 if report["errors"]["total"] else 0


if __name__ == "__main__":
    sys.exit(main())
