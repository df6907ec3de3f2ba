"""The benchmarks' encryption-and-audit-off build (bench/_plain.py) cannot be reached from an installed server.

It lives outside the package and substitutes components in its own process; no setting, environment
variable or ``serve`` option turns encryption or the audit trail off, and the server's own wiring
encrypts every stored body and audits every access."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fhirvault.cli.main import build_parser
from fhirvault.config import Settings, SettingsError, load_settings
from fhirvault.services.audit import AuditTrail
from fhirvault.services.keys import KeyRing
from tests.conftest import App

SRC = Path(__file__).resolve().parents[2] / "src" / "fhirvault"
OFF_SWITCHES = ("encryption", "encrypt", "plain", "plaintext", "no_encryption", "audit", "no_audit",
                "audit_enabled", "bench", "bench_plain")


@pytest.mark.parametrize("name", OFF_SWITCHES)
def test_no_environment_variable_turns_encryption_or_audit_off(tmp_path: Path, name: str) -> None:
    env = {f"FHIRVAULT_{name.upper()}": "off"}
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({"data_dir": tmp_path}, environ=env)


@pytest.mark.parametrize("name", OFF_SWITCHES)
def test_no_config_file_key_turns_encryption_or_audit_off(tmp_path: Path, name: str) -> None:
    config = tmp_path / "fhirvault.toml"
    config.write_text(f"{name} = false\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({"data_dir": tmp_path}, environ={}, config_file=config)


def test_no_setting_or_serve_option_is_an_off_switch() -> None:
    pattern = re.compile(r"encrypt|plain|bench|no.?audit|audit.?(off|enabled|disabled)")
    assert not [f for f in Settings.__dataclass_fields__ if pattern.search(f)]
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = [o for action in serve._actions for o in action.option_strings]
    assert options and not [o for o in options if pattern.search(o)]


def test_the_package_never_loads_the_bench_build() -> None:
    offenders = [str(p) for p in SRC.rglob("*.py")
                 if re.search(r"\b_plain\b|PassThroughAead|SilentAuditTrail|\bbench\b", p.read_text())]
    assert offenders == []


def test_the_served_container_encrypts_and_audits(app: App) -> None:
    c = app.container
    assert type(c.keys) is KeyRing and type(c.audit) is AuditTrail
    audited = c.store.audit_size()
    r = app.client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Quillfeather"}]},
                        headers=app.auth)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert app.client.get(f"/fhir/Patient/{rid}", headers=app.auth).status_code == 200
    stored = c.store.read_current(c.settings.tenant, "Patient", rid)
    assert stored is not None
    assert stored.blob[:1] == b"\x01" and b"Quillfeather" not in stored.blob  # the AES-GCM envelope
    assert c.store.audit_size() >= audited + 2  # the create and the read
