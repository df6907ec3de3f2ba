"""The HA templates (deploy/ha) as scripts/ha-up.sh renders them: fast checks, in the default suite."""

from __future__ import annotations

import re
from pathlib import Path

from fhirvault.config import load_settings

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "ha"


def render(name: str, **values: str) -> str:
    text = (TEMPLATES / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder was left unfilled"
    return text


def test_fhirvault_node_config_loads_with_the_multi_host_url(tmp_path: Path) -> None:
    data = tmp_path / "node1"
    data.mkdir()
    (data / "fhirvault.toml").write_text(render(
        "fhirvault.toml.in", NAME="node1", DATA=str(data), ROOT_KEY=str(tmp_path / "root.key"), PORT="25450",
        WORKERS="1", HTTP_PORT="25441", PG_HOSTS="127.0.0.1:25430,127.0.0.1:25431,127.0.0.1:25432",
        PGPASS=str(tmp_path / "pgpass"), WITNESS=str(tmp_path / "audit-witness.log")))
    settings = load_settings({"data_dir": data}, environ={})
    assert settings.database_url is not None
    assert "127.0.0.1:25430,127.0.0.1:25431,127.0.0.1:25432" in settings.database_url
    assert "target_session_attrs=read-write" in settings.database_url
    assert "password" not in settings.database_url  # the password is in the passfile
    assert settings.root_key_path == tmp_path / "root.key"
    assert settings.audit_witness_specs == (f"file://{tmp_path / 'audit-witness.log'}",)
    assert settings.trusted_proxies == ("127.0.0.1/32",)


def test_patroni_template_keeps_synchronous_replication() -> None:
    text = (TEMPLATES / "patroni.yml.in").read_text()
    assert re.search(r"^\s+synchronous_mode: true$", text, re.M)
    assert re.search(r"^\s+use_pg_rewind: true", text, re.M)
    assert "etcd3:" in text  # Debian's python3-etcd speaks only the v2 API


def test_haproxy_routes_on_readiness_and_never_resends_a_received_request() -> None:
    text = (TEMPLATES / "haproxy.cfg.in").read_text()
    assert "option httpchk GET /readyz" in text and "option httpchk GET /primary" in text
    assert re.search(r"^\s+retry-on conn-failure$", text, re.M)
