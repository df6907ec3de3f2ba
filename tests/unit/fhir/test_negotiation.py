"""Content negotiation: _format over Accept, q-values, the two formats' media types."""

from __future__ import annotations

import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.fhir.negotiation import error_format, is_xml, negotiate, require_json_body

XML = ("xml", "application/fhir+xml")
JSON = ("json", "application/fhir+json")


@pytest.mark.parametrize(("accept", "fmt", "expected"), [
    (None, None, JSON),
    ("", None, JSON),
    ("*/*", None, JSON),
    ("application/json", None, ("json", "application/json")),
    ("application/fhir+xml", None, XML),
    ("application/xml", None, XML),
    ("text/xml; charset=utf-8", None, XML),
    ("text/html, application/xml;q=0.9, */*;q=0.8", None, XML),
    ("application/fhir+json;q=0.5, application/fhir+xml", None, XML),
    ("application/fhir+xml;q=0.4, application/fhir+json;q=0.6", None, JSON),
    ("application/fhir+xml;q=0, application/json", None, ("json", "application/json")),
    ("application/fhir+xml", "json", JSON),
    ("application/fhir+json", "xml", XML),
    (None, "application/fhir+xml", XML),
    (None, "text/xml", XML),
    (None, "application/json+fhir", JSON),
])
def test_negotiate(accept: str | None, fmt: str | None, expected: tuple[str, str]) -> None:
    assert negotiate(accept, fmt) == expected


@pytest.mark.parametrize(("accept", "fmt"), [("text/html", None), ("application/fhir+xml;q=0", None),
                                             (None, "turtle"), ("application/fhir+json", "html")])
def test_not_acceptable(accept: str | None, fmt: str | None) -> None:
    with pytest.raises(OperationOutcomeError) as info:
        negotiate(accept, fmt)
    assert info.value.status == 406
    assert error_format(accept, fmt) == "json"


def test_error_format_follows_the_request() -> None:
    assert error_format("application/fhir+xml", None) == "xml"
    assert error_format(None, "xml") == "xml"
    assert error_format("application/fhir+xml", "json") == "json"


def test_body_types() -> None:
    assert is_xml("application/fhir+xml; charset=UTF-8") and is_xml("text/xml") and not is_xml("application/json")
    assert not is_xml(None)
    require_json_body("application/fhir+json")
    with pytest.raises(OperationOutcomeError) as info:
        require_json_body("application/fhir+xml")  # the router converts XML before this check
    assert info.value.status == 415
