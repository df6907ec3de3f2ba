"""Content negotiation: JSON only, in its two FHIR spellings."""

from __future__ import annotations

from fhirvault.domain import errors

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
_JSON_FORMATS = {"json", FHIR_JSON, JSON, "application/json+fhir"}
_ACCEPTABLE = {FHIR_JSON, JSON, "application/json+fhir", "application/*", "*/*"}


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def response_type(accept: str | None, format_param: str | None) -> str:
    """The media type to answer with, or 406 when the client accepts no JSON."""
    if format_param is not None:
        if _media_type(format_param) not in _JSON_FORMATS:
            raise errors.not_acceptable("Only JSON is supported (_format=json).")
        return FHIR_JSON
    if not accept:
        return FHIR_JSON
    types = [_media_type(part) for part in accept.split(",")]
    if FHIR_JSON in types or "application/json+fhir" in types:
        return FHIR_JSON
    if JSON in types:
        return JSON
    if any(t in _ACCEPTABLE for t in types):
        return FHIR_JSON
    raise errors.not_acceptable("Only application/fhir+json and application/json are supported.")


def require_json_body(content_type: str | None) -> None:
    if content_type is None or _media_type(content_type) not in {FHIR_JSON, JSON, "application/json+fhir"}:
        raise errors.unsupported_media_type("Send the resource as application/fhir+json or application/json.")


def require_patch_body(content_type: str | None) -> None:
    if content_type is None or _media_type(content_type) != JSON_PATCH:
        raise errors.unsupported_media_type(
            "PATCH accepts JSON Patch (application/json-patch+json); FHIRPath Patch is not supported."
        )
