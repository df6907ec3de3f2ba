"""Exact verification (`matches`) of single criteria against small resources."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from fhirvault.domain.search.match import matches
from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.query import Criterion, parse_search, reference_criterion
from fhirvault.domain.search.values import index_terms

NOW = 1_717_200_000_000  # 2024-06-01T00:00:00Z
BASE = "https://fhir.example.org/fhir"
Json = dict[str, Any]


def crit(rtype: str, name: str, value: str, base_url: str | None = BASE) -> Criterion:
    parsed = parse_search(rtype, [(name, value)], strict=True, now_ms=NOW, base_url=base_url)
    c = parsed.criteria[0]
    assert isinstance(c, Criterion)
    return c


def check(rtype: str, resource: Json, name: str, value: str, expected: bool,
          base_url: str | None = BASE) -> None:
    c = crit(rtype, name, value, base_url)
    assert matches(c, rtype, resource) is expected, (name, value)
    terms = c.query_terms()
    if expected and terms is not None:  # the index never loses a match
        assert set(terms) & set(index_terms(rtype, resource).get(c.code, ()))


def patient(**fields: Any) -> Json:
    return {"resourceType": "Patient", "id": "p", **fields}


def observation(**fields: Any) -> Json:
    return {"resourceType": "Observation", "id": "o", "status": "final", "code": {}, **fields}


# ---------------------------------------------------------------- string


@pytest.mark.parametrize(
    ("value", "expected"),
    [("jean", True), ("JEAN-LUC", True), ("jean luc", True), ("Jéan", True), ("luc", False),
     ("picard", True), ("capt", True), ("iii", True), ("jean-luc picard", False),
     ("Jean Luc P", False), ("xyz", False)],
)
def test_string_starts_with_each_part(value: str, expected: bool) -> None:
    p = patient(name=[{"given": ["Jean-Luc"], "family": "Picard", "prefix": ["Capt."],
                       "suffix": ["III"]}])
    check("Patient", p, "name", value, expected)


def test_string_exact_and_text() -> None:
    p = patient(name=[{"text": "Jean-Luc Picard"}])
    check("Patient", p, "name", "jean-luc pic", True)
    check("Patient", p, "name:exact", "Jean-Luc Picard", True)
    check("Patient", p, "name:exact", "jean-luc picard", False)
    check("Patient", p, "name:exact", "Jean-Luc", False)


def test_string_on_address_and_markdown() -> None:
    p = patient(address=[{"line": ["10 Downing St"], "district": "Westminster", "state": "ENG"}])
    check("Patient", p, "address", "westm", True)
    check("Patient", p, "address", "10 down", True)
    check("Patient", p, "address-state", "eng", True)
    check("Patient", p, "address-city", "westm", False)


# ---------------------------------------------------------------- token


def test_token_rules() -> None:
    o = observation(code={"coding": [{"system": "http://loinc.org", "code": "1-8"},
                                     {"code": "local-1"}]})
    check("Observation", o, "code", "1-8", True)
    check("Observation", o, "code", "http://loinc.org|1-8", True)
    check("Observation", o, "code", "|1-8", False)
    check("Observation", o, "code", "|local-1", True)
    check("Observation", o, "code", "http://loinc.org|local-1", False)
    check("Observation", o, "code", "http://loinc.org|", True)
    check("Observation", o, "code", "http://snomed.info/sct|", False)
    check("Observation", o, "code", "1-8x", False)
    check("Observation", o, "code", "LOCAL-1", False)  # tokens are case-sensitive
    check("Observation", o, "code:not", "1-8", False)
    check("Observation", o, "code:not", "2-9", True)
    check("Observation", observation(), "code:not", "2-9", True)


def test_token_on_code_with_implicit_system_and_boolean() -> None:
    p = patient(gender="female", active=True)
    check("Patient", p, "gender", "http://hl7.org/fhir/administrative-gender|female", True)
    check("Patient", p, "gender", "|female", True)
    check("Patient", p, "gender", "http://hl7.org/fhir/administrative-gender|", True)
    check("Patient", p, "active", "true", True)
    check("Patient", p, "active", "false", False)
    check("Patient", patient(deceasedDateTime="2020"), "deceased", "true", True)
    check("Patient", patient(deceasedBoolean=True), "deceased", "true", True)
    check("Patient", patient(deceasedBoolean=False), "deceased", "false", True)
    check("Patient", patient(), "deceased", "false", True)


def test_identifier_of_type() -> None:
    p = patient(identifier=[{"type": {"coding": [{"system": "urn:t", "code": "MR"},
                                                 {"system": "urn:t", "code": "PI"}]},
                             "system": "urn:s", "value": "7"}])
    check("Patient", p, "identifier:of-type", "urn:t|PI|7", True)
    check("Patient", p, "identifier:of-type", "urn:t|MR|8", False)
    check("Patient", p, "identifier:of-type", "urn:x|MR|7", False)
    check("Patient", p, "identifier", "urn:s|7", True)


# ---------------------------------------------------------------- reference


def test_reference_forms() -> None:
    o = observation(subject={"reference": "Patient/1"},
                    performer=[{"reference": f"{BASE}/Practitioner/2"},
                               {"reference": "http://elsewhere.org/fhir/Practitioner/3"},
                               {"reference": "urn:uuid:5f1e-22"}])
    check("Observation", o, "subject", "Patient/1", True)
    check("Observation", o, "subject", "1", True)
    check("Observation", o, "subject", "Group/1", False)
    check("Observation", o, "subject:Patient", "1", True)
    check("Observation", o, "subject:Group", "1", False)
    check("Observation", o, "subject", f"{BASE}/Patient/1", True)
    check("Observation", o, "subject", "http://elsewhere.org/fhir/Patient/1", False)
    check("Observation", o, "performer", "Practitioner/2", True)
    check("Observation", o, "performer", "2", True)
    check("Observation", o, "performer", "Practitioner/3", False)
    check("Observation", o, "performer", "3", False)
    check("Observation", o, "performer", "http://elsewhere.org/fhir/Practitioner/3", True)
    check("Observation", o, "performer", "urn:uuid:5f1e-22", True)
    # without a known base, absolute references only match by URL
    check("Observation", o, "performer", "Practitioner/2", False, base_url=None)
    check("Observation", o, "performer", f"{BASE}/Practitioner/2", True, base_url=None)


def test_reference_target_filter_and_contained() -> None:
    o = observation(subject={"reference": "#p"},
                    contained=[{"resourceType": "Patient", "id": "p"}])
    check("Observation", o, "patient:missing", "false", True)
    check("Observation", o, "subject", "p", False)  # local references are not searchable
    g = observation(subject={"reference": "Group/9"})
    check("Observation", g, "patient:missing", "true", True)
    check("Observation", g, "subject:missing", "false", True)
    ident = observation(subject={"identifier": {"system": "urn:mrn", "value": "42"}})
    check("Observation", ident, "patient:identifier", "urn:mrn|42", True)
    check("Observation", ident, "subject:identifier", "42", True)
    check("Observation", ident, "subject:identifier", "|42", False)
    check("Observation", ident, "subject:identifier", "urn:other|42", False)
    typed = observation(subject={"type": "Group", "identifier": {"value": "42"}})
    check("Observation", typed, "patient:identifier", "42", False)
    check("Observation", typed, "subject:identifier", "42", True)


def test_reference_criterion_matches_resolved_chains() -> None:
    o = observation(subject={"reference": "Patient/1/_history/2"})
    param = search_params("Observation")["subject"]
    assert matches(reference_criterion("subject", param, ["Group/1", "Patient/1"]), "Observation", o)
    assert not matches(reference_criterion("subject", param, []), "Observation", o)
    absolute = observation(subject={"reference": f"{BASE}/Patient/1"})
    assert not matches(reference_criterion("subject", param, ["Patient/1"]), "Observation", absolute)
    local = reference_criterion("subject", param, ["Patient/1"], base_url=BASE)
    assert matches(local, "Observation", absolute)


def test_canonical_references() -> None:
    qr = {"resourceType": "QuestionnaireResponse", "id": "q", "status": "completed",
          "questionnaire": "http://a.org/Questionnaire/x|3"}
    check("QuestionnaireResponse", qr, "questionnaire", "http://a.org/Questionnaire/x", True)
    check("QuestionnaireResponse", qr, "questionnaire", "http://a.org/Questionnaire/x|3", True)
    check("QuestionnaireResponse", qr, "questionnaire", "http://a.org/Questionnaire/x|4", False)
    check("QuestionnaireResponse", qr, "questionnaire", "Questionnaire/x", False)


# ---------------------------------------------------------------- date


@pytest.mark.parametrize(
    ("stored", "query", "expected"),
    [
        ("2024-03-15T23:30:00-02:00", "2024-03-16", True),  # 01:30Z the next day
        ("2024-03-15T23:30:00-02:00", "2024-03-15", False),
        ("2024-03-15T23:30:00-02:00", "2024-03-16T01:30:00Z", True),
        ("2024-03-15T23:30:00-02:00", "2024-03-16T01:30Z", True),
        ("2024-03-15T23:30:00-02:00", "2024-03-16T03:30:00%2B02:00", True),
        ("2024-03-15T23:30:00.250-02:00", "2024-03-16T01:30:00Z", True),
        ("2024-03-15T23:30:00.250-02:00", "2024-03-16T01:30:00.25Z", True),
        ("2024-03-15T23:30:00.250-02:00", "2024-03-16T01:30:00.2Z", True),
        ("2024-03-15T23:30:00.250-02:00", "2024-03-16T01:30:00.3Z", False),
        ("2024-03", "2024-03-15", False),
        ("2024-03", "2024", True),
        ("2024-03", "ge2024-03-15", True),  # ends after the search day
        ("2024-03", "gt2024-03-31", False),
        ("2024-03", "le2024-03-15", True),
        ("2024-03", "lt2024-03-01", False),
        ("2024-03", "sa2024-02-29", True),
        ("2024-03", "eb2024-04-01", True),
        ("2024-03", "eb2024-03-31", False),
        ("2024", "ap2024-06", True),
        ("2010", "ap2024", False),
    ],
)
def test_dates(stored: str, query: str, expected: bool) -> None:
    check("Observation", observation(effectiveDateTime=stored), "date", query.replace("%2B", "+"),
          expected)


def test_periods_and_timing() -> None:
    open_end = observation(effectivePeriod={"start": "2024-01-10"})
    check("Observation", open_end, "date", "gt2100", True)
    check("Observation", open_end, "date", "lt2024-01-10", False)
    check("Observation", open_end, "date", "le2024-01-10", False)  # starts with the search day
    check("Observation", open_end, "date", "le2024-01-11", True)
    check("Observation", open_end, "date", "2024", False)
    open_start = observation(effectivePeriod={"end": "2024-01-10"})
    check("Observation", open_start, "date", "lt1800", True)
    check("Observation", open_start, "date", "gt2024-01-10", False)
    check("Observation", open_start, "date", "eb2024-01-11", True)
    timing = observation(effectiveTiming={"event": ["2024-01-02T10:00:00Z", "2024-01-09"]})
    check("Observation", timing, "date", "2024-01", True)
    check("Observation", timing, "date", "2024-01-05", False)
    check("Observation", timing, "date", "ap2024-01-05", True)


# ---------------------------------------------------------------- number and quantity


@pytest.mark.parametrize(
    ("stored", "query", "expected"),
    [
        (100, "100", True), (100.4, "100", True), (100.5, "100", False), (99.5, "100", True),
        (99.4, "100", False), (100.004, "100.00", True), (100.005, "100.00", False),
        (100, "1e2", True), (149, "1e2", True), (150, "1e2", False), (100, "gt100", False),
        (100.01, "gt100", True), (100, "ge100", True), (99.99, "lt100", True),
        (100, "le100", True), (100.4, "sa100", False), (100.5, "sa100", True),
        (99.5, "eb100", False), (99.49, "eb100", True), (100, "ne100", False),
        (101, "ne100", True), (110, "ap100", True), (110.6, "ap100", False),
        (-5, "lt-4.5", True), (0, "0", True), (0.4, "0", True), (-0.5, "0", True),
    ],
)
def test_numbers(stored: float, query: str, expected: bool) -> None:
    ra = {"resourceType": "RiskAssessment", "id": "r", "status": "final",
          "prediction": [{"probabilityDecimal": stored}]}
    check("RiskAssessment", ra, "probability", query, expected)


def test_quantity_comparators_and_units() -> None:
    lt5 = observation(valueQuantity={"value": 5, "comparator": "<", "unit": "mg",
                                     "system": "http://unitsofmeasure.org", "code": "mg"})
    check("Observation", lt5, "value-quantity", "lt5", True)
    check("Observation", lt5, "value-quantity", "le4", True)
    check("Observation", lt5, "value-quantity", "ge5", False)
    check("Observation", lt5, "value-quantity", "gt4.9", True)
    check("Observation", lt5, "value-quantity", "5", False)
    check("Observation", lt5, "value-quantity", "eb5", False)  # could be 4.9, not below 4.5
    check("Observation", lt5, "value-quantity", "eb6", True)
    check("Observation", lt5, "value-quantity", "ap4", True)
    ge5 = observation(valueQuantity={"value": 5, "comparator": ">=", "unit": "mg"})
    check("Observation", ge5, "value-quantity", "ge5||mg", True)
    check("Observation", ge5, "value-quantity", "lt5", False)
    check("Observation", ge5, "value-quantity", "le5", True)
    check("Observation", ge5, "value-quantity", "gt1000", True)
    check("Observation", ge5, "value-quantity", "5|http://unitsofmeasure.org|mg", False)
    check("Observation", ge5, "value-quantity", "sa4", True)


def test_money_and_ranges() -> None:
    item = {"resourceType": "ChargeItem", "id": "c", "status": "billed", "code": {},
            "subject": {"reference": "Patient/p"},
            "priceOverride": {"value": 12.5, "currency": "CHF"}}
    check("ChargeItem", item, "price-override", "12.5||CHF", True)
    check("ChargeItem", item, "price-override", "12.5|urn:iso:std:iso:4217|CHF", True)
    check("ChargeItem", item, "price-override", "12.5||EUR", False)
    cond = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
            "onsetRange": {"low": {"value": 10, "unit": "a"}, "high": {"value": 20, "unit": "a"}}}
    check("Condition", cond, "onset-age", "15", False)
    check("Condition", cond, "onset-age", "1e1", False)
    check("Condition", cond, "onset-age", "gt19", True)
    check("Condition", cond, "onset-age", "lt11||a", True)
    check("Condition", cond, "onset-age", "ap25", False)  # [22, 28)
    check("Condition", cond, "onset-age", "ap21", True)  # [18.4, 23.6) overlaps [10, 20]
    check("Condition", cond, "onset-age", "ap50", False)
    open_range = {**cond, "onsetRange": {"low": {"value": 10}}}
    check("Condition", open_range, "onset-age", "gt1000", True)
    check("Condition", open_range, "onset-age", "lt10", False)


# ---------------------------------------------------------------- uri and composite


def test_uri_above_below() -> None:
    sd = {"resourceType": "StructureDefinition", "id": "s", "status": "draft",
          "url": "http://a.org/fhir/StructureDefinition/x"}
    check("StructureDefinition", sd, "url", "http://a.org/fhir/StructureDefinition/x", True)
    check("StructureDefinition", sd, "url", "http://a.org/fhir/StructureDefinition/X", False)
    check("StructureDefinition", sd, "url:below", "http://a.org/fhir", True)
    check("StructureDefinition", sd, "url:below", "http://a.org/fhir/", True)
    check("StructureDefinition", sd, "url:below", "http://a.org/fh", False)
    check("StructureDefinition", sd, "url:above", "http://a.org/fhir/StructureDefinition/x/y", True)
    check("StructureDefinition", sd, "url:above", "http://a.org/fhir/StructureDefinition/xy", False)
    check("StructureDefinition", sd, "url:above", "http://a.org/fhir", False)


def test_composite_pairs_components_in_one_focus() -> None:
    o = observation(component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 140}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 90}},
    ])
    check("Observation", o, "component-code-value-quantity", "8480-6$140", True)
    check("Observation", o, "component-code-value-quantity", "8480-6$90", False)
    check("Observation", o, "component-code-value-quantity", "8480-6$gt130,8462-4$lt50", True)
    check("Observation", o, "component-code-value-quantity", f"{quote('http://loinc.org')}|8462-4$ge90",
          False)
    check("Observation", o, "component-code-value-quantity", "http://loinc.org|8462-4$ge90", True)
    check("Observation", o, "combo-code-value-quantity", "8462-4$90", True)
    check("Observation", o, "code-value-quantity", "8462-4$90", False)
    check("Observation", o, "code-value-quantity:missing", "true", True)


def test_missing() -> None:
    check("Patient", patient(), "birthdate:missing", "true", True)
    check("Patient", patient(birthDate="2000"), "birthdate:missing", "true", False)
    check("Patient", patient(birthDate="2000"), "birthdate:missing", "false", True)
    check("Patient", patient(name=[{"use": "official"}]), "name:missing", "true", True)


def test_resource_type_must_agree() -> None:
    with pytest.raises(ValueError):
        matches(crit("Patient", "name", "x"), "Person", {"resourceType": "Person"})
