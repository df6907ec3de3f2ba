from __future__ import annotations

from fhirvault.domain.compartment import patient_id_from_reference, patient_of


def test_reference_forms() -> None:
    assert patient_id_from_reference("Patient/123") == "123"
    assert patient_id_from_reference("Patient/123/_history/4") == "123"
    assert patient_id_from_reference("https://h/fhir/Patient/abc") == "abc"
    assert patient_id_from_reference("Practitioner/1") is None
    assert patient_id_from_reference("#contained") is None


def test_patient_of_follows_the_compartment_definition() -> None:
    assert patient_of("Patient", {"resourceType": "Patient", "id": "p1"}) == "p1"
    obs = {"resourceType": "Observation", "performer": [{"reference": "Patient/p2"}],
           "subject": {"reference": "Patient/p1"}}
    assert patient_of("Observation", obs) == "p1"  # subject comes before performer
    enc = {"resourceType": "Encounter", "subject": {"reference": "Group/g"}}
    assert patient_of("Encounter", enc) is None
    assert patient_of("Organization", {"resourceType": "Organization", "name": "x"}) is None
    team = {"resourceType": "CareTeam", "participant": [{"member": {"reference": "Practitioner/d"}},
                                                        {"member": {"reference": "Patient/p9"}}]}
    assert patient_of("CareTeam", team) == "p9"
