"""Who may bulk-import: backend services with plain system write scopes, nobody else."""

from __future__ import annotations

from fhirvault.domain.errors import Issue
from fhirvault.domain.scopes import Grants, parse_scopes
from fhirvault.services.auth import Principal
from fhirvault.services.bulk_import import LineError, may_import


def _principal(scope: str, **extra: object) -> Principal:
    return Principal("c1", "default", scope, Grants(tuple(parse_scopes(scope))), 2**40, "t", **extra)  # type: ignore[arg-type]


def test_only_system_write_scopes_without_a_user() -> None:
    assert may_import(_principal("system/*.cruds"), "default", ["*"]) is None
    assert may_import(_principal("system/Patient.cu"), "default", ["Patient"]) is None
    assert may_import(_principal("system/Patient.cu"), "default", ["Observation"]) is not None
    assert may_import(_principal("system/Patient.cu"), "default", ["*"]) is not None
    assert may_import(_principal("system/*.rs"), "default", ["Patient"]) is not None
    assert may_import(_principal("system/*.c"), "default", ["Patient"]) is not None  # update too (PUT semantics)
    assert may_import(_principal("user/*.cruds", user="u-1", role="practitioner"), "default", ["Patient"]) is not None
    assert may_import(_principal("system/*.cruds", user="u-1", role="platform_admin"), "default", ["*"]) is not None
    assert may_import(_principal("system/Observation.cu?category=laboratory"), "default", ["Observation"]) is not None
    assert may_import(_principal("system/*.cruds"), "other-tenant", ["*"]) is not None
    assert may_import(None, "default", ["*"]) is not None


def test_line_errors_carry_the_line_number() -> None:
    outcome = LineError(12, (Issue("error", "invalid", "bad status", ("Observation.status",)),)).outcome()
    assert outcome["issue"][0]["location"] == ["Line[12]"]
    assert outcome["issue"][0]["diagnostics"].startswith("line 12: ")
    assert outcome["issue"][0]["expression"] == ["Observation.status"]

