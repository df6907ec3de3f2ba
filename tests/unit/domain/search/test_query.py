"""Parsing of R4 search requests and the query terms of each criterion."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import parse_qsl

import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.query import (
    ChainCriterion,
    CompositeValue,
    Criterion,
    DateValue,
    HasCriterion,
    MissingValue,
    NumberValue,
    OfTypeValue,
    ParsedSearch,
    QuantityValue,
    ReferenceValue,
    SearchError,
    StringValue,
    TokenValue,
    UriValue,
    id_criterion,
    parse_search,
    reference_criterion,
    split_escaped,
    unescape,
)
from fhirvault.domain.search.values import date_day, number_key, parse_date, range_cover

NOW = 1_717_200_000_000  # 2024-06-01T00:00:00Z
SECRET = "Zyxwvut-Secret-42"  # a value that must never appear in a message


def parse(rtype: str, query: str, strict: bool = True, base_url: str | None = None) -> ParsedSearch:
    pairs = parse_qsl(query, keep_blank_values=True)
    return parse_search(rtype, pairs, strict=strict, now_ms=NOW, base_url=base_url)


def one(rtype: str, query: str, base_url: str | None = None) -> Criterion:
    parsed = parse(rtype, query, base_url=base_url)
    assert len(parsed.criteria) == 1
    crit = parsed.criteria[0]
    assert isinstance(crit, Criterion)
    return crit


def error(rtype: str, query: str, strict: bool = True) -> SearchError:
    with pytest.raises(SearchError) as info:
        parse(rtype, query, strict=strict)
    exc = info.value
    assert isinstance(exc, OperationOutcomeError) and exc.status == 400
    outcome = exc.outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert SECRET not in str(outcome)
    return exc


def message(exc: SearchError) -> str:
    return exc.issues[0].diagnostics


# ---------------------------------------------------------------- structure


def test_and_across_repeats_or_across_commas() -> None:
    parsed = parse("Patient", "name=al,bo&name=c&gender=female")
    assert [c.code for c in parsed.criteria] == ["name", "name", "gender"]
    first = parsed.criteria[0]
    assert isinstance(first, Criterion)
    assert first.values == (StringValue("al", "al"), StringValue("bo", "bo"))
    assert first.query_terms() == [b"s|al", b"s|bo"]
    second = parsed.criteria[1]
    assert isinstance(second, Criterion) and second.query_terms() is None  # one letter: scan


def test_escaping() -> None:
    assert split_escaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert split_escaped("a\\", ",") == ["a\\"]
    assert unescape(r"a\,b\$c\|d\\e\x") == r"a,b$c|d\e\x"
    crit = one("Patient", "family=" + r"Smith\,Jones,Doe".replace("\\", "%5C"))
    assert crit.values == (StringValue("Smith,Jones", "smith jones"), StringValue("Doe", "doe"))
    tok = one("Patient", "identifier=" + r"urn:a\|b|v\,1".replace("\\", "%5C"))
    assert tok.values == (TokenValue("urn:a|b", "v,1"),)
    comp = one("Observation", "code-value-string=" + r"c\$1$text".replace("\\", "%5C"))
    assert comp.values == (CompositeValue((TokenValue(None, "c$1"), StringValue("text", "text"))),)


def test_result_parameters() -> None:
    parsed = parse(
        "Observation",
        "_count=10&_sort=-date,status,_id&_summary=count&_elements=id,status,code"
        "&_total=accurate&_include=Observation:subject:Patient&_include:iterate=Patient:organization"
        "&_revinclude=Provenance:target&_include=*&_format=json&_pretty=true&code=x",
    )
    assert parsed.count == 10
    assert [(k.param.code, k.descending) for k in parsed.sort] == [
        ("date", True), ("status", False), ("_id", False)
    ]
    assert parsed.summary == "count"
    assert parsed.elements == ("id", "status", "code")
    assert parsed.total == "accurate"
    inc = parsed.includes
    assert (inc[0].source_type, inc[0].param and inc[0].param.code, inc[0].target_type,
            inc[0].iterate) == ("Observation", "subject", "Patient", False)
    assert inc[1].iterate and inc[1].source_type == "Patient"
    assert inc[2].param is None and inc[2].source_type is None
    assert parsed.revincludes[0].param is not None
    assert parsed.revincludes[0].param.code == "target"
    assert len(parsed.criteria) == 1 and parsed.unknown == ()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("_count=-1", "_count"),
        ("_count=ten", "_count"),
        ("_count=1&_count=2", "more than once"),
        ("_sort=nosuch", "_sort"),
        ("_sort=", "_sort"),
        ("_sort=date,", "_sort"),
        ("_summary=maybe", "_summary"),
        ("_total=some", "_total"),
        ("_elements=a.b", "_elements"),
        ("_include=Observation", "_include"),
        ("_include=Nope:subject", "unknown resource type"),
        ("_include=Observation:status", "no reference parameter"),
        ("_include=Observation:subject:Medication", "not a target type"),
        ("_include:deep=Observation:subject", "modifier"),
        ("_count:x=1", "no modifier"),
    ],
)
def test_bad_result_parameters(query: str, needle: str) -> None:
    assert needle in message(error("Observation", query))


def test_unknown_parameters_strict_and_lenient() -> None:
    lenient = parse("Patient", f"nosuch={SECRET}&name=x&foo.bar=1&_text=x", strict=False)
    assert lenient.unknown == ("nosuch", "foo.bar", "_text")
    assert len(lenient.criteria) == 1
    exc = error("Patient", f"nosuch={SECRET}")
    assert "nosuch" in message(exc) and "Patient" in message(exc)
    assert exc.issues[0].code == "not-supported"
    # names that are not parameter-shaped are not echoed either
    exc = error("Patient", f"{SECRET} x=1")
    assert "unprintable" in message(exc)


def test_unknown_resource_type() -> None:
    with pytest.raises(SearchError):
        parse_search("Nope", [], strict=True)


# ---------------------------------------------------------------- values and modifiers


def test_token_forms() -> None:
    crit = one("Observation", "code=a,http://s|b,|c,http://s|")
    assert crit.values == (
        TokenValue(None, "a"), TokenValue("http://s", "b"), TokenValue("", "c"),
        TokenValue("http://s", None),
    )
    # |c (no system) uses tc|: verification drops the codes with a system
    assert crit.query_terms() == [b"tc|a", b"ts|http://s|b", b"tc|c", b"tS|http://s"]
    of_type = one("Patient", "identifier:of-type=http://t|MR|123")
    assert of_type.values == (OfTypeValue("http://t", "MR", "123"),)
    assert of_type.query_terms() == [b"to|http://t|MR|123"]
    assert one("Patient", "gender:not=male").query_terms() is None


def test_string_terms_of_queries() -> None:
    # the longest indexed prefix length (2, 3, 4, 5, 6, 8, 12) within the query
    assert one("Patient", "name=Éva-Marie").query_terms() == [b"s|eva marie"]
    assert one("Patient", "name=Abcdefghijklmnopqrstuvwxyz").query_terms() == [
        b"s|abcdefghi"
    ]
    assert one("Patient", "name=abcdefg").query_terms() == [b"s|abcdef"]
    assert one("Patient", "name=abcdef").query_terms() == [b"s|abcdef"]
    assert one("Patient", "name=li").query_terms() == [b"s|li"]
    assert one("Patient", "name=日本語").query_terms() == ["s|日本語".encode()]
    assert one("Patient", "name:exact=Éva").query_terms() == ["x|Éva".encode()]
    assert one("Patient", "name:exact=E").query_terms() == [b"x|E"]
    # too short for an indexed prefix: scan
    assert one("Patient", "name=É").query_terms() is None
    assert one("Patient", "name=--").query_terms() is None
    assert one("Patient", "name=a,bob").query_terms() is None


def test_missing() -> None:
    crit = one("Patient", "birthdate:missing=true")
    assert crit.modifier == "missing" and crit.values == (MissingValue(True),)
    assert crit.query_terms() is None
    assert one("Patient", "birthdate:missing=false").query_terms() is None
    assert one("Patient", "birthdate:missing=false,true").query_terms() is None
    assert "true or false" in message(error("Patient", "birthdate:missing=yes"))


def test_reference_forms() -> None:
    crit = one("Observation", "subject=Patient/1,2,https://x.org/fhir/Patient/3,Patient/4/_history/9")
    assert crit.values == (
        ReferenceValue("relative", type="Patient", id="1"),
        ReferenceValue("id", id="2"),
        ReferenceValue("url", url="https://x.org/fhir/Patient/3"),
        ReferenceValue("relative", type="Patient", id="4"),
    )
    assert crit.query_terms() == [
        b"r|Patient/1", b"ri|2", b"ru|https://x.org/fhir/Patient/3", b"r|Patient/4"
    ]
    local = one("Observation", "subject=https://x.org/fhir/Patient/3", base_url="https://x.org/fhir/")
    assert local.values == (ReferenceValue("relative", type="Patient", id="3"),)
    typed = one("Observation", "subject:Patient=7")
    assert typed.modifier == "type" and typed.target_type == "Patient"
    assert typed.query_terms() == [b"r|Patient/7"]
    canon = one("QuestionnaireResponse", "questionnaire=http://q.org/Questionnaire/a|1.0")
    assert canon.values == (ReferenceValue("url", url="http://q.org/Questionnaire/a", version="1.0"),)
    assert canon.query_terms() == [b"ru|http://q.org/Questionnaire/a|1.0"]
    ident = one("Observation", "subject:identifier=urn:s|v1,v2,|v3")
    assert ident.query_terms() == [b"rI|urn:s|v1", b"rIv|v2", b"rIv|v3"]
    assert ident.values[2] == ReferenceValue("identifier", ident_system="", ident_value="v3")


@pytest.mark.parametrize(
    "query",
    [
        f"subject=Nope/{SECRET}",
        f"subject=#{SECRET}",
        f"subject={SECRET} with spaces",
        f"subject:Patient=Group/{SECRET}",
        "subject:Medication=1",
        f"subject=Patient/{SECRET}|2",
    ],
)
def test_bad_references(query: str) -> None:
    assert "'subject'" in message(error("Observation", query))


def test_date_values_and_terms() -> None:
    crit = one("Observation", "date=2020-03")
    lo, hi = parse_date("2020-03") or (0, 0)
    assert crit.values[0] == DateValue("eq", lo, hi, lo - (NOW - lo) // 10, hi + (NOW - lo) // 10)
    # each dL/dH block also looked up in dP: a one-day value is indexed as a point
    blocks = range_cover(date_day(lo), date_day(hi - 1), 6, 8)
    assert crit.query_terms() == [
        *(b"dL|%d|%d" % b for b in blocks), *(b"dP|%d|%d" % b for b in blocks)
    ]
    ge = one("Observation", "date=ge2020-03")
    blocks = range_cover(date_day(lo), 2**18 - 1, 6, 8)
    assert ge.query_terms() == [
        *(b"dH|%d|%d" % b for b in blocks), *(b"dP|%d|%d" % b for b in blocks)
    ]
    assert one("Observation", "date=ne2020").query_terms() is None
    ap = one("Observation", "date=ap2020")
    v = ap.values[0]
    assert isinstance(v, DateValue)
    terms = ap.query_terms()
    low = range_cover(date_day(v.ap_lo), date_day(v.ap_hi - 1), 6, 8)
    high = range_cover(date_day(v.ap_lo), 2**18 - 1, 6, 8)
    # ap: a point's day lies in [day(A), day(B - 1)], so dP needs the dL blocks only
    assert terms == [
        *(b"dL|%d|%d" % b for b in low), *(b"dP|%d|%d" % b for b in low),
        *(b"dH|%d|%d" % b for b in high),
    ]


@pytest.mark.parametrize(
    "value",
    ["2020-13", "2020-02-30", "xx2020", "2020-01-01T25:00", "20200101", "2020-1-1", "gt",
     "ge2020-01-01T10:00:00+25:00", f"{SECRET}"],
)
def test_bad_dates(value: str) -> None:
    exc = error("Patient", f"birthdate={value}")
    assert "'birthdate'" in message(exc)
    assert value not in message(exc) or value in ("gt",)


def test_number_precision() -> None:
    crit = one("RiskAssessment", "probability=100")
    assert crit.values == (
        NumberValue("eq", Decimal(100), Decimal("99.5"), Decimal("100.5"), Decimal("89.5"),
                    Decimal("110.5")),
    )
    v = one("RiskAssessment", "probability=100.00").values[0]
    assert isinstance(v, NumberValue)
    assert (v.lo, v.hi) == (Decimal("99.995"), Decimal("100.005"))
    v = one("RiskAssessment", "probability=1e2").values[0]
    assert isinstance(v, NumberValue)
    assert (v.lo, v.hi) == (Decimal(50), Decimal(150))
    v = one("RiskAssessment", "probability=gt-0.5").values[0]
    assert isinstance(v, NumberValue) and v.prefix == "gt" and v.value == Decimal("-0.5")
    terms = one("RiskAssessment", "probability=100").query_terms()
    assert terms == [
        b"n|%d|%d" % b for b in range_cover(number_key(99.5), number_key(100.5), 6, 16)
    ]
    assert one("RiskAssessment", "probability=ne1").query_terms() is None


@pytest.mark.parametrize("value", ["abc", "1.2.3", "1e", "--1", "nan", "inf", "1e99999", "", "gt"])
def test_bad_numbers(value: str) -> None:
    assert "'probability'" in message(error("RiskAssessment", f"probability={value}"))


def test_quantity_forms() -> None:
    crit = one("Observation", "value-quantity=5.4|http://u|mg,gt5||mg,ap5")
    a, b, c = crit.values
    assert isinstance(a, QuantityValue) and (a.system, a.code) == ("http://u", "mg")
    assert isinstance(b, QuantityValue) and (b.system, b.code, b.number.prefix) == (None, "mg", "gt")
    assert isinstance(c, QuantityValue) and (c.system, c.code) == (None, None)
    terms = crit.query_terms()
    assert terms is not None
    # value buckets only: the units are verified
    assert terms and all(t.startswith(b"q|") for t in terms)
    assert one("Observation", "value-quantity=5.4|http://u|mg").query_terms() == one(
        "Observation", "value-quantity=5.4"
    ).query_terms()
    for bad in ("5|mg", "5|a|b|c", "x|u|mg", f"{SECRET}|u|c"):
        assert "'value-quantity'" in message(error("Observation", f"value-quantity={bad}"))


def test_uri_terms() -> None:
    assert one("ValueSet", "url=http://a.org/x").query_terms() == [b"u|http://a.org/x"]
    # :below has no index: scan
    assert one("ValueSet", "url:below=http://a.org/fhir/x").query_terms() is None
    assert one("ValueSet", "url:below=urn:").query_terms() is None
    assert one("ValueSet", "url:above=http://a.org/b/c").query_terms() == [
        b"u|http://a.org/b/c", b"u|http:", b"u|http:/", b"u|http://", b"u|http://a.org",
        b"u|http://a.org/", b"u|http://a.org/b", b"u|http://a.org/b/",
    ]


def test_composites() -> None:
    crit = one("Observation", "code-value-quantity=http://loinc.org|8480-6$gt100||mm[Hg]")
    value = crit.values[0]
    assert isinstance(value, CompositeValue)
    assert value.components[0] == TokenValue("http://loinc.org", "8480-6")
    assert isinstance(value.components[1], QuantityValue)
    assert crit.query_terms() == [b"c|ts|http://loinc.org|8480-6"]
    assert "2 components" in message(error("Observation", "code-value-quantity=8480-6"))
    assert "'code-value-quantity'" in message(
        error("Observation", "code-value-quantity=a$b$c")
    )
    date = one("Observation", "code-value-date=x$ge2020")
    assert isinstance(date.values[0], CompositeValue)
    assert isinstance(date.values[0].components[1], DateValue)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("name:contains=abc", "n-gram indexes that leak too much"),
        ("name:text=abc", "n-gram indexes that leak too much"),
        ("gender:text=abc", "n-gram indexes that leak too much"),
        ("gender:in=http://vs", "terminology service not available"),
        ("gender:not-in=http://vs", "terminology service not available"),
        ("gender:above=x", "terminology service not available"),
        ("gender:below=x", "terminology service not available"),
        ("_profile:contains=x", "n-gram"),
        ("general-practitioner:below=x", "not supported"),
        ("name:below=x", "unknown or unsupported modifier"),
        ("birthdate:exact=2020", "unknown or unsupported modifier"),
        ("gender:exact=x", "unknown or unsupported modifier"),
        ("name:=x", "empty modifier"),
        ("gender:of-type=a|b|c", ":of-type"),
        ("identifier:of-type=a|b", ":of-type"),
        ("name=", "empty value"),
        ("name=a,,b", "empty value"),
        ("gender=|", "empty token"),
        ("gender=a|b|c", "invalid token"),
        ("birthdate=", "empty value"),
    ],
)
def test_refusals_name_the_parameter_and_why(query: str, reason: str) -> None:
    name = query.split("=")[0].split(":")[0]
    exc = error("Patient", query.replace("abc", SECRET))
    text = message(exc)
    assert f"'{name}'" in text and reason in text
    assert exc.issues[0].expression == (name,)


# ---------------------------------------------------------------- chains and _has


def test_chains() -> None:
    crit = parse("Observation", "subject:Patient.name=peter").criteria[0]
    assert isinstance(crit, ChainCriterion)
    assert (crit.code, crit.target_type) == ("subject", "Patient")
    assert isinstance(crit.inner, Criterion) and crit.inner.param.resource_type == "Patient"
    implicit = parse("Observation", "patient.name=peter").criteria[0]
    assert isinstance(implicit, ChainCriterion) and implicit.target_type == "Patient"
    deep = parse("Observation", "patient.organization.name:exact=Acme").criteria[0]
    assert isinstance(deep, ChainCriterion) and isinstance(deep.inner, ChainCriterion)
    assert deep.inner.target_type == "Organization"
    assert isinstance(deep.inner.inner, Criterion) and deep.inner.inner.modifier == "exact"
    mid_type = parse("Encounter", "subject:Patient.general-practitioner:Practitioner.name=x")
    inner = mid_type.criteria[0]
    assert isinstance(inner, ChainCriterion) and isinstance(inner.inner, ChainCriterion)
    assert inner.inner.target_type == "Practitioner"


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("subject.name=x", "ambiguous"),
        ("subject:Nope.name=x", "resource type"),
        ("subject:Medication.code=x", "not a target type"),
        ("code.name=x", "only reference parameters"),
        ("subject._has:Observation:patient:code=x", "_has cannot"),
        ("patient.organization.partof.partof.partof.name=x", "limited"),
    ],
)
def test_bad_chains(query: str, needle: str) -> None:
    assert needle in message(error("Observation", query))


def test_unknown_chained_parameters_are_unknown() -> None:
    lenient = parse("Observation", "patient.nosuch=1", strict=False)
    assert lenient.unknown == ("patient.nosuch",)
    assert "Unknown" in message(error("Observation", "patient.nosuch=1"))


def test_has() -> None:
    crit = parse("Patient", "_has:Observation:patient:code=1234").criteria[0]
    assert isinstance(crit, HasCriterion)
    assert (crit.source_type, crit.code) == ("Observation", "patient")
    assert isinstance(crit.inner, Criterion) and crit.inner.values == (TokenValue(None, "1234"),)
    nested = parse("Patient", "_has:Observation:patient:_has:AuditEvent:entity:agent=x").criteria[0]
    assert isinstance(nested, HasCriterion) and isinstance(nested.inner, HasCriterion)
    chained = parse("Patient", "_has:Observation:patient:encounter.status=finished").criteria[0]
    assert isinstance(chained, HasCriterion) and isinstance(chained.inner, ChainCriterion)


@pytest.mark.parametrize(
    "query",
    [
        "_has:Observation:patient=1",
        "_has:Nope:patient:code=1",
        "_has:Observation:code:code=1",
        "_has:Observation:nosuch:code=1",
        "_has:Observation:device:code=1",
    ],
)
def test_bad_has(query: str) -> None:
    assert "_has" in message(error("Patient", query))


# ---------------------------------------------------------------- reference_criterion


def test_reference_criterion() -> None:
    param = search_params("Observation")["subject"]
    crit = reference_criterion("subject", param, ["Patient/1", "Group/2"])
    assert crit.values == (
        ReferenceValue("relative", type="Patient", id="1"),
        ReferenceValue("relative", type="Group", id="2"),
    )
    assert crit.query_terms() == [b"r|Patient/1", b"r|Group/2"]
    assert reference_criterion("subject", param, []).query_terms() == []
    with pytest.raises(ValueError):
        reference_criterion("subject", param, ["nope"])
    with pytest.raises(ValueError):
        reference_criterion("code", search_params("Observation")["code"], ["Patient/1"])


def test_id_criterion() -> None:
    crit = id_criterion("Patient", ["a", "b"])
    assert crit.code == "_id" and crit.query_terms() == [b"tc|a", b"tc|b"]
    assert id_criterion("Patient", []).query_terms() == []
    with pytest.raises(ValueError):
        id_criterion("Nope", ["a"])


def test_uri_and_other_values() -> None:
    assert one("ValueSet", "url=urn:oid:1.2").values == (UriValue("urn:oid:1.2"),)
