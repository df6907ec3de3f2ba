"""The one error family that crosses the layers and becomes a FHIR OperationOutcome.

An ``OperationOutcomeError`` carries an HTTP status, FHIR issue entries and
optional response headers. Its messages are shown to the client, so they must
never contain another caller's data; they may contain paths and parameter names
but the messages written by this package never echo submitted values (which can
be patient data that would otherwise reach logs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Issue:
    severity: str  # fatal | error | warning | information
    code: str  # FHIR IssueType code
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


@dataclass(eq=False)
class OperationOutcomeError(Exception):
    status: int
    issues: list[Issue]
    headers: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(i.diagnostics for i in self.issues)

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def _error(status: int, code: str, message: str, expression: str | None = None,
           headers: Mapping[str, str] | None = None) -> OperationOutcomeError:
    expr = (expression,) if expression else ()
    return OperationOutcomeError(status, [Issue("error", code, message, expr)], dict(headers or {}))


def bad_request(message: str, expression: str | None = None, code: str = "invalid") -> OperationOutcomeError:
    return _error(400, code, message, expression)


def unauthorized(message: str, error: str = "invalid_token") -> OperationOutcomeError:
    # RFC 6750 §3: tell the client which scheme and what went wrong, nothing more.
    header = f'Bearer realm="fhirvault", error="{error}"'
    return _error(401, "login", message, headers={"WWW-Authenticate": header})


def forbidden(message: str) -> OperationOutcomeError:
    return _error(403, "forbidden", message)


def not_found(message: str) -> OperationOutcomeError:
    return _error(404, "not-found", message)


def gone(message: str, headers: Mapping[str, str] | None = None) -> OperationOutcomeError:
    return _error(410, "deleted", message, headers=headers)


def conflict(message: str) -> OperationOutcomeError:
    return _error(409, "conflict", message)


def precondition_failed(message: str) -> OperationOutcomeError:
    return _error(412, "conflict", message)


def not_acceptable(message: str) -> OperationOutcomeError:
    return _error(406, "not-supported", message)


def unsupported_media_type(message: str) -> OperationOutcomeError:
    return _error(415, "not-supported", message)


def too_large(message: str) -> OperationOutcomeError:
    return _error(413, "too-costly", message)


def method_not_allowed(message: str) -> OperationOutcomeError:
    return _error(405, "not-supported", message)


def not_implemented(message: str) -> OperationOutcomeError:
    return _error(501, "not-supported", message)


def unprocessable(issues: list[Issue]) -> OperationOutcomeError:
    return OperationOutcomeError(422, issues)


def internal_error() -> OperationOutcomeError:
    return _error(500, "exception", "Internal server error; the incident was logged with the request id.")


def service_unavailable(message: str, retry_after: int | None = None) -> OperationOutcomeError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return _error(503, "transient", message, headers=headers)


def too_many_requests(message: str, retry_after: int) -> OperationOutcomeError:
    return _error(429, "throttled", message, headers={"Retry-After": str(retry_after)})
