from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.config import SettingsError, load_settings


def test_precedence_cli_env_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9000\nhost = "0.0.0.0"\nvalidation = "lenient"\n')
    s = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_PORT": "9100"}, config_file=cfg)
    assert (s.port, s.host, s.validation) == (9100, "0.0.0.0", "lenient")
    s2 = load_settings({"data_dir": tmp_path, "port": 9200}, environ={"FHIRVAULT_PORT": "9100"}, config_file=cfg)
    assert s2.port == 9200
    with pytest.raises(AttributeError):
        s2.port = 1  # type: ignore[misc]


def test_data_dir_config_file_is_found(tmp_path: Path) -> None:
    (tmp_path / "fhirvault.toml").write_text("max_body_bytes = 2048\n")
    assert load_settings(environ={"FHIRVAULT_DATA_DIR": str(tmp_path)}).max_body_bytes == 2048


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({}, {}, "data_dir is required"),
        ({"data_dir": "/x"}, {"FHIRVAULT_PORTT": "1"}, "unknown setting in environment: FHIRVAULT_PORTT"),
        ({"data_dir": "/x"}, {"FHIRVAULT_PORT": "http"}, "port: expected an integer"),
        ({"data_dir": "/x", "port": 70000}, {}, "port: must be between"),
        ({"data_dir": "/x"}, {"FHIRVAULT_VALIDATION": "loose"}, "validation: must be one of"),
        ({"data_dir": "/x", "tls_cert": "/c.pem"}, {}, "tls_cert and tls_key must be given together"),
    ],
)
def test_invalid_settings_fail_fast(cli: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(cli, environ=env)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings({"data_dir": tmp_path}, environ={}, config_file=cfg)
    cfg.write_text("port = [")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({"data_dir": tmp_path}, environ={}, config_file=cfg)


def test_config_file_tables_are_parsed_by_their_modules(tmp_path: Path) -> None:
    secret = tmp_path / "idp-secret"
    secret.write_text("s3cr3t\n")
    (tmp_path / "target").mkdir()
    cfg = tmp_path / "fhirvault.toml"
    cfg.write_text(f"""
audit_witnesses = ["file:///mnt/witness/fhirvault.log", "syslog+udp://127.0.0.1:514"]

[alerts.rules.brute_force]
failures = 3

[backup]
replicate_to = "offsite"
[backup.targets.offsite]
url = "file://{tmp_path / 'target'}"
location = "FR"

[[identity_providers]]
name = "keycloak"
display_name = "Hospital login"
issuer = "http://127.0.0.1:8081/realms/h"
client_id = "fhirvault"
client_secret_file = "{secret}"
role_claim = "roles"
role_map = {{ doctor = "practitioner" }}
""")
    s = load_settings({"data_dir": tmp_path / "data"}, environ={}, config_file=cfg)
    assert s.config_path == cfg
    assert s.audit_witness_specs == ("file:///mnt/witness/fhirvault.log", "syslog+udp://127.0.0.1:514")
    assert s.alerts is not None and s.alerts.detection.brute_force.failures == 3
    assert s.backup is not None and s.backup.replicate_to == "offsite" and s.backup.targets["offsite"].location == "FR"
    assert [p.name for p in s.identity_providers] == ["keycloak"]


def test_a_table_error_names_the_key_and_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "fhirvault.toml"
    cfg.write_text('[backup.targets.x]\nurl = "file:///tmp/x"\nlocation = "US"\n')
    with pytest.raises(SettingsError, match=r"outside the EEA.*fhirvault\.toml"):
        load_settings({"data_dir": tmp_path / "data"}, environ={}, config_file=cfg)
