"""Bulk Data kick-off parameters (fhir/bulk.py): what is accepted, refused, or ignored with a warning."""

from __future__ import annotations

import orjson
import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.fhir.bulk import parse_kick_off
from fhirvault.fhir.messages import FhirRequest
from fhirvault.services.repository import RequestContext


def _req(query: list[tuple[str, str]] | None = None, prefer: str = "respond-async", *, method: str = "GET",
         body: object = None) -> FhirRequest:
    headers = {"prefer": prefer}
    raw = b""
    if body is not None:
        headers["content-type"] = "application/fhir+json"
        raw = orjson.dumps(body)
    return FhirRequest(method, ["Patient", "$export"], query or [], headers, raw, RequestContext(None, "r"),
                       "http://x/fhir")


def test_typical_kick_off() -> None:
    # smart-fetch's default filter: the commas inside one query are double-encoded, so once decoded
    # they are %2C and the query is not split there
    r = parse_kick_off(_req([("_type", "Observation,Patient"), ("_since", "2026-01-01T00:00:00Z"),
                             ("_typeFilter", "Observation?category=vital-signs%2Claboratory,Patient?gender=female"),
                             ("_outputFormat", "application/fhir+ndjson")]), "patient", None)
    assert r.types == ("Observation", "Patient")
    assert r.since_ms == 1767225600000
    assert r.type_filters == (("Observation", (("category", "vital-signs,laboratory"),)),
                              ("Patient", (("gender", "female"),)))
    assert r.request_url.startswith("http://x/fhir/Patient/$export?_type=")


@pytest.mark.parametrize("query", [
    [("_outputFormat", "application/json")], [("_since", "last week")], [("_type", "Nope")],
    [("_typeFilter", "Observation")], [("_typeFilter", "Observation?")], [("_typeFilter", "Observation?bogus=1")],
    [("_typeFilter", "Observation?_include=Observation:subject")], [("_elements", "id")], [("whatever", "1")],
    [("_type", "Patient"), ("_typeFilter", "Observation?status=final")], [("patient", "Group/1")],
])
def test_refused(query: list[tuple[str, str]]) -> None:
    with pytest.raises(OperationOutcomeError) as exc:
        parse_kick_off(_req(query), "patient", None)
    assert exc.value.status == 400


def test_respond_async_is_required() -> None:
    with pytest.raises(OperationOutcomeError) as exc:
        parse_kick_off(_req([], prefer="return=minimal"), "system", None)
    assert exc.value.status == 400


def test_lenient_ignores_unsupported_with_warnings() -> None:
    r = parse_kick_off(_req([("_elements", "id"), ("_type", "Nope,Patient")], "respond-async; handling=lenient"),
                       "system", None)
    assert r.types == ("Patient",)
    assert len(r.warnings) == 2 and "_elements" in r.warnings[0]
    with pytest.raises(OperationOutcomeError):  # a malformed value is still an error
        parse_kick_off(_req([("_since", "x")], "respond-async, handling=lenient"), "system", None)


def test_post_parameters() -> None:
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
        {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"}]}
    r = parse_kick_off(_req(method="POST", body=body), "group", "g1")
    assert r.types == ("Observation",) and r.patients == ("p1", "p2") and r.group == "g1"
    for bad in ({"resourceType": "Bundle"}, {"resourceType": "Parameters", "parameter": [{"name": "_type"}]},
                {"resourceType": "Parameters", "parameter": 5}, {"resourceType": "Parameters", "parameter": [7]},
                {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueInteger": 1}]}):
        with pytest.raises(OperationOutcomeError) as exc:
            parse_kick_off(_req(method="POST", body=bad), "group", "g1")
        assert exc.value.status == 400
