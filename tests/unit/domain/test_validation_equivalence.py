"""Validation gives exactly the issues it gave before the speed work (issue #14).

tests/data/validation_golden.json.gz holds a corpus (R4 examples, a carebundle cohort, and
thousands of mutations of them that hit every kind of issue validation.py raises) with the
issues the validator of commit 29ff713 found for each: same path, code, message and order.
Regenerate it only on purpose, from the build whose results are the reference:

    PYTHONPATH=OLD/src .venv/bin/python tests/unit/domain/test_validation_equivalence.py
"""

from __future__ import annotations

import copy
import gzip
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from fhirvault.domain.validation import Validator

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "validation_golden.json.gz"
Json = dict[str, Any]


def load() -> list[Json]:
    cases: list[Json] = json.loads(gzip.decompress(GOLDEN.read_bytes()))
    return cases


def result(validator: Validator, case: Json) -> list[list[str]]:
    issues = validator.validate(case["resource"], allow_unknown_elements=case["unknown"])
    return [[i.path, i.code, i.message] for i in issues]


@pytest.fixture(scope="module")
def cases() -> list[Json]:
    return load()


def test_corpus_covers_every_kind_of_issue(cases: list[Json]) -> None:
    codes = {issue[1] for case in cases for issue in case["issues"]}
    assert codes == {"structure", "required", "value", "code-invalid", "invalid"}
    messages = {issue[2] for case in cases for issue in case["issues"]}
    assert len(messages) >= 85
    assert sum(1 for case in cases if not case["issues"]) > 500  # valid ones too


def test_issues_are_those_of_the_reference_build(cases: list[Json]) -> None:
    validator = Validator.default()
    differ = [
        (n, case["issues"][:3], result(validator, case)[:3])
        for n, case in enumerate(cases)
        if result(validator, case) != case["issues"]
    ]
    assert not differ, f"{len(differ)} of {len(cases)} cases differ, first: {differ[:3]}"


def test_a_changed_message_is_caught(cases: list[Json]) -> None:
    """The comparison above can fail: one altered message in the golden data is seen."""
    validator = Validator.default()
    case = copy.deepcopy(next(c for c in cases if c["issues"]))
    case["issues"][0][2] += "!"
    assert result(validator, case) != case["issues"]


def test_remembered_valid_codings_do_not_hide_issues() -> None:
    """Codings found valid are remembered (a speed-up): never for what allow_unknown let
    through, never past the depth limit, never for a value that is not a string."""
    validator = Validator.default()
    coding = {"system": "http://loinc.org", "code": "1-8", "foo": "x"}
    lenient = {"resourceType": "Observation", "status": "final", "code": {"coding": [coding]}}
    assert validator.validate(lenient, allow_unknown_elements=True) == []
    assert [i.path for i in validator.validate(lenient)] == ["Observation.code.coding[0].foo"]

    good = {"system": "http://loinc.org", "code": "1-8"}
    assert validator.validate({**lenient, "code": {"coding": [good]}}) == []
    deep: Json = {"url": "http://x", "valueCoding": good}  # the Coding at depth 65
    for _ in range(63):
        deep = {"url": "http://x", "extension": [deep]}
    issues = validator.validate({"resourceType": "Patient", "extension": [deep]})
    assert [(i.path.rsplit(".", 1)[1], i.message) for i in issues] == [
        ("valueCoding", "nested deeper than 64 levels")
    ]
    flagged = {"resourceType": "Observation", "status": "final",
               "code": {"coding": [{**good, "userSelected": 1}]}}
    assert validator.validate({**flagged, "code": {"coding": [{**good, "userSelected": True}]}}) == []
    assert [i.code for i in validator.validate(flagged)] == ["structure"]


# ---------------------------------------------------------------- corpus generation

XMLNS = ' xmlns="http://www.w3.org/1999/xhtml"'
VALUES: list[Any] = [
    None, [], {}, "", " x", "x ", "a  b", "bad\x01", "\u00a0", 0, -1, 1, 2**31, -(2**31) - 1,
    1.5, float("inf"), True, False, "2023-02-30", "2024-02-29", "2023-13-01", "2023-02-29",
    "1999", "12:00:00", "2024-01-01T10:00:00", "2024-01-01T10:00:00Z", "urn:uuid:1",
    "urn:oid:1.2.3", "http://x y", "not base64!", "AAAA", "x" * 70, "Ab-1.2", [None], [[1]],
    [1, None], {"id": "a"}, {"extension": []}, {"foo": 1}, ["a", "b"], [{"text": "t"}],
    f"<div{XMLNS}>ok</div>", f"<div{XMLNS}><script>x</script></div>", "<p>x</p>", "<div>",
    f"<div{XMLNS}> </div>", f"<div{XMLNS}><a href=\"javascript:x\">t</a></div>",
]
NARRATIVES = [
    f"<div{XMLNS}>ok</div>", f"<div{XMLNS}><script>x</script></div>", "<p>x</p>", "<div>",
    f"<div{XMLNS}> </div>", f"<div{XMLNS}><a href=\"javascript:x\">t</a></div>",
    f"<div{XMLNS}><p onclick=\"x\">t</p></div>", f"<div{XMLNS}><img src=\"x.png\"/></div>",
    f"<div{XMLNS}><p style=\"background:url(x)\">t</p></div>", " <div>t</div>",
    '<div xmlns="urn:x">t</div>', '<!DOCTYPE div><div>t</div>', f"<div{XMLNS}>&nbsp;</div>",
    f"<div{XMLNS}>" + "<b>" * 66 + "t" + "</b>" * 66 + "</div>", "<divx>t</divx>",
]
REFERENCES = [
    "Patient/1", "Foo/1", "Patient/", "Patient/1/_history/2", "Patient/1/_history/",
    "#", "#c1", "#bad id", "http://x/Patient/1", "http://x y", "urn:uuid:bad",
    "urn:uuid:0a0b0c0d-0000-4000-8000-000000000001", "urn:oid:1.2", "urn:oid:3.1", "x",
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*prefix, key))
            out.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((*prefix, index))
            out.extend(paths(item, (*prefix, index)))
    return out


def mutate(resource: Json, rng: random.Random) -> Json:
    out = copy.deepcopy(resource)
    path = rng.choice(paths(out))
    parent: Any = out
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    kind = rng.randrange(12)
    if kind <= 4:
        parent[last] = copy.deepcopy(rng.choice(VALUES))
    elif kind == 5 and isinstance(parent, dict):
        del parent[last]
    elif kind == 6 and isinstance(parent, dict):
        parent[rng.choice(["foo", "_foo", "valueString", "_id", "x" * 80, "extension"])] = "y"
    elif kind == 7 and isinstance(parent, dict):
        parent["reference"] = rng.choice(REFERENCES)
    elif kind == 8:
        out["text"] = {"status": rng.choice(["generated", "extensions", "bad"]),
                       "div": rng.choice(NARRATIVES)}
    elif kind == 9 and isinstance(parent, dict) and isinstance(last, str):
        parent["_" + last.lstrip("_")] = rng.choice([{"id": "i"}, None, [None], [{"id": "i"}], "x"])
    else:
        parent[last] = [parent[last]] if not isinstance(parent[last], list) else parent[last][0]
    return out


def special_cases() -> list[Json]:
    patient = {"resourceType": "Patient", "id": "p"}
    deep: Json = {"url": "http://x", "valueString": "v"}
    for _ in range(70):
        deep = {"url": "http://x", "extension": [deep]}
    return [
        {"resourceType": "Nope"}, {"id": "x"}, {"resourceType": 7}, {"resourceType": None},
        {**patient, **{f"u{i}": 1 for i in range(150)}},
        {**patient, "extension": [deep]},
        {**patient, "extension": [{"url": "http://x"}]},
        {**patient, "extension": [{"url": "http://x", "valueString": "a", "extension": [
            {"url": "http://y", "valueCode": "c"}]}]},
        {**patient, "contained": [{"resourceType": "Patient", "id": "c",
                                   "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z",
                                            "security": [{"code": "x"}]},
                                   "contained": [{"resourceType": "Patient"}]}]},
        {**patient, "contained": [None, [], {"resourceType": "Foo"}, "x"]},
        {**patient, "deceasedBoolean": True, "deceasedDateTime": "2020"},
        {**patient, "multipleBirthBoolean": True, "_multipleBirthInteger": {"id": "x"}},
        {**patient, "name": [{"given": [None, "a"], "_given": [{"id": "g"}, None]}]},
        {**patient, "name": [{"given": [None], "_given": [None]}]},
        {**patient, "name": [{"given": ["a"], "_given": [{"id": "g"}, None]}]},
        {**patient, "gender": "x", "maritalStatus": {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "Q"}]}},
        {**patient, "communication": [{"language": {"text": "fr"}}]},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
         "valueQuantity": {"value": 1}, "valueString": "x", "_valueBoolean": {"id": "y"}},
        {"resourceType": "Observation", "code": {"text": "x"}},
        {"resourceType": "Observation", "status": "nope", "code": {}},
        {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "gender": 1}}, {"resource": []},
            {"fullUrl": "urn:uuid:x"}]},
        {"resourceType": "Binary", "contentType": "text/plain", "data": "QUJD\nRA=="},
        {"resourceType": "Binary", "contentType": "text/plain", "data": "QUJ"},
    ]


def bases() -> list[Json]:
    import carebundle

    from fhirvault.fhir.xml import xml_to_json

    root = Path(__file__).resolve().parents[2] / "data" / "fhir-r4-xml"
    out: list[Json] = [json.loads(xml_to_json(p.read_bytes())) for p in sorted(root.glob("*.xml"))]
    for bundle in carebundle.generate_cohort(count=4, seed=14):
        data = json.loads(carebundle.to_json(bundle))
        out.append(data)
        out.extend(entry["resource"] for entry in data["entry"])
    return out


def generate() -> list[Json]:
    rng = random.Random(14)
    resources: list[Json] = []
    for base in bases():
        resources.append(base)
        small = base["resourceType"] != "Bundle" or len(json.dumps(base)) < 20000
        resources.extend(mutate(base, rng) for _ in range(20 if small else 3))
    validator = Validator.default()
    cases = [{"resource": r, "unknown": n % 7 == 0} for n, r in enumerate(resources)]
    cases += [{"resource": r, "unknown": u} for r in special_cases() for u in (False, True)]
    for case in cases:
        case["issues"] = result(validator, case)
    return cases


if __name__ == "__main__":
    data = json.dumps(generate(), separators=(",", ":")).encode()
    GOLDEN.write_bytes(gzip.compress(data, 9, mtime=0))
    print(f"{GOLDEN}: {len(data):,} bytes JSON, {GOLDEN.stat().st_size:,} compressed", file=sys.stderr)
