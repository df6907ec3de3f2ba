"""The terminology engine over a small hierarchical code system and the bundled R4 value sets."""

from __future__ import annotations

from typing import Any

import pytest

from fhirvault.domain.terminology import Terminology, TerminologyError
from fhirvault.services.terminology import base_resources

CS = "http://example.org/cs/animals"
ANIMALS: dict[str, Any] = {
    "resourceType": "CodeSystem", "id": "animals", "url": CS, "version": "1", "name": "Animals",
    "content": "complete", "caseSensitive": False,
    "property": [{"code": "legs", "type": "integer"}, {"code": "status", "type": "code"}],
    "concept": [
        {"code": "animal", "display": "Animal", "property": [{"code": "notSelectable", "valueBoolean": True}],
         "concept": [
             {"code": "mammal", "display": "Mammal", "concept": [
                 {"code": "dog", "display": "Dog", "definition": "A barking one",
                  "property": [{"code": "legs", "valueInteger": 4}]},
                 {"code": "whale", "display": "Whale", "property": [{"code": "legs", "valueInteger": 0}]},
             ]},
             {"code": "bird", "display": "Bird", "concept": [
                 {"code": "dodo", "display": "Dodo", "property": [{"code": "status", "valueCode": "retired"},
                                                                   {"code": "legs", "valueInteger": 2}]},
                 {"code": "hen", "display": "Hen", "property": [{"code": "legs", "valueInteger": 2}]},
             ]},
         ]},
    ],
}


def vs(compose: dict[str, Any], url: str = "http://example.org/vs/x") -> dict[str, Any]:
    return {"resourceType": "ValueSet", "url": url, "status": "active", "compose": compose}


def codes(terms: Terminology, value_set: dict[str, Any], **kw: Any) -> list[str]:
    out = terms.expand(value_set, timestamp="2026-01-01T00:00:00Z", identifier="urn:uuid:x", **kw)
    return [c["code"] for c in out["expansion"].get("contains", [])]


@pytest.fixture
def terms() -> Terminology:
    return Terminology([ANIMALS])


def test_whole_system_filters_and_excludes(terms: Terminology) -> None:
    assert codes(terms, vs({"include": [{"system": CS}]})) == ["animal", "mammal", "dog", "whale", "bird", "dodo", "hen"]
    is_a = {"system": CS, "filter": [{"property": "concept", "op": "is-a", "value": "mammal"}]}
    assert codes(terms, vs({"include": [is_a]})) == ["mammal", "dog", "whale"]
    below = {"system": CS, "filter": [{"property": "concept", "op": "descendent-of", "value": "bird"}]}
    assert codes(terms, vs({"include": [below]})) == ["dodo", "hen"]
    two_legs = {"system": CS, "filter": [{"property": "legs", "op": "=", "value": "2"}]}
    assert codes(terms, vs({"include": [two_legs]})) == ["dodo", "hen"]
    # filters AND together; excludes subtract
    both = {"system": CS, "filter": [is_a["filter"][0], {"property": "legs", "op": "=", "value": "4"}]}
    assert codes(terms, vs({"include": [both]})) == ["dog"]
    assert codes(terms, vs({"include": [{"system": CS}], "exclude": [is_a]})) == ["animal", "bird", "dodo", "hen"]
    not_a = {"system": CS, "filter": [{"property": "concept", "op": "is-not-a", "value": "bird"}]}
    assert codes(terms, vs({"include": [not_a]})) == ["animal", "mammal", "dog", "whale"]
    listed = {"system": CS, "concept": [{"code": "hen"}, {"code": "DOG", "display": "Doggy"}, {"code": "nope"}]}
    out = terms.expand(vs({"include": [listed]}), timestamp="t", identifier="i")
    assert [(c["code"], c["display"]) for c in out["expansion"]["contains"]] == [("hen", "Hen"), ("dog", "Doggy")]


def test_flags_text_filter_paging_and_active_only(terms: Terminology) -> None:
    whole = vs({"include": [{"system": CS}]})
    out = terms.expand(whole, timestamp="t", identifier="i", offset=2, count=2)
    assert out["expansion"]["total"] == 7 and out["expansion"]["offset"] == 2
    assert [c["code"] for c in out["expansion"]["contains"]] == ["dog", "whale"]
    first = terms.expand(whole, timestamp="t", identifier="i")["expansion"]["contains"]
    assert first[0]["abstract"] is True and next(c for c in first if c["code"] == "dodo")["inactive"] is True
    assert codes(terms, whole, text="o") == ["dog", "dodo"]  # code or display, case-insensitive
    assert "dodo" not in codes(terms, whole, active_only=True)


def test_unavailable_systems_and_filters_are_refused(terms: Terminology) -> None:
    loinc = vs({"include": [{"system": "http://loinc.org", "filter": [{"property": "SCALE_TYP", "op": "=",
                                                                       "value": "DOC"}]}]})
    with pytest.raises(TerminologyError, match=r"loinc\.org is not available"):
        terms.expand_all(loinc)
    with pytest.raises(TerminologyError, match="not supported"):
        terms.expand_all(vs({"include": [{"system": CS, "filter": [{"property": "code", "op": "regex",
                                                                    "value": "d.*"}]}]}))
    # listed codes of an external system expand (the value set carries them)
    listed = vs({"include": [{"system": "http://snomed.info/sct", "concept": [{"code": "22298006",
                                                                               "display": "Myocardial infarction"}]}]})
    assert codes(terms, listed) == ["22298006"]
    with pytest.raises(TerminologyError) as exc:
        terms.lookup("http://snomed.info/sct", "22298006")
    assert exc.value.status == 404


def test_lookup_and_validate_code(terms: Terminology) -> None:
    out = terms.lookup(CS, "Dog")  # not case sensitive
    params = {p["name"]: p for p in out["parameter"] if p["name"] != "property"}
    assert params["display"]["valueString"] == "Dog" and params["name"]["valueString"] == "Animals"
    props = [(p["part"][0]["valueCode"], p["part"][1]) for p in out["parameter"] if p["name"] == "property"]
    assert ("parent", {"name": "value", "valueCode": "mammal"}) in props
    assert ("definition", {"name": "value", "valueString": "A barking one"}) in props
    assert ("legs", {"name": "value", "valueInteger": 4}) in props
    with pytest.raises(TerminologyError):
        terms.lookup(CS, "cat")
    birds = vs({"include": [{"system": CS, "filter": [{"property": "concept", "op": "is-a", "value": "bird"}]}]})

    def result(out: dict[str, Any]) -> bool:
        return bool(out["parameter"][0]["valueBoolean"])

    assert result(terms.validate_in_value_set(birds, [{"system": CS, "code": "hen"}]))
    assert not result(terms.validate_in_value_set(birds, [{"system": CS, "code": "dog"}]))
    assert not result(terms.validate_in_value_set(birds, [{"system": CS, "code": "hen", "display": "Cow"}]))
    assert result(terms.validate_in_code_system(CS, None, [{"code": "whale", "display": "whale"}]))
    assert not result(terms.validate_in_code_system(CS, None, [{"code": "cat"}]))


def test_bundled_r4_value_sets() -> None:
    terms = Terminology(base_resources())
    cs_count, vs_count = terms.counts()
    assert cs_count > 400 and vs_count > 600
    gender = terms.value_set("http://hl7.org/fhir/ValueSet/administrative-gender")
    assert codes(terms, gender) == ["male", "female", "other", "unknown"]
    # a value set including another value set, and a hierarchical code system
    clinical = terms.value_set("http://hl7.org/fhir/ValueSet/condition-clinical")
    assert set(codes(terms, clinical)) == {"active", "recurrence", "relapse", "inactive", "remission", "resolved"}
    with pytest.raises(TerminologyError, match=r"loinc\.org"):
        terms.expand_all(terms.value_set("http://hl7.org/fhir/ValueSet/observation-codes"))
