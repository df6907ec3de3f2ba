"""Access decisions: one pure function, default deny (see docs/access-control.md).

``decide`` combines, in this order: the token's SMART scopes, the user's role,
the care relationship (or a break-the-glass grant), the patient's consent and
the resource's confidentiality labels. The caller (services/repository.py)
gathers the facts; nothing here performs I/O, so the whole policy is testable
as a table.

A refusal says whether the caller may learn that the resource exists:
``hidden`` refusals (another patient's compartment, no care relationship,
consent, labels) answer 404 like a missing resource; refusals of a whole type
or interaction (scope or role never allows it) answer 403.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fhirvault.domain.scopes import ResourceScope

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
RESTRICTED_CODES = frozenset({"R", "V"})
ETREAT = "ETREAT"

# interaction -> SMART v2 permission letter
PERMISSION = {
    "read": "r", "vread": "r", "history-instance": "r", "operation": "r",
    "search": "s", "history-type": "s", "history-system": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
}

# Roles (services/identity_types.py spells the same strings; the domain may not import services).
PRACTITIONER, NURSE, ADMIN_STAFF, PATIENT = "practitioner", "nurse", "admin_staff", "patient"
AUDITOR, SECURITY_OFFICER, PLATFORM_ADMIN = "auditor", "security_officer", "platform_admin"
OPERATOR, DPO = "operator", "dpo"  # console roles (web/console)
CLINICAL_ROLES = frozenset({PRACTITIONER, NURSE})

# Administrative staff (admissions, scheduling, billing) see who the patient is and how the stay is
# organised, never clinical content.
ADMIN_TYPES = frozenset({
    "Patient", "RelatedPerson", "Person", "Encounter", "EpisodeOfCare", "Appointment", "AppointmentResponse",
    "Schedule", "Slot", "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "Account",
    "ChargeItem", "Claim", "ClaimResponse", "Invoice", "PaymentNotice", "PaymentReconciliation",
    "ExplanationOfBenefit", "Organization", "Location", "Practitioner", "PractitionerRole", "HealthcareService",
    "Endpoint",
})
# Which SMART permissions each role may ever exercise on FHIR data (the token's scopes narrow further).
ROLE_PERMISSIONS: Mapping[str, str] = {
    PRACTITIONER: "cruds",
    NURSE: "crus",  # nurses do not delete records
    ADMIN_STAFF: "crus",
    PATIENT: "cruds",  # own compartment only, and only what patient/ scopes grant (read-only by default)
}
# Never FHIR data through the repository (the audit trail has its own reader); platform admins only
# the directory (below).
NO_DATA_ROLES = frozenset({AUDITOR, SECURITY_OFFICER, PLATFORM_ADMIN, OPERATOR, DPO})
AUDIT_ROLES = frozenset({AUDITOR, SECURITY_OFFICER})
# The directory: who works where, in which role. PractitionerRole.practitioner decides whose CareTeam,
# Encounter and general-practitioner links a user inherits, so writing the directory is handing out
# care relationships: only the roles that administer it write it (backend services by their system/
# scopes, the integration path). Everyone else reads it.
DIRECTORY_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService"})
DIRECTORY_ADMIN_ROLES = frozenset({PLATFORM_ADMIN, ADMIN_STAFF})

# Audit details that the detection rules (services/detection.py) watch for: every committed write of a
# relationship field, a write in which the user named themselves, and the refusals of such writes.
RELATIONSHIP_CHANGE = "relationship change"
SELF_ASSIGNED = "the writer added themselves to the patient's care"
DIRECTORY_REFUSED = "may not write directory resources"
REFERENCE_REFUSED = "no care relationship with a referenced patient"
GAIN_REFUSED = "the write would give the writer a care relationship it did not have"


@dataclass(frozen=True, slots=True)
class PrincipalFacts:
    role: str | None  # None: a backend service (client credentials, system/ scopes)
    scopes: tuple[ResourceScope, ...]
    fhir_user: str | None = None  # Practitioner/x, Patient/y…
    patient: str | None = None  # SMART launch context: the id patient/ scopes are bound to
    organization: str | None = None  # Organization id
    clearances: frozenset[str] = frozenset()

    @property
    def own_patient(self) -> str | None:
        """A patient user's own Patient id."""
        if self.role == PATIENT and self.fhir_user and self.fhir_user.startswith("Patient/"):
            return self.fhir_user[len("Patient/"):]
        return None


@dataclass(frozen=True, slots=True)
class ResourceFacts:
    type: str
    patient: str | None = None  # the patient compartment it is filed under (None: not a patient's data)
    labels: frozenset[str] = frozenset()  # v3-Confidentiality codes in meta.security
    resource: Mapping[str, Any] | None = None  # the content; None for a type-level check (before a search)
    new: bool = False  # being created: nothing about it exists yet


@dataclass(frozen=True, slots=True)
class Relationship:
    kind: str | None = None  # careteam | encounter | gp | episode; None: none
    break_glass: bool = False  # an active emergency grant of this user for this patient


@dataclass(frozen=True, slots=True)
class ConsentRule:
    """One deny provision of an active Consent; an empty set means 'any'."""

    actors: frozenset[str] = frozenset()  # Practitioner/x, Organization/y, PractitionerRole/z
    classes: frozenset[str] = frozenset()  # resource types
    labels: frozenset[str] = frozenset()  # security label codes
    codes: frozenset[str] = frozenset()  # category/code codes ("system|code" and bare "code")

    @property
    def opt_out(self) -> bool:
        return not (self.actors or self.classes or self.labels or self.codes)


@dataclass(frozen=True, slots=True)
class Consent:
    rules: tuple[ConsentRule, ...] = ()


NO_CONSENT = Consent()
NO_RELATIONSHIP = Relationship()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    purpose_of_use: str | None = None
    hidden: bool = False  # refused as if the resource did not exist (404), not 403
    restricted: bool = False  # the resource carries an R/V label (the audit record says so)

    @property
    def status(self) -> int:
        return 200 if self.allowed else (404 if self.hidden else 403)


# A granular scope's query, checked against a resource (the search matcher, bound by the caller).
QueryMatch = Callable[[str, tuple[tuple[str, str], ...], Mapping[str, Any]], bool]


def labels_of(resource: Mapping[str, Any]) -> frozenset[str]:
    meta = resource.get("meta")
    security = meta.get("security") if isinstance(meta, dict) else None
    if not isinstance(security, list):
        return frozenset()
    return frozenset(str(c["code"]) for c in security if isinstance(c, dict)
                     and c.get("system") == CONFIDENTIALITY and c.get("code") in RESTRICTED_CODES)


def _deny(reason: str, *, hidden: bool = False, restricted: bool = False) -> Decision:
    return Decision(False, reason, hidden=hidden, restricted=restricted)


def _scope_allows(scopes: tuple[ResourceScope, ...], contexts: frozenset[str], res: ResourceFacts, perm: str,
                  launch_patient: str | None, query_match: QueryMatch | None) -> bool:
    for s in scopes:
        if s.context not in contexts or perm not in s.permissions or s.resource_type not in ("*", res.type):
            continue
        if s.context == "patient" and res.resource is not None and res.patient is not None \
                and res.patient != launch_patient:
            continue  # patient/ scopes reach the launch patient's compartment only
        if s.query and res.resource is not None and (
                query_match is None or not query_match(res.type, s.query, res.resource)):
            continue
        return True
    return False


def _codes_of(resource: Mapping[str, Any]) -> set[str]:
    """category and code codings, as 'system|code' and 'code'."""
    out: set[str] = set()
    for key in ("category", "code", "class", "type"):
        value = resource.get(key)
        for concept in value if isinstance(value, list) else [value]:
            codings = concept.get("coding") if isinstance(concept, dict) else None
            for c in codings if isinstance(codings, list) else ():
                if isinstance(c, dict) and isinstance(c.get("code"), str):
                    out.add(c["code"])
                    if isinstance(c.get("system"), str):
                        out.add(f"{c['system']}|{c['code']}")
    return out


def _consent_denies(consent: Consent, p: PrincipalFacts, res: ResourceFacts) -> str | None:
    actors = {a for a in (p.fhir_user, f"Organization/{p.organization}" if p.organization else None) if a}
    codes: set[str] | None = None
    for rule in consent.rules:
        if rule.opt_out:
            return "consent: opt-out"
        if rule.actors and not (rule.actors & actors):
            continue
        if rule.classes and res.type not in rule.classes:
            continue
        if rule.labels and not (rule.labels & res.labels):
            continue
        if rule.codes:
            if res.resource is None:
                continue  # type-level: the resource's codes are not known yet
            codes = _codes_of(res.resource) if codes is None else codes
            if not (rule.codes & codes):
                continue
        return "consent: restriction" + (" by actor" if rule.actors else "")
    return None


def _cleared(labels: frozenset[str], clearances: frozenset[str]) -> str | None:
    if "V" in labels and "V" not in clearances:
        return "very restricted label needs clearance V"
    if "R" in labels and not (clearances & RESTRICTED_CODES):
        return "restricted label needs clearance R"
    return None


def decide(p: PrincipalFacts, res: ResourceFacts, rel: Relationship, consent: Consent, interaction: str,
           query_match: QueryMatch | None = None) -> Decision:
    """Whether ``p`` may perform ``interaction`` on the resource described by ``res``.

    With ``res.resource`` None the question is type-level ("may this caller ever search
    Observations?"); each resource is then decided again before it is returned.
    """
    perm = PERMISSION.get(interaction)
    if perm is None:
        return _deny(f"unknown interaction {interaction}")
    restricted = bool(res.labels)
    # Backend services (client credentials): system/ scopes, unchanged.
    if p.role is None:
        if _scope_allows(p.scopes, frozenset({"system"}), res, perm, None, query_match):
            return Decision(True, "system scope", restricted=restricted)
        hidden = res.resource is not None and _scope_allows(p.scopes, frozenset({"system"}),
                                                            ResourceFacts(res.type), perm, None, None)
        return _deny(f"scope does not allow '{perm}' on {res.type}", hidden=hidden, restricted=restricted)
    if p.role == PLATFORM_ADMIN and res.type in DIRECTORY_TYPES:
        # Directory administration: shared data only, never a patient's compartment.
        if not _scope_allows(p.scopes, frozenset({"user"}), ResourceFacts(res.type), perm, None, None):
            return _deny(f"scope does not allow '{perm}' on {res.type}", restricted=restricted)
        return Decision(True, "directory administration", restricted=restricted) if not restricted \
            else _label_decision(p, res, None, "directory administration")
    if p.role in NO_DATA_ROLES:
        return _deny(f"role {p.role} may not access clinical or administrative records", restricted=restricted)
    allowed_perms = ROLE_PERMISSIONS.get(p.role)
    if allowed_perms is None:
        return _deny("unknown role", restricted=restricted)
    if perm not in allowed_perms or (p.role == ADMIN_STAFF and res.type not in ADMIN_TYPES):
        return _deny(f"role {p.role} may not '{perm}' {res.type}", restricted=restricted)
    if perm in "cud" and res.type in DIRECTORY_TYPES and p.role not in DIRECTORY_ADMIN_ROLES:
        return _deny(f"role {p.role} {DIRECTORY_REFUSED}", restricted=restricted)
    if res.type == "AuditEvent":
        return _deny("the audit trail is read through the audit roles", restricted=restricted)
    # The token's scopes: user/ (what the user may see) and patient/ (bound to the launch patient).
    if not _scope_allows(p.scopes, frozenset({"user", "patient"}), ResourceFacts(res.type), perm, None, None):
        return _deny(f"scope does not allow '{perm}' on {res.type}", restricted=restricted)
    if res.resource is None:
        return Decision(True, "type-level", restricted=restricted)
    if not _scope_allows(p.scopes, frozenset({"user", "patient"}), res, perm, p.patient, query_match):
        return _deny("outside the token's patient or granular scope", hidden=True, restricted=restricted)
    if res.patient is None:
        # Not a patient's data (Practitioner, Organization, Medication…): role and scopes suffice.
        return Decision(True, f"{p.role}: shared data", restricted=restricted) if not restricted \
            else _label_decision(p, res, None)
    if p.role == PATIENT:
        if res.patient != p.own_patient:
            return _deny("another patient's record", hidden=True, restricted=restricted)
        # A patient sees their own restricted (R) data; very restricted (V) still needs clearance.
        if "V" in res.labels and "V" not in p.clearances:
            return _deny("very restricted label needs clearance V", hidden=True, restricted=True)
        return Decision(True, "own record", restricted=restricted)
    purpose: str | None = None
    if res.new and res.type == "Patient":
        reason = "registering a new patient"
    elif p.role == ADMIN_STAFF:
        reason = "administrative record"
    elif rel.kind is not None:
        reason = f"care relationship: {rel.kind}"
        purpose = "TREAT"
    elif rel.break_glass:
        reason, purpose = "break-the-glass", ETREAT
    else:
        return _deny("no care relationship", hidden=True, restricted=restricted)
    if purpose != ETREAT:
        denied = _consent_denies(consent, p, res)
        if denied is not None:
            return _deny(denied, hidden=True, restricted=restricted)
    if restricted:
        return _label_decision(p, res, purpose, reason)
    return Decision(True, reason, purpose)


def _label_decision(p: PrincipalFacts, res: ResourceFacts, purpose: str | None,
                    reason: str = "shared data") -> Decision:
    refused = _cleared(res.labels, p.clearances)
    if refused is not None:
        return _deny(refused, hidden=True, restricted=True)
    return Decision(True, reason + " (cleared for restricted data)", purpose, restricted=True)


def reaches(p: PrincipalFacts, patient: str, rel: Relationship, consent: Consent) -> Decision:
    """Whether a write of ``p`` may refer into ``patient``'s compartment (Observation.performer,
    Patient.link…): the user must see that patient, as a read of the Patient would need.

    Scopes are not asked (the written resource's own type was decided by ``decide``), nor labels (a
    reference does not disclose the labelled content)."""
    if p.role is None:
        return Decision(True, "system scope")
    if p.role == PATIENT:
        return Decision(True, "own record") if patient == p.own_patient \
            else _deny("another patient's record", hidden=True)
    if p.role == ADMIN_STAFF:
        reason, purpose = "administrative record", None
    elif p.role in CLINICAL_ROLES and rel.kind is not None:
        reason, purpose = f"care relationship: {rel.kind}", "TREAT"
    elif p.role in CLINICAL_ROLES and rel.break_glass:
        return Decision(True, "break-the-glass", ETREAT)
    else:
        return _deny(REFERENCE_REFUSED, hidden=True)
    denied = _consent_denies(consent, p, ResourceFacts("Patient", patient))
    if denied is not None:
        return _deny(denied, hidden=True)
    return Decision(True, reason, purpose)
