"""INS (NIR/NIA) number checks and the qualified-identity rule."""

from __future__ import annotations

from typing import Any

from fhirvault.domain.ins import NIA_SYSTEM, NIR_SYSTEM, RELIABILITY_URL, ins_issues, valid_ins
from fhirvault.domain.validation import Validator

STATUS_CS = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"


def with_key(number: str) -> str:
    value = int(number.replace("2A", "19").replace("2B", "18"))
    return f"{number}{97 - value % 97:02d}"


def reliability(status: str, **parts: Any) -> dict[str, Any]:
    subs: list[dict[str, Any]] = [{"url": "identityStatus", "valueCoding": {"system": STATUS_CS, "code": status}}]
    for name, value in parts.items():
        key = "valueCoding" if name in ("validationMode", "methodCollection") else "valueDate"
        subs.append({"url": name, key: value})
    return {"url": RELIABILITY_URL, "extension": subs}


def patient(value: str, system: str = NIR_SYSTEM, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **extra}


def test_keys() -> None:
    assert valid_ins("180017505600103") and valid_ins("260058815400233")  # FR Core examples
    assert not valid_ins("180017505600104")  # wrong key
    assert not valid_ins("1800175056001") and not valid_ins("18001750560010300")  # no key, too long
    assert not valid_ins("18001750560010A") and not valid_ins(180017505600103)
    corsica_a, corsica_b = with_key("269022A341732"), with_key("269022B341732")
    assert valid_ins(corsica_a) and valid_ins(corsica_b) and corsica_a[-2:] != corsica_b[-2:]
    assert not valid_ins("269022C341732" + corsica_a[-2:])
    # Corsica's key is computed with 2A = 19 and 2B = 18, not with the department written 20
    assert not valid_ins("269022A341732" + with_key("2690220341732")[-2:])


def test_bad_numbers_are_refused_without_echoing_them() -> None:
    issues = ins_issues(patient("180017505600199"))
    assert [(p, c) for p, c, _ in issues] == [("Patient.identifier[0].value", "value")]
    assert "180017505600199" not in issues[0][2]
    assert ins_issues(patient(with_key("7000000000001"), NIA_SYSTEM)) == []
    # the ANS test NIRs (OID .10) follow the same rules
    assert ins_issues(patient("279035121518989", "urn:oid:1.2.250.1.213.1.4.10")) == []
    assert ins_issues(patient("279035121518988", "urn:oid:1.2.250.1.213.1.4.10"))[0][1] == "value"
    # other identifier systems are not INS
    assert ins_issues(patient("anything", "urn:oid:1.2.250.1.71.4.2.1")) == []
    # the FR Core identifier type must match the system
    p = patient("180017505600103")
    p["identifier"][0]["type"] = {"coding": [{"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                              "code": "INS-NIA"}]}
    assert [c for _, c, _ in ins_issues(p)] == ["invalid"]


def test_qualified_needs_insi_and_an_identity_check() -> None:
    assert ins_issues(patient("180017505600103", extension=[reliability("VALI")])) == []
    assert ins_issues(patient("180017505600103", extension=[reliability("PROV")])) == []
    bare = ins_issues(patient("180017505600103", extension=[reliability("QUAL")]))
    assert len(bare) == 1 and bare[0][1] == "business-rule"
    assert "dateCollection, validationMode, validationDate" in bare[0][2]
    full = {"dateCollection": "2026-01-05", "validationMode": {"code": "CN"}, "validationDate": "2026-01-05"}
    assert ins_issues(patient("180017505600103", extension=[reliability("QUAL", **full)])) == []
    no_ins = ins_issues({"resourceType": "Patient", "extension": [reliability("QUAL", **full)]})
    assert "a valid INS identifier" in no_ins[0][2]
    bad_ins = ins_issues(patient("180017505600104", extension=[reliability("QUAL", **full)]))
    assert [c for _, c, _ in bad_ins] == ["value", "business-rule"]
    assert [c for _, c, _ in ins_issues(patient("180017505600103", extension=[reliability("XXXX")]))] == ["code-invalid"]


def test_validator_applies_the_rules() -> None:
    issues = Validator.default().validate(patient("180017505600199"))
    assert [(i.path, i.code) for i in issues] == [("Patient.identifier[0].value", "value")]
    assert Validator.default().validate(patient("180017505600103")) == []
