"""services/relationships.py: relationship sources, the encounter window, consent parsing and the cache."""

from __future__ import annotations

from typing import Any

from fhirvault.domain.instants import instant
from fhirvault.services.relationships import (
    Relationships,
    RelationshipSettings,
    consent_rules,
    relationship_change,
    self_added,
)

NOW = 1_790_000_000_000
DAY = 86_400_000


class Clock:
    def now_ms(self) -> int:
        return NOW


class Data:
    """A fake finder: resources by type, matched on the few parameters the service uses."""

    def __init__(self) -> None:
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        self.calls = 0

    def add(self, resource: dict[str, Any]) -> None:
        self.by_type.setdefault(resource["resourceType"], []).append(resource)

    def find(self, rtype: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        self.calls += 1
        wanted = dict(params)
        out = []
        for r in self.by_type.get(rtype, []):
            text = str(r)
            if all(any(v in text for v in value.split(",")) for k, value in wanted.items() if k != "status") and (
                    "status" not in wanted or r.get("status") == wanted["status"]):
                out.append(r)
        return out


def test_sources_and_encounter_window() -> None:
    data = Data()
    data.add({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/a"},
              "participant": [{"member": {"reference": "PractitionerRole/r1"}}]})
    data.add({"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/1"}})
    data.add({"resourceType": "Patient", "id": "b", "generalPractitioner": [{"reference": "Practitioner/1"}]})
    data.add({"resourceType": "Encounter", "status": "finished", "subject": {"reference": "Patient/c"},
              "period": {"end": instant(NOW - 2 * DAY)}, "participant": [{"individual": {"reference": "Practitioner/1"}}]})
    data.add({"resourceType": "Encounter", "status": "finished", "subject": {"reference": "Patient/old"},
              "period": {"end": instant(NOW - 90 * DAY)},
              "participant": [{"individual": {"reference": "Practitioner/1"}}]})
    data.add({"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": "Patient/d"},
              "managingOrganization": {"reference": "Organization/o1"}})
    rel = Relationships(data.find, Clock())
    assert rel.patients_of("Practitioner/1", "o1") == {"a": "careteam", "b": "gp", "c": "encounter", "d": "episode"}
    no_gp = Relationships(data.find, Clock(), RelationshipSettings(general_practitioner=False, episode_of_care=False))
    assert set(no_gp.patients_of("Practitioner/1", "o1")) == {"a", "c"}


def test_cache_and_invalidation() -> None:
    data = Data()
    rel = Relationships(data.find, Clock())
    assert rel.patients_of("Practitioner/1", None) == {}
    calls = data.calls
    assert rel.patients_of("Practitioner/1", None) == {}
    assert data.calls == calls  # cached
    data.add({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/a"},
              "participant": [{"member": {"reference": "Practitioner/1"}}]})
    rel.invalidate()
    assert rel.patients_of("Practitioner/1", None) == {"a": "careteam"}


def test_consent_rules() -> None:
    today = instant(NOW)
    consent = {"provision": {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/9"}}],
         "class": [{"code": "Observation"}], "securityLabel": [{"code": "R"}],
         "code": [{"coding": [{"system": "http://loinc.org", "code": "1-1"}]}]},
        {"type": "deny", "period": {"end": "2001-01-01"}},  # over
        {"type": "permit"}]}}
    [rule] = consent_rules(consent, today)
    assert rule.actors == {"Practitioner/9"} and rule.classes == {"Observation"} and rule.labels == {"R"}
    assert rule.codes == {"1-1", "http://loinc.org|1-1"}
    [opt_out] = consent_rules({"provision": {"type": "deny"}}, today)
    assert opt_out.opt_out


def test_access_settings() -> None:
    import pytest

    from fhirvault.config import SettingsError
    from fhirvault.services.relationships import parse_access_settings

    s = parse_access_settings({"encounter_days": 14, "episode_of_care": False, "cache_seconds": 5}, "test")
    assert s.encounter_days == 14 and not s.episode_of_care and s.cache_seconds == 5 and s.care_team
    assert parse_access_settings(None, "t") == RelationshipSettings()
    for bad in ({"encounter_days": -1}, {"care_team": "yes"}, {"nope": 1}, {"cache_seconds": 1e6}):
        with pytest.raises(SettingsError):
            parse_access_settings(bad, "t")


def _team(subject: str, *members: str, status: str = "active") -> dict[str, Any]:
    return {"resourceType": "CareTeam", "status": status, "subject": {"reference": subject},
            "participant": [{"member": {"reference": m}} for m in members]}


def test_writes_that_change_no_relationship_keep_the_cache() -> None:
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": "A"}]}
    renamed = {**patient, "name": [{"family": "B"}]}
    assert relationship_change("Patient", None, patient) is None  # a new patient without GP
    assert relationship_change("Patient", patient, renamed) is None  # a name change
    enc = {"resourceType": "Encounter", "status": "in-progress", "subject": {"reference": "Patient/p"},
           "participant": [{"individual": {"reference": "Practitioner/1"}}]}
    assert relationship_change("Encounter", enc, {**enc, "reasonCode": [{"text": "x"}]}) is None
    finished = relationship_change("Encounter", enc, {**enc, "status": "finished"})
    assert finished is not None and finished.refs == {"Practitioner/1"}
    moved = relationship_change("CareTeam", _team("Patient/p", "Practitioner/1"), _team("Patient/p", "Practitioner/2"))
    assert moved is not None and moved.refs == {"Practitioner/1", "Practitioner/2"}
    consent = relationship_change("Consent", None, {"resourceType": "Consent", "patient": {"reference": "Patient/p"}})
    assert consent is not None and consent.consent_patients == {"p"} and not consent.refs
    assert relationship_change("Observation", None, {"resourceType": "Observation"}) is None


def test_invalidation_is_targeted_to_the_practitioners_named() -> None:
    data = Data()
    data.add(_team("Patient/a", "Practitioner/1"))
    data.add(_team("Patient/b", "Practitioner/2"))
    rel = Relationships(data.find, Clock())
    assert rel.patients_of("Practitioner/1", None) == {"a": "careteam"}
    assert rel.patients_of("Practitioner/2", None) == {"b": "careteam"}
    calls = data.calls
    data.add(_team("Patient/c", "Practitioner/2"))
    rel.invalidate(relationship_change("CareTeam", None, _team("Patient/c", "Practitioner/2")))
    assert rel.patients_of("Practitioner/1", None) == {"a": "careteam"}
    assert data.calls == calls  # practitioner 1's set was kept
    assert rel.patients_of("Practitioner/2", None) == {"b": "careteam", "c": "careteam"}


def test_concurrent_misses_compute_once() -> None:
    import threading
    import time as _time

    data = Data()
    data.add(_team("Patient/a", "Practitioner/1"))
    slow_calls = []

    def slow_find(rtype: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        slow_calls.append(rtype)
        _time.sleep(0.05)
        return data.find(rtype, params)

    rel = Relationships(slow_find, Clock())
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(rel.patients_of("Practitioner/1", None)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [{"a": "careteam"}] * 8
    assert rel.lookups == 1


def test_patients_without_any_consent_need_no_search() -> None:
    data = Data()
    rel = Relationships(data.find, Clock())
    assert rel.consent_for("a").rules == ()
    calls = data.calls
    for pid in ("b", "c", "d"):
        assert rel.consent_for(pid).rules == ()
    assert data.calls == calls  # one listing of consented patients served them all
    consent = {"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/c"},
               "scope": {"coding": [{"code": "patient-privacy"}]}, "provision": {"type": "deny"}}
    data.add(consent)
    rel.invalidate(relationship_change("Consent", None, consent))
    assert rel.consent_for("c").rules and rel.consent_for("b").rules == ()


def test_granted_evaluates_one_version_for_its_writer() -> None:
    """What a single write opens to a user, without recomputing their whole set (issue #11)."""
    data = Data()
    data.add({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/pc"},
              "participant": [{"member": {"reference": "PractitionerRole/role-b"}}]})
    rel = Relationships(data.find, Clock())
    reach = rel.reach_of("Practitioner/a", "org-a")
    assert reach.members == frozenset({"Practitioner/a"}) and dict(reach.patients) == {}
    team = {"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/p"},
            "participant": [{"member": {"reference": "Practitioner/a"}}]}
    assert rel.granted("CareTeam", team, reach, "org-a") == {"p"}
    assert rel.granted("CareTeam", {**team, "status": "inactive"}, reach, "org-a") == set()
    by_org = {**team, "participant": [{"member": {"reference": "Organization/org-a"}}]}
    assert rel.granted("CareTeam", by_org, reach, "org-a") == {"p"}
    assert rel.granted("Patient", {"resourceType": "Patient", "id": "q",
                                   "generalPractitioner": [{"reference": "Practitioner/a"}]}, reach, None) == {"q"}
    episode = {"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": "Patient/e"},
               "managingOrganization": {"reference": "Organization/org-a"}}
    assert rel.granted("EpisodeOfCare", episode, reach, "org-a") == {"e"}
    assert rel.granted("EpisodeOfCare", episode, reach, "org-b") == set()
    # a role pointed at its writer: everything recorded for the role becomes theirs
    role = {"resourceType": "PractitionerRole", "id": "role-b", "practitioner": {"reference": "Practitioner/a"}}
    assert rel.granted("PractitionerRole", role, reach, None) == {"pc"}
    assert rel.granted("PractitionerRole", {**role, "practitioner": {"reference": "Practitioner/b"}},
                       reach, None) == set()


def test_self_added_and_new_relationship_fields() -> None:
    old = {"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/p"},
           "participant": [{"member": {"reference": "Practitioner/b"}}]}
    new = {**old, "participant": [*old["participant"], {"member": {"reference": "PractitionerRole/mine"}}]}
    me = frozenset({"Practitioner/a", "PractitionerRole/mine"})
    assert self_added("CareTeam", old, new, me) and not self_added("CareTeam", new, new, me)
    assert not self_added("CareTeam", new, old, me)  # removing oneself is not adding
    # Patient.link, EpisodeOfCare.careManager and PractitionerRole.organization are relationship fields now
    pat = {"resourceType": "Patient", "id": "x"}
    assert relationship_change("Patient", pat, {**pat, "link": [{"other": {"reference": "Patient/y"}}]})
    ep = {"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": "Patient/p"}}
    assert relationship_change("EpisodeOfCare", ep, {**ep, "careManager": {"reference": "Practitioner/a"}})
    role = {"resourceType": "PractitionerRole", "id": "r", "practitioner": {"reference": "Practitioner/a"}}
    assert relationship_change("PractitionerRole", role, {**role, "organization": {"reference": "Organization/o"}})
