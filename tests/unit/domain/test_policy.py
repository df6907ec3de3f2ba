"""domain/policy.py: the pure decision, and granular scopes (domain/scopes.py)."""

from __future__ import annotations

from typing import Any

import pytest

from fhirvault.domain.policy import (
    Consent,
    ConsentRule,
    PrincipalFacts,
    Relationship,
    ResourceFacts,
    decide,
    labels_of,
    reaches,
)
from fhirvault.domain.scopes import ResourceScope, ScopeError, narrow, parse_scope, parse_scopes

USER_ALL = tuple(parse_scopes("user/*.cruds"))
OBS: dict[str, Any] = {"resourceType": "Observation", "category": [{"coding": [{"code": "laboratory"}]}]}


def dr(**kw: Any) -> PrincipalFacts:
    return PrincipalFacts(role=kw.pop("role", "practitioner"), scopes=kw.pop("scopes", USER_ALL),
                          fhir_user="Practitioner/1", **kw)


def obs(patient: str = "p1", labels: frozenset[str] = frozenset()) -> ResourceFacts:
    return ResourceFacts("Observation", patient, labels, OBS)


CARE = Relationship("careteam")


def test_default_deny_without_relationship() -> None:
    d = decide(dr(), obs(), Relationship(), Consent(), "read")
    assert not d.allowed and d.reason == "no care relationship" and d.status == 404


def test_relationship_allows_and_says_why() -> None:
    d = decide(dr(), obs(), CARE, Consent(), "read")
    assert d.allowed and d.purpose_of_use == "TREAT" and "careteam" in d.reason


def test_break_glass_is_etreat_and_overrides_consent_not_labels() -> None:
    glass = Relationship(None, break_glass=True)
    opt_out = Consent((ConsentRule(),))
    d = decide(dr(), obs(), glass, opt_out, "read")
    assert d.allowed and d.purpose_of_use == "ETREAT"
    assert not decide(dr(), obs(labels=frozenset({"R"})), glass, Consent(), "read").allowed
    assert decide(dr(), obs(), CARE, opt_out, "read").reason == "consent: opt-out"


@pytest.mark.parametrize(("rule", "allowed"), [
    (ConsentRule(actors=frozenset({"Practitioner/1"})), False),
    (ConsentRule(actors=frozenset({"Practitioner/2"})), True),
    (ConsentRule(actors=frozenset({"Organization/o1"})), False),
    (ConsentRule(classes=frozenset({"Observation"})), False),
    (ConsentRule(classes=frozenset({"Condition"})), True),
    (ConsentRule(codes=frozenset({"laboratory"})), False),
    (ConsentRule(codes=frozenset({"vital-signs"})), True),
    (ConsentRule(labels=frozenset({"R"})), True),  # the resource carries no R label
])
def test_consent_provisions(rule: ConsentRule, allowed: bool) -> None:
    assert decide(dr(organization="o1"), obs(), CARE, Consent((rule,)), "read").allowed is allowed


def test_labels_need_clearance() -> None:
    r = frozenset({"R"})
    v = frozenset({"V"})
    assert decide(dr(), obs(labels=r), CARE, Consent(), "read").reason == "restricted label needs clearance R"
    d = decide(dr(clearances=frozenset({"R"})), obs(labels=r), CARE, Consent(), "read")
    assert d.allowed and d.restricted
    assert not decide(dr(clearances=frozenset({"R"})), obs(labels=v), CARE, Consent(), "read").allowed
    assert decide(dr(clearances=frozenset({"V"})), obs(labels=r), CARE, Consent(), "read").allowed


@pytest.mark.parametrize(("role", "rtype", "interaction", "allowed"), [
    ("nurse", "Observation", "delete", False),
    ("nurse", "Observation", "update", True),
    ("admin_staff", "Patient", "read", True),
    ("admin_staff", "Observation", "read", False),
    ("admin_staff", "Coverage", "create", True),
    ("platform_admin", "Patient", "read", False),
    ("auditor", "Observation", "search", False),
    ("security_officer", "Patient", "read", False),
])
def test_role_table(role: str, rtype: str, interaction: str, allowed: bool) -> None:
    res = ResourceFacts(rtype, "p1", frozenset(), {"resourceType": rtype})
    assert decide(dr(role=role), res, CARE, Consent(), interaction).allowed is allowed


def test_type_level_refusals_are_403() -> None:
    d = decide(dr(role="admin_staff"), ResourceFacts("Observation"), Relationship(), Consent(), "search")
    assert d.status == 403
    d = decide(dr(scopes=tuple(parse_scopes("user/Patient.rs"))), ResourceFacts("Observation"), CARE, Consent(),
               "search")
    assert d.status == 403 and d.reason.startswith("scope")


def test_patient_role_reads_own_compartment_only() -> None:
    me = PrincipalFacts(role="patient", scopes=tuple(parse_scopes("patient/*.rs")), fhir_user="Patient/p1",
                        patient="p1")
    assert decide(me, obs("p1"), Relationship(), Consent(), "read").allowed
    assert decide(me, obs("p1", frozenset({"R"})), Relationship(), Consent(), "read").allowed
    assert not decide(me, obs("p1", frozenset({"V"})), Relationship(), Consent(), "read").allowed
    assert decide(me, obs("p2"), Relationship(), Consent(), "read").status == 404
    assert not decide(me, obs("p1"), Relationship(), Consent(), "update").allowed  # the scope is rs


def test_system_clients_keep_scope_only_behaviour() -> None:
    backend = PrincipalFacts(role=None, scopes=tuple(parse_scopes("system/Observation.rs")))
    assert decide(backend, obs(labels=frozenset({"V"})), Relationship(), Consent((ConsentRule(),)), "read").allowed
    assert not decide(backend, ResourceFacts("Patient"), Relationship(), Consent(), "read").allowed


def test_granular_scope_is_a_filter() -> None:
    scope = parse_scope("user/Observation.rs?category=laboratory")
    assert scope == ResourceScope("user", "Observation", frozenset("rs"), (("category", "laboratory"),))
    assert str(scope) == "user/Observation.rs?category=laboratory"
    p = dr(scopes=(scope,))

    def match(rtype: str, query: tuple[tuple[str, str], ...], resource: Any) -> bool:
        return dict(query)["category"] == resource["category"][0]["coding"][0]["code"]

    assert decide(p, obs(), CARE, Consent(), "read", match).allowed
    vital = ResourceFacts("Observation", "p1", frozenset(), {"category": [{"coding": [{"code": "vital-signs"}]}]})
    assert decide(p, vital, CARE, Consent(), "read", match).status == 404
    assert decide(p, ResourceFacts("Observation"), CARE, Consent(), "search").allowed  # type-level: maybe


@pytest.mark.parametrize("bad", ["user/*.rs?category=x", "user/Observation.rs?_id=1", "user/Observation.rs?"])
def test_bad_granular_scopes(bad: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(bad)


def test_narrow_keeps_the_query() -> None:
    requested = parse_scopes("user/Observation.rs?category=laboratory")
    allowed = parse_scopes("user/*.cruds")
    assert narrow(requested, allowed) == requested
    assert narrow(parse_scopes("user/Observation.rs"), requested) == requested


def test_labels_of() -> None:
    sys = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    assert labels_of({"meta": {"security": [{"system": sys, "code": "R"}, {"system": "x", "code": "V"},
                                            {"system": sys, "code": "N"}]}}) == {"R"}
    assert labels_of({"meta": "junk"}) == frozenset()


@pytest.mark.parametrize("role", ["practitioner", "nurse", "patient"])
def test_directory_is_read_only_for_users_who_do_not_administer_it(role: str) -> None:
    p = dr(role=role, scopes=tuple(parse_scopes("user/*.cruds patient/*.cruds")))
    role_b = {"resourceType": "PractitionerRole", "practitioner": {"reference": "Practitioner/1"}}
    for interaction in ("create", "update", "patch", "delete"):
        d = decide(p, ResourceFacts("PractitionerRole", None, frozenset(), role_b), Relationship(), Consent(),
                   interaction)
        assert not d.allowed and d.status == 403
        assert "directory" in d.reason or (role, interaction) == ("nurse", "delete")  # nurses never delete
    assert decide(p, ResourceFacts("PractitionerRole", None, frozenset(), role_b), Relationship(), Consent(),
                  "read").allowed


def test_directory_administrators() -> None:
    clerk = dr(role="admin_staff")
    admin = dr(role="platform_admin")
    for rtype in ("Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService"):
        res = ResourceFacts(rtype, None, frozenset(), {"resourceType": rtype})
        for interaction in ("create", "update", "read"):
            assert decide(clerk, res, Relationship(), Consent(), interaction).allowed
        for interaction in ("create", "update", "delete", "read", "search"):
            assert decide(admin, res, Relationship(), Consent(), interaction).allowed
    # platform admins still reach nothing else
    assert not decide(admin, obs(), CARE, Consent(), "read").allowed
    assert not decide(admin, ResourceFacts("Patient", "p1", frozenset(), {"resourceType": "Patient"}),
                      CARE, Consent(), "read").allowed


def test_reaches_a_referenced_compartment() -> None:
    assert reaches(dr(), "p1", CARE, Consent()).allowed
    refused = reaches(dr(), "p2", Relationship(), Consent())
    assert not refused.allowed and refused.status == 404
    assert reaches(dr(), "p2", Relationship(None, break_glass=True), Consent((ConsentRule(),))).allowed
    assert not reaches(dr(), "p1", CARE, Consent((ConsentRule(),))).allowed  # opt-out
    assert reaches(dr(role="admin_staff"), "p9", Relationship(), Consent()).allowed
    me = PrincipalFacts(role="patient", scopes=(), fhir_user="Patient/p1")
    assert reaches(me, "p1", Relationship(), Consent()).allowed and not reaches(me, "p2", Relationship(),
                                                                                 Consent()).allowed
    assert reaches(PrincipalFacts(role=None, scopes=()), "p7", Relationship(), Consent()).allowed
