from __future__ import annotations

import pytest

from fhirvault.domain.scopes import Grants, ScopeError, narrow, parse_scope, parse_scopes


def test_v2_and_v1_scopes() -> None:
    s = parse_scope("system/Patient.rs")
    assert s is not None and s.permissions == {"r", "s"}
    assert str(parse_scope("system/*.read")) == "system/*.rs"
    assert str(parse_scope("system/*.write")) == "system/*.cud"
    assert parse_scope("openid") is None


@pytest.mark.parametrize("bad", ["system/Patient.sr", "system/Patient.x", "system/patient.rs", "system/Patient.rr"])
def test_malformed_or_unsupported(bad: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(bad)


def test_grants_and_narrowing() -> None:
    g = Grants(tuple(parse_scopes("system/Patient.rs system/Observation.c")))
    assert g.allows("Patient", "r") and not g.allows("Patient", "c") and g.allows("Observation", "c")
    assert g.types_with("s", frozenset({"Patient", "Observation"})) == {"Patient"}
    assert Grants(tuple(parse_scopes("system/*.s"))).types_with("s", frozenset({"A"})) is None
    allowed = parse_scopes("system/Patient.rs")
    assert [str(s) for s in narrow(parse_scopes("system/*.cruds"), allowed)] == ["system/Patient.rs"]
    assert narrow(parse_scopes("system/Observation.r"), allowed) == []
