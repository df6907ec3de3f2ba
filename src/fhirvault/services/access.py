"""The facts behind one caller's access decisions, gathered once per request.

``AccessGuard`` (one per repository) builds an ``Access`` for a principal; the
``Access`` feeds ``domain.policy.decide`` with the relationship, break-the-glass
and consent facts, caching them for the request, and serves as the search
engine's ``Visibility``: a cheap check on the data key's compartment before a
candidate is decrypted, then the full decision on its content.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from fhirvault.domain.policy import (
    CLINICAL_ROLES,
    NO_CONSENT,
    NO_RELATIONSHIP,
    PATIENT,
    Consent,
    Decision,
    PrincipalFacts,
    Relationship,
    ResourceFacts,
    decide,
    labels_of,
    reaches,
)
from fhirvault.domain.search.match import matches
from fhirvault.domain.search.query import Criterion, SearchError, parse_search
from fhirvault.ports import StoredVersion
from fhirvault.services.auth import Principal
from fhirvault.services.break_glass import BreakGlass
from fhirvault.services.relationships import Reach, Relationships

_CANONICAL = {"r": "read", "s": "search", "c": "create", "u": "update", "d": "delete"}


@lru_cache(maxsize=1024)
def _scope_criteria(rtype: str, query: tuple[tuple[str, str], ...]) -> tuple[Criterion, ...] | None:
    """A granular scope's query, parsed once; None if it cannot be evaluated (then it grants nothing)."""
    try:
        parsed = parse_search(rtype, list(query), strict=True)
    except SearchError:
        return None
    if not parsed.criteria or not all(isinstance(c, Criterion) for c in parsed.criteria):
        return None  # chains and _has in a scope are not supported
    return tuple(c for c in parsed.criteria if isinstance(c, Criterion))


def _query_match(rtype: str, query: tuple[tuple[str, str], ...], resource: Mapping[str, Any]) -> bool:
    """A granular scope's query (``category=…``) against one resource, with the search matcher."""
    criteria = _scope_criteria(rtype, query)
    return criteria is not None and all(matches(c, rtype, resource) for c in criteria)


class AccessGuard:
    def __init__(self, tenant: str, relationships: Relationships, break_glass: BreakGlass,
                 patient_of_key: Callable[[str], str | None]) -> None:
        self.tenant = tenant
        self.relationships = relationships
        self.break_glass = break_glass
        self.patient_of_key = patient_of_key

    def for_principal(self, principal: Principal | None, interaction: str) -> Access:
        return Access(self, principal, interaction)


class Access:
    """One caller, one kind of interaction (read for reads, search for searches)."""

    def __init__(self, guard: AccessGuard, principal: Principal | None, interaction: str) -> None:
        self._g = guard
        self.principal = principal
        self.interaction = interaction
        p = principal
        self.facts = PrincipalFacts(
            role=p.role if p is not None else None, scopes=p.grants.scopes if p is not None else (),
            fhir_user=p.fhir_user if p else None, patient=p.patient if p else None,
            organization=p.organization if p else None, clearances=p.clearances if p else frozenset())
        self.valid = p is not None and p.tenant == guard.tenant
        self._patients: Mapping[str, str] | None = None
        self._glass: frozenset[str] | None = None
        self._consents: dict[str, Consent] = {}
        # What the allowed resources were reached through: the audit record carries it.
        self.purposes: set[str] = set()
        self.restricted = False
        self.withheld = 0
        self._simple = self.valid and self.facts.role is None and not any(s.query for s in self.facts.scopes)

    @property
    def simple(self) -> bool:
        """A backend service with plain system scopes: the type-level decision is the whole decision."""
        return self._simple

    @property
    def clinical(self) -> bool:
        return self.facts.role in CLINICAL_ROLES

    # -- facts ---------------------------------------------------------------------
    def patients(self) -> Mapping[str, str]:
        if self._patients is None:
            self._patients = self._g.relationships.patients_of(self.facts.fhir_user, self.facts.organization) \
                if self.clinical else {}
        return self._patients

    def glass(self) -> frozenset[str]:
        if self._glass is None:
            p = self.principal
            self._glass = self._g.break_glass.active_patients(p.user) if self.clinical and p and p.user \
                else frozenset()
        return self._glass

    def reach(self) -> Reach:
        """The user's patients and the references that stand for them (empty for non-clinical roles)."""
        if not self.clinical:
            return Reach({})
        return self._g.relationships.reach_of(self.facts.fhir_user, self.facts.organization)

    def reaches(self, patient: str) -> Decision:
        """May a write of this caller refer into ``patient``'s compartment (domain.policy.reaches)?"""
        if not self.valid:
            return Decision(False, "token of another tenant or none")
        return reaches(self.facts, patient, self.relationship(patient), self.consent(patient))

    def relationship(self, patient: str | None) -> Relationship:
        if patient is None or not self.clinical:
            return NO_RELATIONSHIP
        return Relationship(self.patients().get(patient), patient in self.glass())

    def consent(self, patient: str | None) -> Consent:
        if patient is None or self.facts.role is None or self.facts.role == PATIENT:
            return NO_CONSENT
        found = self._consents.get(patient)
        if found is None:
            found = self._consents[patient] = self._g.relationships.consent_for(patient)
        return found

    # -- decisions -----------------------------------------------------------------
    def type_level(self, rtype: str, permission: str | None = None) -> Decision:
        interaction = _CANONICAL[permission] if permission else self.interaction
        if not self.valid:
            return Decision(False, "token of another tenant or none")
        return decide(self.facts, ResourceFacts(rtype), NO_RELATIONSHIP, NO_CONSENT, interaction)

    def resource(self, rtype: str, resource: Mapping[str, Any], patient: str | None, *,
                 permission: str | None = None, new: bool = False) -> Decision:
        """The decision on one resource whose compartment is ``patient``."""
        interaction = _CANONICAL[permission] if permission else self.interaction
        if not self.valid:
            return Decision(False, "token of another tenant or none")
        facts = ResourceFacts(rtype, patient, labels_of(resource), resource, new)
        d = decide(self.facts, facts, self.relationship(patient), self.consent(patient), interaction, _query_match)
        if d.allowed:
            if d.purpose_of_use:
                self.purposes.add(d.purpose_of_use)
            self.restricted = self.restricted or d.restricted
        return d

    def version(self, v: StoredVersion, resource: Mapping[str, Any], permission: str | None = None) -> Decision:
        return self.resource(v.type, resource, self._g.patient_of_key(v.key_id), permission=permission)

    # -- search visibility (services/search.py Visibility) ---------------------------
    def before(self, v: StoredVersion) -> bool:
        if self._simple:
            return True
        if self.facts.role == PATIENT:  # only the own compartment, or shared data
            patient = self._g.patient_of_key(v.key_id)
            return patient is None or patient == self.facts.own_patient
        if not self.clinical:
            return True
        patient = self._g.patient_of_key(v.key_id)
        return patient is None or patient in self.patients() or patient in self.glass()

    def after(self, rtype: str, resource: dict[str, Any], v: StoredVersion) -> bool:
        if self._simple:
            return True
        if self.version(v, resource).allowed:
            return True
        self.withheld += 1
        return False

    def purpose(self) -> str | None:
        """ETREAT wins: an access that used a break-the-glass grant is recorded as such."""
        if "ETREAT" in self.purposes:
            return "ETREAT"
        return next(iter(sorted(self.purposes)), None)
