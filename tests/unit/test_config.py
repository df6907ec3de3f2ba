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
