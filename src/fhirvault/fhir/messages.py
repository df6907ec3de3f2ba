"""Transport-free request and response objects of the FHIR REST layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fhirvault.services.repository import RequestContext


@dataclass(slots=True)
class FhirRequest:
    method: str
    segments: list[str]  # the path below the FHIR base, split on '/'
    query: list[tuple[str, str]]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    ctx: RequestContext
    base_url: str  # e.g. http://127.0.0.1:8080/fhir

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def param(self, name: str) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class FhirResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
