"""Care relationships and consents, read from FHIR data with the search engine.

A practitioner reaches a patient's compartment only through a relationship recorded
in the data (docs/access-control.md lists the sources). The patient set of a
practitioner is computed with a handful of searches over the encrypted store and
cached for ``cache_seconds``; any committed write of a type that can change it
(CareTeam, Encounter, Patient, EpisodeOfCare, PractitionerRole, Consent) drops every
cached answer at once, so a new CareTeam membership or a withdrawn consent applies
to the next request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from fhirvault.domain.compartment import patient_id_from_reference
from fhirvault.domain.instants import instant
from fhirvault.domain.policy import Consent, ConsentRule
from fhirvault.domain.search.query import MAX_VALUES
from fhirvault.domain.search.values import parse_reference
from fhirvault.ports import Clock

# Writes of these types can change a relationship or a consent: they invalidate the caches.
WATCHED_TYPES = frozenset({"CareTeam", "Encounter", "Patient", "EpisodeOfCare", "PractitionerRole", "Consent"})
_LIMIT = 5_000  # resources read per source and practitioner (beyond: the oldest are ignored)
_DAY_MS = 86_400_000
_PRIVACY = "patient-privacy"

# (resource type, search parameters) -> resources; runs unfiltered, for the server's own use.
Finder = Callable[[str, list[tuple[str, str]]], list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class RelationshipSettings:
    """Which recorded relationships open a patient's compartment to a practitioner (config.py: ``access``)."""

    care_team: bool = True  # active CareTeam with the practitioner, their role or organisation as member
    encounter: bool = True  # Encounter with the practitioner as participant…
    encounter_statuses: frozenset[str] = frozenset({"planned", "arrived", "triaged", "in-progress", "onleave",
                                                    "finished"})
    encounter_days: int = 30  # …that ended at most this many days ago (or has not ended)
    general_practitioner: bool = True  # Patient.generalPractitioner
    episode_of_care: bool = True  # active EpisodeOfCare managed by the user's organisation
    cache_seconds: float = 30.0


def _ref(node: Any) -> str | None:
    if isinstance(node, dict) and isinstance(node.get("reference"), str):
        return str(node["reference"])
    return None


def _patient(node: Any) -> str | None:
    ref = _ref(node)
    return patient_id_from_reference(ref) if ref else None


@dataclass(frozen=True, slots=True)
class Reach:
    """What one user reaches: patient id -> relationship kind, and the references that are the user
    (their Practitioner and active PractitionerRoles)."""

    patients: Mapping[str, str]
    members: frozenset[str] = frozenset()


_NOBODY = Reach({})


@dataclass(frozen=True, slots=True)
class Change:
    """What a write of a watched resource may have changed, for targeted cache invalidation."""

    refs: frozenset[str] = frozenset()  # Practitioner/…, PractitionerRole/…, Organization/… named before or after
    consent_patients: frozenset[str] = frozenset()  # patients whose consent may have changed
    everything: bool = False


def _refs(nodes: Any, key: str | None = None) -> list[str]:
    out = []
    for node in nodes if isinstance(nodes, list) else []:
        target = node.get(key) if key and isinstance(node, dict) else node
        if (ref := _local(_ref(target))) is not None:
            out.append(ref)
    return out


def _facts(rtype: str, body: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], frozenset[str]]:
    """The fields of ``body`` the relationship sources read (a fingerprint), and the actors they name."""
    if body is None:
        return (), frozenset()
    if rtype == "CareTeam":
        refs = _refs(body.get("participant"), "member") + _refs([body.get("managingOrganization")])
        return (body.get("status"), _ref(body.get("subject")), sorted(refs)), frozenset(refs)
    if rtype == "Encounter":
        refs = _refs(body.get("participant"), "individual")
        period = body.get("period")
        end = period.get("end") if isinstance(period, dict) else None
        return (body.get("status"), _ref(body.get("subject")), sorted(refs), end), frozenset(refs)
    if rtype == "Patient":
        refs = _refs(body.get("generalPractitioner"))
        links = _refs(body.get("link"), "other")  # not a relationship, but it files data into a compartment
        return (body.get("active"), sorted(refs), sorted(links)), frozenset(refs + links)
    if rtype == "EpisodeOfCare":
        refs = _refs([body.get("managingOrganization")])
        others = _refs([body.get("careManager")]) + _refs(body.get("team"))
        return (body.get("status"), _ref(body.get("patient")), refs, sorted(others)), frozenset(refs + others)
    if rtype == "PractitionerRole":
        refs = _refs([body.get("practitioner")])
        org = _refs([body.get("organization")])
        return (body.get("active"), refs, org, body.get("id")), \
            frozenset(refs + org) | {f"PractitionerRole/{body.get('id')}"}
    return (orjson.dumps(body, option=orjson.OPT_SORT_KEYS),), frozenset()


def relationship_change(rtype: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> Change | None:
    """None when the write cannot change any relationship or consent (the common update)."""
    if rtype == "Consent":
        patients = {p for body in (old, new) if body is not None
                    if (p := _patient(body.get("patient"))) is not None}
        return Change(consent_patients=frozenset(patients), everything=not patients)
    if rtype not in WATCHED_TYPES:
        return None
    old_facts, old_refs = _facts(rtype, old)
    new_facts, new_refs = _facts(rtype, new)
    if old_facts == new_facts and old is not None and new is not None:
        return None
    if (new is None and not old_refs) or (old is None and not new_refs):
        return None  # created or deleted without naming anyone: no one's patients change
    return Change(refs=old_refs | new_refs)


def self_added(rtype: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
               members: frozenset[str]) -> bool:
    """Whether the write names one of ``members`` (the writer's Practitioner or PractitionerRoles) in a
    relationship field where the previous version did not."""
    if rtype not in WATCHED_TYPES or rtype == "Consent" or not members:
        return False
    return bool((_facts(rtype, new)[1] - _facts(rtype, old)[1]) & members)


def _local(ref: str | None) -> str | None:
    """'Type/id' for a local reference (also absolute ones to this server: the parser drops the base)."""
    item = parse_reference(ref) if ref else None
    return f"{item.type}/{item.id}" if item is not None and item.type and item.id else None


class Relationships:
    def __init__(self, find: Finder, clock: Clock, settings: RelationshipSettings | None = None) -> None:
        self._find = find
        self._clock = clock
        self.settings = settings or RelationshipSettings()
        self._lock = threading.Lock()
        self._generation = 0
        self._patients: dict[tuple[str, str | None], tuple[float, int, Reach]] = {}
        self._computing: dict[tuple[str, str | None], threading.Event] = {}
        # Patients that have any active Consent at all (most have none: their lookups skip the search).
        self._with_consent: tuple[float, int, frozenset[str] | None] | None = None
        self._consents: dict[str, tuple[float, int, Consent]] = {}
        self.lookups = 0  # relationship computations (cache misses), for tests and metrics

    def invalidate(self, change: Change | None = None) -> None:
        """A watched type was written: forget the answers it may have changed (all without ``change``)."""
        with self._lock:
            self._generation += 1  # a computation running now may have read the old data: not cached
            if change is None or change.everything or any(r.startswith("PractitionerRole/") for r in change.refs):
                self._patients.clear()  # a role links a practitioner we cannot tell from here
                if change is None or change.everything:
                    self._consents.clear()
            else:
                for key in [k for k in self._patients if k[0] in change.refs or
                            (k[1] is not None and f"Organization/{k[1]}" in change.refs)]:
                    del self._patients[key]
            if change is not None:
                for patient in change.consent_patients:
                    self._consents.pop(patient, None)
            if change is None or change.everything or change.consent_patients:
                self._with_consent = None

    # -- other processes sharing the database (services/coherence.py) ----------------
    @staticmethod
    def published_keys(change: Change) -> frozenset[str]:
        """``change`` as the keys other processes receive (``invalidate_keys`` reads them back)."""
        if change.everything:
            return frozenset({"*"})
        return frozenset({f"ref:{r}" for r in change.refs} | {f"patient:{p}" for p in change.consent_patients})

    def invalidate_keys(self, keys: frozenset[str] | None) -> None:
        if keys is None or "*" in keys:
            self.invalidate()
            return
        self.invalidate(Change(refs=frozenset(k[4:] for k in keys if k.startswith("ref:")),
                               consent_patients=frozenset(k[8:] for k in keys if k.startswith("patient:"))))

    # -- practitioners ------------------------------------------------------------
    def patients_of(self, fhir_user: str | None, organization: str | None) -> Mapping[str, str]:
        """patient id -> how the user reaches it (careteam, encounter, gp, episode)."""
        return self.reach_of(fhir_user, organization).patients

    def reach_of(self, fhir_user: str | None, organization: str | None) -> Reach:
        """The user's patients and the references that stand for the user (cached together)."""
        if not fhir_user and not organization:
            return _NOBODY
        key = (fhir_user or "", organization)
        while True:
            now = time.monotonic()
            with self._lock:
                hit = self._patients.get(key)
                if hit is not None and hit[0] > now:
                    return hit[2]
                running = self._computing.get(key)
                if running is None:
                    running = self._computing[key] = threading.Event()
                    generation = self._generation
                    break
            # Another request is computing this set: wait for it instead of repeating the searches.
            running.wait(timeout=30)
        try:
            found = self._compute(fhir_user, organization)
            with self._lock:
                if generation == self._generation:  # not invalidated while computing
                    if len(self._patients) > 10_000:
                        self._patients.clear()
                    self._patients[key] = (now + self.settings.cache_seconds, generation, found)
            return found
        finally:
            with self._lock:
                self._computing.pop(key, None)
            running.set()

    def _compute(self, fhir_user: str | None, organization: str | None) -> Reach:
        self.lookups += 1
        members: list[str] = []
        if fhir_user and fhir_user.startswith("Practitioner/"):
            members.append(fhir_user)
            members.extend(f"PractitionerRole/{r['id']}" for r in self._find(
                "PractitionerRole", [("practitioner", fhir_user)]) if r.get("active", True) is not False)
        return Reach(self._reached(members, organization), frozenset(members))

    def _reached(self, members: list[str], organization: str | None) -> dict[str, str]:
        """Patients reached by these member references (Practitioner/…, PractitionerRole/…) and organisation."""
        s = self.settings
        out: dict[str, str] = {}
        orgs = [f"Organization/{organization}"] if organization else []
        if s.care_team and (members or orgs):
            for team in self._find_any("CareTeam", "participant", members + orgs, [("status", "active")]):
                if (pid := _patient(team.get("subject"))) is not None:
                    out.setdefault(pid, "careteam")
        if s.general_practitioner and members:
            for patient in self._find_any("Patient", "general-practitioner", members):
                if isinstance(patient.get("id"), str) and patient.get("active", True) is not False:
                    out.setdefault(patient["id"], "gp")
        if s.encounter and members:
            horizon = instant(self._clock.now_ms() - s.encounter_days * _DAY_MS)
            for enc in self._find_any("Encounter", "participant", members):
                if enc.get("status") not in s.encounter_statuses:
                    continue
                period = enc.get("period")
                end = period.get("end") if isinstance(period, dict) else None
                if enc.get("status") == "finished" and not (isinstance(end, str) and end >= horizon[:len(end)]):
                    continue  # finished too long ago (or with no end date)
                if (pid := _patient(enc.get("subject"))) is not None:
                    out.setdefault(pid, "encounter")
        if s.episode_of_care and orgs:
            for episode in self._find("EpisodeOfCare", [("organization", orgs[0]), ("status", "active")]):
                if (pid := _patient(episode.get("patient"))) is not None:
                    out.setdefault(pid, "episode")
        return out

    def _find_any(self, rtype: str, code: str, refs: list[str],
                  extra: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Resources whose ``code`` names any of ``refs``, in searches within the search parser's value cap."""
        found: list[dict[str, Any]] = []
        for i in range(0, len(refs), MAX_VALUES):
            found.extend(self._find(rtype, [(code, ",".join(refs[i:i + MAX_VALUES])), *(extra or [])]))
        return found

    # -- what one write gives its writer ---------------------------------------------
    def granted(self, rtype: str, body: Mapping[str, Any] | None, reach: Reach,
                organization: str | None) -> set[str]:
        """Patients that this version of a resource opens to the user whose references are
        ``reach.members`` (and organisation): the same conditions as the computation above, on one
        resource, so a write's effect is known without recomputing the user's whole set."""
        s, members = self.settings, reach.members
        if body is None:
            return set()
        pid: str | None = None
        if rtype == "CareTeam" and s.care_team and body.get("status") == "active":
            named = set(_refs(body.get("participant"), "member"))
            if named & members or (organization and f"Organization/{organization}" in named):
                pid = _patient(body.get("subject"))
        elif rtype == "Encounter" and s.encounter and body.get("status") in s.encounter_statuses:
            if set(_refs(body.get("participant"), "individual")) & members:
                pid = _patient(body.get("subject"))
        elif rtype == "Patient" and s.general_practitioner and body.get("active", True) is not False:
            if set(_refs(body.get("generalPractitioner"))) & members and isinstance(body.get("id"), str):
                pid = str(body["id"])
        elif rtype == "EpisodeOfCare" and s.episode_of_care and organization and body.get("status") == "active":
            if _local(_ref(body.get("managingOrganization"))) == f"Organization/{organization}":
                pid = _patient(body.get("patient"))
        elif rtype == "PractitionerRole" and body.get("active", True) is not False and isinstance(body.get("id"), str):
            role = f"PractitionerRole/{body['id']}"
            user = next((m for m in members if m.startswith("Practitioner/")), None)
            if user is not None and _local(_ref(body.get("practitioner"))) == user and role not in members:
                # The user would act through this role: everything recorded for the role (3 searches,
                # only for a write that points a role at its own writer).
                return set(self._reached([role], None))
        return {pid} if pid is not None else set()

    # -- consent ------------------------------------------------------------------
    def _patients_with_consent(self, now: float) -> frozenset[str] | None:
        """Who has an active Consent (None when there are too many to list: look each one up)."""
        with self._lock:
            known = self._with_consent
            generation = self._generation
        if known is not None and known[0] > now:
            return known[2]
        found = self._find("Consent", [("status", "active")])
        listed = None if len(found) >= _LIMIT else frozenset(
            p for c in found if (p := _patient(c.get("patient"))) is not None)
        with self._lock:
            if generation == self._generation:
                self._with_consent = (now + self.settings.cache_seconds, generation, listed)
        return listed

    def consent_for(self, patient_id: str) -> Consent:
        """The deny provisions of the patient's active privacy consents (cached like relationships)."""
        now = time.monotonic()
        with self._lock:
            hit = self._consents.get(patient_id)
            if hit is not None and hit[0] > now:
                return hit[2]
            generation = self._generation
        listed = self._patients_with_consent(now)
        if listed is not None and patient_id not in listed:
            return Consent()
        rules: list[ConsentRule] = []
        today = instant(self._clock.now_ms())
        for consent in self._find("Consent", [("patient", f"Patient/{patient_id}"), ("status", "active")]):
            if _PRIVACY in _codes(consent.get("scope")):
                rules.extend(consent_rules(consent, today))
        found = Consent(tuple(rules))
        with self._lock:
            if generation == self._generation:
                if len(self._consents) > 100_000:
                    self._consents.clear()
                self._consents[patient_id] = (now + self.settings.cache_seconds, generation, found)
        return found


def _codes(concept: Any) -> set[str]:
    """Codes of a CodeableConcept, as 'code' and 'system|code'."""
    out: set[str] = set()
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for c in codings if isinstance(codings, list) else ():
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            out.add(c["code"])
            if isinstance(c.get("system"), str):
                out.add(f"{c['system']}|{c['code']}")
    return out


def _current(period: Any, today: str) -> bool:
    if not isinstance(period, dict):
        return True
    start, end = period.get("start"), period.get("end")
    if isinstance(start, str) and start[:10] > today[:10]:
        return False
    return not (isinstance(end, str) and end[:10] < today[:10])


def consent_rules(consent: Mapping[str, Any], today: str) -> list[ConsentRule]:
    """Deny provisions (root and nested) of one Consent, each with its actor/class/label/code conditions.

    Permit provisions are not exceptions to a deny here: denying more than asked is the safe side.
    """
    rules: list[ConsentRule] = []

    def walk(provision: Any, depth: int) -> None:
        if not isinstance(provision, dict) or depth > 8 or not _current(provision.get("period"), today):
            return
        if provision.get("type") == "deny":
            actors = {_local(_ref(a.get("reference"))) for a in provision.get("actor") or () if isinstance(a, dict)}
            classes = {c.get("code") for c in provision.get("class") or () if isinstance(c, dict)}
            labels = {c.get("code") for c in provision.get("securityLabel") or () if isinstance(c, dict)}
            codes: set[str] = set()
            for concept in provision.get("code") or ():
                codes |= _codes(concept)
            rules.append(ConsentRule(frozenset(a for a in actors if a), frozenset(c for c in classes if c),
                                     frozenset(c for c in labels if c), frozenset(codes)))
        for child in provision.get("provision") or ():
            walk(child, depth + 1)

    walk(consent.get("provision"), 0)
    return rules


_BOOLS = ("care_team", "encounter", "general_practitioner", "episode_of_care")


def parse_access_settings(raw: Any, origin: str) -> RelationshipSettings:
    """The ``[access]`` table of the config file (config.py SECTIONS), e.g.::

        [access]
        encounter_days = 14
        episode_of_care = false
        cache_seconds = 10
    """
    # Imported here: config imports the section parsers lazily, and this module is one.
    from fhirvault.config import SettingsError

    if raw is None:
        return RelationshipSettings()
    if not isinstance(raw, dict):
        raise SettingsError(f"{origin}: [access] must be a table")
    known = {*_BOOLS, "encounter_days", "encounter_statuses", "cache_seconds"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(f"{origin}: unknown setting access.{unknown[0]}")
    values: dict[str, Any] = {}
    for name in _BOOLS:
        if name in raw:
            if not isinstance(raw[name], bool):
                raise SettingsError(f"{origin}: access.{name} must be true or false")
            values[name] = raw[name]
    if "encounter_days" in raw:
        days = raw["encounter_days"]
        if not isinstance(days, int) or isinstance(days, bool) or not 0 <= days <= 3650:
            raise SettingsError(f"{origin}: access.encounter_days must be an integer from 0 to 3650")
        values["encounter_days"] = days
    if "encounter_statuses" in raw:
        statuses = raw["encounter_statuses"]
        if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
            raise SettingsError(f"{origin}: access.encounter_statuses must be a list of Encounter.status codes")
        values["encounter_statuses"] = frozenset(statuses)
    if "cache_seconds" in raw:
        seconds = raw["cache_seconds"]
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds <= 600:
            raise SettingsError(f"{origin}: access.cache_seconds must be a number from 0 to 600")
        values["cache_seconds"] = float(seconds)
    return RelationshipSettings(**values)
