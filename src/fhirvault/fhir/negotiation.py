"""Content negotiation: FHIR JSON and FHIR XML, in their usual spellings."""

from __future__ import annotations

from typing import Literal

from fhirvault.domain import errors

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
Format = Literal["json", "xml"]

_JSON_TYPES = {FHIR_JSON, JSON, "application/json+fhir", "text/json"}
_XML_TYPES = {FHIR_XML, "application/xml", "application/xml+fhir", "text/xml"}
_FORMAT_PARAM: dict[str, Format] = {**dict.fromkeys(_JSON_TYPES | {"json"}, "json"),
                                    **dict.fromkeys(_XML_TYPES | {"xml"}, "xml")}
_ANY = {"application/*", "*/*", "text/*"}


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, q) of an Accept header, q=0 ranges left out."""
    out = []
    for part in accept.split(","):
        media, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media.strip():
            out.append((media.strip().lower(), q))
    return out


def negotiate(accept: str | None, format_param: str | None) -> tuple[Format, str]:
    """(format, media type) to answer with; 406 when the client accepts neither JSON nor XML.

    ``_format`` wins over Accept. Among Accept's ranges the highest q wins, the first on a tie.
    """
    if format_param is not None:
        fmt = _FORMAT_PARAM.get(_media_type(format_param))
        if fmt is None:
            raise errors.not_acceptable("_format must be json or xml (or a FHIR JSON or XML media type).")
        return fmt, FHIR_JSON if fmt == "json" else FHIR_XML
    if not accept:
        return "json", FHIR_JSON
    best: tuple[Format, str] | None = None
    best_q = 0.0
    for media, q in _ranges(accept):
        choice: tuple[Format, str] | None = None
        if media in _XML_TYPES:
            choice = ("xml", FHIR_XML)
        elif media == JSON:
            choice = ("json", JSON)
        elif media in _JSON_TYPES or media in _ANY:
            choice = ("json", FHIR_JSON)
        if choice is not None and q > best_q:
            best, best_q = choice, q
    if best is None:
        raise errors.not_acceptable("Supported: application/fhir+json, application/json, application/fhir+xml, "
                                    "application/xml.")
    return best


def error_format(accept: str | None, format_param: str | None) -> Format:
    """The format of an error response: what was asked for, JSON when that cannot be told."""
    try:
        return negotiate(accept, format_param)[0]
    except errors.OperationOutcomeError:
        return "json"


def is_xml(content_type: str | None) -> bool:
    return content_type is not None and _media_type(content_type) in _XML_TYPES


def require_json_body(content_type: str | None) -> None:
    if content_type is None or _media_type(content_type) not in _JSON_TYPES:
        raise errors.unsupported_media_type(
            "Send the resource as application/fhir+json, application/json or application/fhir+xml.")


def require_patch_body(content_type: str | None) -> None:
    if content_type is None or _media_type(content_type) != JSON_PATCH:
        raise errors.unsupported_media_type(
            "PATCH accepts JSON Patch (application/json-patch+json); FHIRPath Patch is not supported."
        )
