"""The vendored search table, its generator's pure parts, and the index term scheme."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhirvault.domain import r4
from fhirvault.domain.search import params as params_mod
from fhirvault.domain.search.params import COMMON_PARAMS, search_params
from fhirvault.domain.search.params import Path as SPath
from fhirvault.domain.search.values import (
    DAY_MAX,
    NUMBER_KEY_MAX,
    STRING_PREFIX_LENGTHS,
    STRING_PREFIX_TERMS,
    NumItem,
    QtyItem,
    RefItem,
    TokenItem,
    date_day,
    date_terms,
    extract,
    index_terms,
    normalise,
    number_key,
    parse_date,
    parse_reference,
    range_cover,
    string_query_length,
    string_terms,
)

ROOT = Path(__file__).resolve().parents[4]
TABLE = ROOT / "src" / "fhirvault" / "domain" / "r4" / "search_params.json.gz"
DAY = 86_400_000


def ms(text: str) -> int:
    rng = parse_date(text)
    assert rng is not None
    return rng[0]


# ---------------------------------------------------------------- the vendored table


def test_table_is_small_deterministic_json() -> None:
    raw = TABLE.read_bytes()
    assert len(raw) < 200_000
    text = gzip.decompress(raw).decode()
    data = json.loads(text)
    assert json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True) == text
    assert data["format"] == params_mod.SUPPORTED_FORMAT
    assert data["fhirVersion"] == "4.0.1"
    skipped = {url.rsplit("/", 1)[1] for url, _ in data["skipped"]}
    assert {"Location-near", "individual-phonetic", "Resource-content", "Resource-query",
            "DomainResource-text", "Bundle-composition", "Bundle-message"} <= skipped


def test_every_resource_type_has_the_common_parameters() -> None:
    for rtype in r4.resource_types():
        params = search_params(rtype)
        for code in COMMON_PARAMS:
            assert code in params, (rtype, code)
    assert search_params("Patient")["_id"].type == "token"
    assert search_params("Patient")["_lastUpdated"].type == "date"
    assert search_params("Patient")["_profile"].type == "uri"
    assert search_params("Binary")["_lastUpdated"].paths[0].steps[1].key == "lastUpdated"


def test_unknown_type_has_no_parameters() -> None:
    assert dict(search_params("NoSuchType")) == {}


def test_loaded_once_and_fast() -> None:
    assert search_params("Observation") is search_params("Observation")
    data = params_mod._read()
    start = time.perf_counter()
    built = params_mod._build(data)
    assert time.perf_counter() - start < 2.0
    assert set(built) == set(r4.resource_types())


def test_choice_narrowing_and_leaf_types() -> None:
    obs = search_params("Observation")
    vq = obs["value-quantity"]
    assert [(tuple(s.key for s in p.steps), p.value_type) for p in vq.paths] == [
        (("valueQuantity",), "Quantity")
    ]
    date_paths = {p.steps[0].key: p.value_type for p in obs["date"].paths}
    assert date_paths == {
        "effectiveDateTime": "dateTime",
        "effectiveInstant": "instant",
        "effectivePeriod": "Period",
        "effectiveTiming": "Timing",
    }
    assert search_params("Condition")["onset-age"].has_ranges
    assert not obs["value-quantity"].has_ranges
    rx = search_params("MedicationRequest")
    assert [p.steps[0].key for p in rx["code"].paths] == ["medicationCodeableConcept"]
    assert [p.steps[0].key for p in rx["medication"].paths] == ["medicationReference"]


def test_filters_targets_and_implicit_systems() -> None:
    pat = search_params("Patient")
    phone = pat["phone"].paths[0]
    assert phone.steps[0].key == "telecom" and phone.steps[0].filters == (("system", "phone"),)
    assert not phone.simple
    patient = search_params("Observation")["patient"]
    assert patient.paths[0].targets == frozenset({"Patient"})
    assert "Patient" in search_params("Observation")["subject"].targets
    gender = pat["gender"].paths[0]
    assert gender.value_type == "code"
    assert gender.system == "http://hl7.org/fhir/administrative-gender"
    deceased = pat["deceased"].paths[0]
    assert deceased.truthy is not None and deceased.steps == ()
    artifact = search_params("PlanDefinition")["depends-on"].paths
    assert any(p.steps[0].filters == (("type", "depends-on"),) for p in artifact)


def test_composite_definitions() -> None:
    combo = search_params("Observation")["combo-code-value-quantity"]
    assert [c.type for c in combo.components] == ["token", "quantity"]
    assert [tuple(s.key for s in p.steps) for p in combo.paths] == [(), ("component",)]
    for focus in combo.paths:
        assert [[p.steps[0].key for p in comp] for comp in focus.components] == [
            ["code"], ["valueQuantity"]
        ]
    seq = search_params("MolecularSequence")["chromosome-variant-coordinate"]
    assert seq.paths[0].components[0][0].rooted
    assert [c.type for c in seq.components] == ["token", "number", "number"]
    # R4 erratum: component definitions swapped; types follow the elements.
    rel = search_params("DocumentReference")["relationship"]
    assert [c.type for c in rel.components] == ["token", "reference"]


def test_search_param_repr_and_identity() -> None:
    a = search_params("Patient")["name"]
    assert repr(a) == "SearchParam(Patient.name: string)"
    assert a != search_params("Person")["name"]
    assert isinstance(a.paths[0], SPath)


# ---------------------------------------------------------------- the generator's pure parts


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_search_tables", ROOT / "scripts" / "gen_search_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLES: dict[str, dict[str, list[Any]]] = {
    "Thing": {
        "id": ["id", 0],
        "telecom": ["ContactPoint", 1],
        "valueQuantity": ["Quantity", 0, None, "value"],
        "valueCodeableConcept": ["CodeableConcept", 0, None, "value"],
        "valueString": ["string", 0, None, "value"],
        "subject": ["Reference", 0],
        "status": ["code", 0, "thing-status"],
        "part": ["Thing.part", 1],
        "entry": ["Thing.part", 1],
        "extension": ["Extension", 1],
        "deceasedBoolean": ["boolean", 0, None, "deceased"],
        "deceasedDateTime": ["dateTime", 0, None, "deceased"],
    },
    "Thing.part": {"code": ["CodeableConcept", 0], "when": ["dateTime", 0]},
    "ContactPoint": {"system": ["code", 0], "value": ["string", 0]},
    "CodeableConcept": {"text": ["string", 0], "coding": ["Coding", 1]},
    "Extension": {"url": ["uri", 0], "valueString": ["string", 0, None, "value"],
                  "valueCode": ["code", 0, None, "value"]},
    "Quantity": {"value": ["decimal", 0]},
    "Reference": {"reference": ["string", 0]},
    "Coding": {"code": ["code", 0]},
}


def compile_(gen: ModuleType, expr: str, context: str = "Thing") -> list[dict[str, Any]]:
    compiler = gen.Compiler(TABLES, {"thing-status": {"http://x/status": ["a"]}})
    result: list[dict[str, Any]] = compiler.program(compiler.compile(expr, context, "Thing"))
    return result


def test_compiler_paths(gen: ModuleType) -> None:
    assert compile_(gen, "Thing.telecom") == [{"path": ["telecom"], "type": "ContactPoint"}]
    assert compile_(gen, "Thing.value as Quantity") == [
        {"path": ["valueQuantity"], "type": "Quantity"}
    ]
    assert compile_(gen, "(Thing.value as CodeableConcept).text") == [
        {"path": ["valueCodeableConcept", "text"], "type": "string"}
    ]
    assert compile_(gen, "Thing.value.as(string)") == [
        {"path": ["valueString"], "type": "string"}
    ]
    assert compile_(gen, "Thing.value.ofType(Quantity)") == [
        {"path": ["valueQuantity"], "type": "Quantity"}
    ]
    assert [p["path"] for p in compile_(gen, "Thing.value")] == [
        ["valueCodeableConcept"], ["valueQuantity"], ["valueString"]
    ]
    assert compile_(gen, "Thing.telecom.where(system='phone')") == [
        {"path": [["telecom", [["system", "phone"]], None]], "type": "ContactPoint"}
    ]
    assert compile_(gen, "Thing.subject.where(resolve() is Patient)") == [
        {"path": ["subject"], "targets": ["Patient"], "type": "Reference"}
    ]
    assert compile_(gen, "Thing.extension('http://x/e').value.as(string)") == [
        {"path": [["extension", [["url", "http://x/e"]], None], "valueString"], "type": "string"}
    ]
    assert compile_(gen, "Thing.entry[0].code") == [
        {"path": [["entry", None, 0], "code"], "type": "CodeableConcept"}
    ]
    assert compile_(gen, "Thing.status") == [
        {"path": ["status"], "system": "http://x/status", "type": "code"}
    ]
    assert compile_(gen, "%resource.part.when", "Thing.part") == [
        {"path": ["part", "when"], "root": True, "type": "dateTime"}
    ]
    assert compile_(gen, "code", "Thing.part") == [{"path": ["code"], "type": "CodeableConcept"}]
    assert compile_(gen, "Thing.deceased.exists() and Thing.deceased != false") == [
        {"path": [], "truthy": [["deceasedBoolean"], ["deceasedDateTime"]], "type": "boolean"}
    ]


def test_compiler_refuses_the_rest(gen: ModuleType) -> None:
    for expr in (
        "Thing.telecom.first()",
        "Thing.subject.resolve()",
        "Thing.nothing",
        "Other.id",
        "Thing.telecom.where(value.exists())",
        "Thing.value + 1",
    ):
        with pytest.raises(gen.CannotCompile):
            compile_(gen, expr)


def test_alternatives_per_base(gen: ModuleType) -> None:
    expr = "Patient.name | Person.name | (Practitioner.value as Quantity) | alias"
    assert gen.alternatives_for(expr, "Person") == ["Person.name", "alias"]
    assert gen.alternatives_for(expr, "Practitioner") == ["(Practitioner.value as Quantity)", "alias"]
    assert gen.split_top("a.where(x='a|b') | c", "|") == ["a.where(x='a|b') ", " c"]


# ---------------------------------------------------------------- strings


def test_normalise() -> None:
    assert normalise("Müller") == "muller"
    assert normalise("  O'Brien-Smith ") == "o brien smith"
    assert normalise("Nguyễn Thị") == "nguyen thi"
    assert normalise("STRASSE") == normalise("straße") == "strasse"
    assert normalise("İstanbul") == "istanbul"
    assert normalise("ﬁle") == "file"  # NFKD compatibility
    assert normalise("Dr._Who") == "dr who"
    assert normalise("---") == ""
    assert normalise("日本") == "日本"


def test_string_terms() -> None:
    assert STRING_PREFIX_LENGTHS == (2, 3, 4, 6, 9)
    assert STRING_PREFIX_TERMS == len(STRING_PREFIX_LENGTHS) == 5
    assert string_terms("Jo") == [b"s|jo", b"x|Jo"]
    assert string_terms("J") == [b"x|J"]
    assert string_terms("Li") == [b"s|li", b"x|Li"]
    assert string_terms("Müller") == [
        b"s|mu", b"s|mul", b"s|mull", b"s|muller", "x|Müller".encode()
    ]
    long = string_terms("Bartholomew-Featherstonehaugh")
    prefixes = [t for t in long if t.startswith(b"s|")]
    assert prefixes == [
        b"s|ba", b"s|bar", b"s|bart", b"s|bartho", b"s|bartholom"
    ]
    assert len(prefixes) == STRING_PREFIX_TERMS
    assert long[-1] == b"x|Bartholomew-Featherstonehaugh"
    assert len(string_terms("abcdefgh")) == 4 + 1  # lengths 2, 3, 4, 6
    assert len(string_terms("abcdefghi")) == 5 + 1
    assert string_terms("Zoë") == [b"s|zo", b"s|zoe", "x|Zoë".encode()]
    # lengths count characters, not UTF-8 bytes
    assert string_terms("日本語") == ["s|日本".encode(), "s|日本語".encode(), "x|日本語".encode()]
    assert string_terms("!!") == [b"x|!!"]


def test_string_query_length() -> None:
    assert [string_query_length(n) for n in range(15)] == [
        None, None, 2, 3, 4, 4, 6, 6, 6, 9, 9, 9, 9, 9, 9
    ]
    assert string_query_length(20) == 9


# ---------------------------------------------------------------- dates


def test_parse_date_precision() -> None:
    jan1 = ms("2020-01-01T00:00:00Z")
    assert parse_date("2020") == (jan1, ms("2021-01-01T00:00:00Z"))
    assert parse_date("2020-02") == (ms("2020-02-01T00:00:00Z"), ms("2020-03-01T00:00:00Z"))
    assert parse_date("2020-12") == (ms("2020-12-01T00:00:00Z"), ms("2021-01-01T00:00:00Z"))
    assert parse_date("2020-02-29") == (ms("2020-02-29T00:00:00Z"), ms("2020-03-01T00:00:00Z"))
    assert parse_date("2020-03-04T10:15") == (ms("2020-03-04T10:15:00Z"), ms("2020-03-04T10:16:00Z"))
    assert parse_date("2020-03-04T10:15:30+02:00") == (
        ms("2020-03-04T08:15:30Z"), ms("2020-03-04T08:15:31Z")
    )
    assert parse_date("2020-03-04T10:15:30.5Z") == (
        ms("2020-03-04T10:15:30Z") + 500, ms("2020-03-04T10:15:30Z") + 600
    )
    assert parse_date("2020-03-04T10:15:30.123Z") == (
        ms("2020-03-04T10:15:30Z") + 123, ms("2020-03-04T10:15:30Z") + 124
    )
    base = ms("2020-03-04T10:15:30Z")
    assert parse_date("2020-03-04T10:15:30.12345Z") == (base + 123, base + 124)
    assert parse_date("2020-03-04T23:59:60Z") == (
        ms("2020-03-04T23:59:59Z"), ms("2020-03-05T00:00:00Z")
    )
    assert parse_date("1969-12-31") == (-DAY, 0)
    assert parse_date("0001-01-01") is not None


@pytest.mark.parametrize(
    "bad",
    ["2020-13", "2020-00", "2021-02-29", "2020-04-31", "0000", "20", "2020-1", "2020-01-01T25:00",
     "2020-01-01T10:60", "2020-01-01T10:00:61", "2020-01-01T10:00+15:00", "2020/01/01",
     "2020-01-01T", "2020-01-01 10:00", "", "abcd"],
)
def test_parse_date_rejects(bad: str) -> None:
    assert parse_date(bad) is None


def test_date_terms_and_clamp() -> None:
    lo, hi = parse_date("2020-03-04") or (0, 0)
    day = date_day(lo)
    assert day == 43_892  # days from 1900-01-01
    assert date_day(hi - 1) == day
    # a value within one day: the point family only
    assert date_terms(lo, hi) == [b"dP|%d|%d" % (lv, day >> (3 * lv)) for lv in range(6)]
    instant = parse_date("2020-03-04T23:59:59.999Z") or (0, 0)
    assert date_terms(*instant) == date_terms(lo, hi)
    # a value across midnight: lo and hi families
    two_days = (ms("2020-03-04T23:00:00Z"), ms("2020-03-05T01:00:00Z"))
    assert date_terms(*two_days) == [
        *(b"dL|%d|%d" % (lv, day >> (3 * lv)) for lv in range(6)),
        *(b"dH|%d|%d" % (lv, (day + 1) >> (3 * lv)) for lv in range(6)),
    ]
    assert date_day(ms("1899-12-31")) == 0
    assert date_day(ms("1850-06-01")) == 0
    assert date_day(ms("2617-10-01")) == DAY_MAX
    assert date_day(-(2**62)) == 0 and date_day(2**62) == DAY_MAX
    year = parse_date("2020") or (0, 0)
    terms = date_terms(*year)
    assert len(terms) == 12
    assert terms[0] == b"dL|0|%d" % date_day(year[0])
    assert terms[6] == b"dH|0|%d" % date_day(year[1] - 1)
    # both ends clamped onto the same day: a point
    assert date_terms(ms("1800"), ms("1850")) == [b"dP|%d|0" % lv for lv in range(6)]


# ---------------------------------------------------------------- numbers and covers


def test_number_key_orders_and_fits_24_bits() -> None:
    values = [-math.inf, -1e39, -3.4e38, -1e6, -100.5, -1, -1e-30, 0.0, 1e-45, 1e-30, 0.5, 1,
              99.5, 100, 100.5, 1e6, 3.4e38, 1e39, math.inf]
    keys = [number_key(v) for v in values]
    assert keys == sorted(keys)
    assert all(0 <= k <= NUMBER_KEY_MAX for k in keys)
    assert number_key(-0.0) == number_key(0) == number_key(Decimal("-0.000"))
    assert number_key(Decimal("100.00")) == number_key(100)


@settings(max_examples=500)
@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_number_key_is_monotone(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert number_key(lo) <= number_key(hi)


def _brute_minimal(lo: int, hi: int, levels: int, branch: int) -> int:
    """Fewest aligned blocks covering [lo, hi] exactly (dynamic programming)."""
    best = [0] + [10**9] * (hi - lo + 1)
    for end in range(lo, hi + 1):
        i = end - lo + 1
        for level in range(levels):
            size = branch**level
            start = end - size + 1
            if start >= lo and start % size == 0:
                best[i] = min(best[i], best[start - lo] + 1)
    return best[-1]


@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 255))
def test_range_cover_is_exact_and_minimal(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    blocks = range_cover(lo, hi, 3, 4)
    covered: list[int] = []
    for level, bucket in blocks:
        size = 4**level
        covered.extend(range(bucket * size, (bucket + 1) * size))
    assert covered == list(range(lo, hi + 1))
    assert len(blocks) == _brute_minimal(lo, hi, 3, 4)


def test_range_cover_examples() -> None:
    assert range_cover(5, 4, 6, 8) == []
    assert range_cover(0, 2**18 - 1, 6, 8) == [(5, b) for b in range(8)]
    assert range_cover(8, 15, 6, 8) == [(1, 1)]
    assert range_cover(7, 16, 6, 8) == [(0, 7), (1, 1), (0, 16)]
    assert len(range_cover(1, NUMBER_KEY_MAX - 1, 6, 16)) <= 2 * 15 * 5 + 15


# ---------------------------------------------------------------- references


def test_parse_reference() -> None:
    assert parse_reference("Patient/123") == RefItem("Patient/123", "Patient", "123")
    assert parse_reference("Patient/123/_history/4") == RefItem("Patient/123", "Patient", "123")
    assert parse_reference("https://x.org/fhir/Patient/9/_history/2") == RefItem(
        "Patient/9", "Patient", "9", "https://x.org/fhir", "https://x.org/fhir/Patient/9"
    )
    assert parse_reference("urn:uuid:0c3a-11") == RefItem(url="urn:uuid:0c3a-11")
    assert parse_reference("#p1") == RefItem(id="p1", local=True)
    assert parse_reference("Nonsense/1") is None
    assert parse_reference("just text") is None


# ---------------------------------------------------------------- index_terms


OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": {"lastUpdated": "2024-05-01T10:00:00.123Z"},
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}, {"code": "hr"}],
             "text": "Heart rate"},
    "subject": {"reference": "Patient/p1/_history/3"},
    "effectiveDateTime": "2024-04-30T09:30:00+02:00",
    "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org",
                      "code": "/min"},
}


def test_index_terms_of_an_observation() -> None:
    terms = index_terms("Observation", OBSERVATION)
    assert terms["_id"] == [b"tc|o1"]
    assert terms["code"] == [
        b"tc|8867-4", b"ts|http://loinc.org|8867-4", b"tS|http://loinc.org", b"tc|hr",
    ]
    assert terms["status"] == [
        b"tc|final", b"ts|http://hl7.org/fhir/observation-status|final",
        b"tS|http://hl7.org/fhir/observation-status",
    ]
    assert terms["subject"] == terms["patient"] == [b"r|Patient/p1", b"ri|p1"]
    assert "encounter" not in terms and "value-string" not in terms
    day = date_day(ms("2024-04-30T07:30:00Z"))
    assert terms["date"] == [b"dP|%d|%d" % (lv, day >> (3 * lv)) for lv in range(6)]
    key = number_key(72)
    assert terms["value-quantity"] == [b"q|%d|%d" % (lv, key >> (4 * lv)) for lv in range(6)]
    assert terms["code-value-quantity"] == [b"c|" + t for t in terms["code"]]
    for values in terms.values():
        assert values and len(values) == len(set(values))
        assert not any(t.startswith((b"p|", b"tn|", b"qs|", b"qc|", b"ub|")) for t in values)


def test_index_terms_of_a_patient() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "name": [{"family": "Ng", "given": ["Al", "Al"]}],
        "identifier": [{"system": "urn:x", "value": "42",
                        "type": {"coding": [{"system": "urn:t", "code": "MR"}]}}],
        "telecom": [{"system": "phone", "value": "555"}, {"system": "email", "value": "a@b"}],
        "managingOrganization": {"reference": "https://h.org/fhir/Organization/o9",
                                 "identifier": {"system": "urn:org", "value": "O9"}},
        "generalPractitioner": [{"reference": "#gp"}],
        "contained": [{"resourceType": "Practitioner", "id": "gp"}],
        "gender": "male",
    }
    terms = index_terms("Patient", patient)
    assert terms["family"] == [b"s|ng", b"x|Ng"]
    assert terms["given"] == [b"s|al", b"x|Al"]
    assert terms["identifier"] == [b"tc|42", b"ts|urn:x|42", b"to|urn:t|MR|42", b"tS|urn:x"]
    assert terms["phone"] == [b"tc|555"]
    assert terms["email"] == [b"tc|a@b"]
    assert terms["gender"] == [
        b"tc|male", b"ts|http://hl7.org/fhir/administrative-gender|male",
        b"tS|http://hl7.org/fhir/administrative-gender",
    ]
    assert terms["organization"] == [
        b"r|Organization/o9", b"ri|o9", b"ru|https://h.org/fhir/Organization/o9",
        b"rI|urn:org|O9", b"rIv|O9",
    ]
    # a contained reference is a value (for :missing) without a term
    gp = search_params("Patient")["general-practitioner"]
    assert extract(gp, patient) == [RefItem(id="gp", local=True)]
    assert "general-practitioner" not in terms
    assert terms["deceased"] == [b"tc|false"]
    assert "birthdate" not in terms and "address" not in terms


def test_index_terms_canonicals_and_uris() -> None:
    qr = {"resourceType": "QuestionnaireResponse", "id": "q", "status": "completed",
          "questionnaire": "http://a.org/Questionnaire/x|2.0"}
    assert index_terms("QuestionnaireResponse", qr)["questionnaire"] == [
        b"ru|http://a.org/Questionnaire/x", b"ru|http://a.org/Questionnaire/x|2.0"
    ]
    vs = {"resourceType": "ValueSet", "id": "v", "status": "draft",
          "url": "http://a.org/fhir/ValueSet/x"}
    assert index_terms("ValueSet", vs)["url"] == [b"u|http://a.org/fhir/ValueSet/x"]


# A typical heart-rate Observation and a typical Patient, as stored (id and lastUpdated set).
TYPICAL_OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "obs-hr-1",
    "meta": {"lastUpdated": "2024-05-01T10:00:00.123Z"},
    "status": "final",
    "category": [{"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": "vital-signs",
    }]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                         "display": "Heart rate"}]},
    "subject": {"reference": "Patient/pat-1"},
    "encounter": {"reference": "Encounter/enc-1"},
    "effectiveDateTime": "2024-04-30T09:30:00+02:00",
    "valueQuantity": {"value": 72, "unit": "beats/minute",
                      "system": "http://unitsofmeasure.org", "code": "/min"},
}

TYPICAL_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat-1",
    "meta": {"lastUpdated": "2024-05-01T10:00:00.123Z"},
    "identifier": [{
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                             "code": "MR"}]},
        "system": "urn:oid:2.16.756.5.30.1.123.100.1.1",
        "value": "MRN-0012345",
    }],
    "name": [{"use": "official", "family": "Müller", "given": ["Anna", "Maria"]}],
    "gender": "female",
    "birthDate": "1980-05-06",
    "address": [{"use": "home", "line": ["Bahnhofstrasse 12"], "city": "Zürich",
                 "postalCode": "8001", "country": "CH"}],
}


def _padded_tag_count(terms: dict[str, list[bytes]]) -> int:
    """Tags stored for these terms: services.search_index pads string prefixes per value."""
    total = 0
    for values in terms.values():
        exact = sum(1 for t in values if t.startswith(b"x|"))
        prefixes = sum(1 for t in values if t.startswith(b"s|"))
        total += len(values) + max(0, exact * STRING_PREFIX_TERMS - prefixes)
    return total


def test_term_counts_of_typical_resources() -> None:
    """The ingest cost of a resource is its number of tags: these counts are the budget.

    (Before the reductions: Observation 113 terms, Patient 136 terms / 275 padded tags.)
    """
    obs = index_terms("Observation", TYPICAL_OBSERVATION)
    assert {code: len(t) for code, t in obs.items()} == {
        "_id": 1,
        "_lastUpdated": 6,
        "status": 3,
        "category": 3,
        "code": 3,
        "code-value-quantity": 3,
        "combo-code": 3,
        "combo-code-value-quantity": 3,
        "patient": 2,
        "subject": 2,
        "encounter": 2,
        "date": 6,
        "value-quantity": 6,
        "combo-value-quantity": 6,
    }
    assert sum(len(t) for t in obs.values()) == _padded_tag_count(obs) == 49

    pat = index_terms("Patient", TYPICAL_PATIENT)
    assert {code: len(t) for code, t in pat.items()} == {
        "_id": 1,
        "_lastUpdated": 6,
        "deceased": 1,
        "identifier": 4,
        "name": 13,
        "family": 5,
        "given": 8,
        "gender": 3,
        "birthdate": 6,
        "address": 17,
        "address-city": 5,
        "address-country": 2,
        "address-postalcode": 4,
        "address-use": 3,
    }
    assert sum(len(t) for t in pat.values()) == 78
    assert _padded_tag_count(pat) == 102


def test_items_of_numbers_quantities_and_timing() -> None:
    ra = {"resourceType": "RiskAssessment", "id": "r", "status": "final",
          "prediction": [{"probabilityDecimal": 0.5},
                         {"probabilityRange": {"low": {"value": 0.2}, "high": {"value": 0.1}}}]}
    assert extract(search_params("RiskAssessment")["probability"], ra) == [
        NumItem(0.5, 0.5), NumItem(0.1, 0.2)
    ]
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {},
           "valueQuantity": {"value": 5, "comparator": ">=", "unit": "%"}}
    assert extract(search_params("Observation")["value-quantity"], obs) == [
        QtyItem(5, None, False, True, None, None, "%")
    ]
    claim = {"resourceType": "ChargeItem", "id": "c", "status": "billed", "code": {},
             "subject": {"reference": "Patient/p"},
             "priceOverride": {"value": 12.5, "currency": "CHF"}}
    assert extract(search_params("ChargeItem")["price-override"], claim) == [
        QtyItem(12.5, 12.5, False, False, "urn:iso:std:iso:4217", "CHF", "CHF")
    ]
    plan = {"resourceType": "CarePlan", "id": "c", "status": "active", "intent": "plan",
            "subject": {"reference": "Patient/p"},
            "activity": [{"detail": {"status": "scheduled", "scheduledTiming": {
                "event": ["2024-01-05T10:00:00Z", "2024-01-02"],
                "repeat": {"boundsPeriod": {"start": "2024-01-03", "end": "2024-02"}}}}}]}
    assert extract(search_params("CarePlan")["activity-date"], plan) == [
        (ms("2024-01-02"), ms("2024-03-01"))
    ]
    token_only = {"resourceType": "Patient", "id": "x", "gender": "other"}
    assert extract(search_params("Patient")["gender"], token_only) == [
        TokenItem("http://hl7.org/fhir/administrative-gender", "other", True)
    ]


def test_index_terms_are_fast_enough() -> None:
    index_terms("Observation", OBSERVATION)
    start = time.perf_counter()
    for _ in range(200):
        index_terms("Observation", OBSERVATION)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 0.002  # generous bound for slow CI; typically well under 200 µs
