"""A real FHIR client library (fhirpy) drives create, read, update, delete and history."""

from __future__ import annotations

import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from tests.conftest import Server


def test_fhirpy_crud(shared_server: Server) -> None:
    client = SyncFHIRClient(shared_server.fhir, authorization=f"Bearer {shared_server.token()}")
    patient = client.resource("Patient", name=[{"family": "Durand", "given": ["Luc"]}], gender="male",
                              birthDate="1950-02-03")
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"

    fetched = client.reference("Patient", patient.id).to_resource()
    assert fetched["name"][0]["family"] == "Durand"

    fetched["gender"] = "unknown"
    fetched.save()
    assert client.reference("Patient", patient.id).to_resource()["gender"] == "unknown"

    obs = client.resource(
        "Observation", status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        subject=patient.to_reference(), valueQuantity={"value": 81.5, "unit": "kg",
                                                       "system": "http://unitsofmeasure.org", "code": "kg"},
    )
    obs.save()
    assert obs.id

    patient.delete()
    with pytest.raises(ResourceNotFound):
        client.reference("Patient", patient.id).to_resource()
