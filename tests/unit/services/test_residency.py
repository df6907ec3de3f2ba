"""Data residency at configuration load, and the outbound allow-list."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fhirvault.config import SettingsError, load_settings
from fhirvault.services import residency
from fhirvault.services.residency import (
    OutboundGuard,
    OutboundRefused,
    allowed_hosts,
    destinations,
    overrides,
)


def _load(tmp_path: Path, toml: str) -> object:
    config = tmp_path / "fhirvault.toml"
    config.write_text(toml)
    return load_settings({"data_dir": tmp_path / "data"}, environ={}, config_file=config)


WEBHOOK = """
[[alerts.sinks]]
type = "webhook"
url = "https://hooks.example.com/fhirvault"
secret_env = "HOOK_SECRET"
"""


def _with_secret(tmp_path: Path, toml: str) -> object:
    config = tmp_path / "fhirvault.toml"
    config.write_text(toml)
    return load_settings({"data_dir": tmp_path / "data"}, environ={"HOOK_SECRET": "s3cret"}, config_file=config)


def test_the_default_install_has_no_remote_destination_and_loads_quietly(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "fhirvault.config"):
        settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    assert caplog.records == []
    assert settings.mode == "default" and settings.country is None
    assert all(d.host is None for d in destinations(settings))
    assert allowed_hosts(settings) == frozenset()


def test_a_destination_outside_the_eea_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"alerts\.sinks\[0\]: destination hooks\.example\.com is in US, outside"
                                            r" the EEA.*allow_non_eea"):
        _with_secret(tmp_path, WEBHOOK + '[[residency.destinations]]\nhost = "hooks.example.com"\ncountry = "US"\n')


def test_an_override_needs_a_justification_and_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"allow_non_eea: expected the reason"):
        _with_secret(tmp_path, WEBHOOK + '[[residency.destinations]]\nhost = "hooks.example.com"\ncountry = "US"\n'
                     'allow_non_eea = "ok"\n')
    settings = _with_secret(tmp_path, WEBHOOK + '[[residency.destinations]]\nhost = "hooks.example.com"\n'
                            'country = "us"\nallow_non_eea = "SOC contract C-42, SCCs signed 2026-01"\n')
    accepted = overrides(settings)  # type: ignore[arg-type]
    assert [(d.setting, d.host, d.country, d.override) for d in accepted] == [
        ("alerts.sinks[0]", "hooks.example.com", "US", "SOC contract C-42, SCCs signed 2026-01")]


def test_an_undeclared_remote_destination_is_refused_in_production_and_warned_otherwise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "fhirvault.config"):
        settings = _with_secret(tmp_path, WEBHOOK)
    assert any("hooks.example.com has no declared country" in r.getMessage() for r in caplog.records)
    assert "hooks.example.com" in allowed_hosts(settings)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"alerts\.sinks\[0\].*no declared country.*production mode refuses"):
        _with_secret(tmp_path, 'mode = "production"\ncountry = "FR"\n' + WEBHOOK)


def test_production_needs_the_instance_country_and_refuses_one_outside_the_eea(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^country: production mode needs the instance's country"):
        _load(tmp_path, 'mode = "production"\n')
    with pytest.raises(SettingsError, match=r"data_dir: destination on this machine is in CH, outside the EEA"):
        _load(tmp_path, 'mode = "production"\ncountry = "CH"\n')
    settings = _load(tmp_path, 'mode = "production"\ncountry = "CH"\n[residency]\n'
                     'allow_non_eea = "Swiss hospital, adequacy decision 2000/518/EC"\n')
    accepted = overrides(settings)  # type: ignore[arg-type]
    # the data directory and what lives beside it (the witness file, the alerts JSON-lines file)
    assert {d.setting for d in accepted} == {"data_dir", "audit_witnesses", "alerts.sinks[0]"}
    assert all(d.host is None and d.country == "CH" for d in accepted)


def test_database_hosts_witnesses_and_backup_targets_are_destinations(tmp_path: Path) -> None:
    settings = _load(tmp_path, '''
country = "FR"
database_url = "postgresql://fv@db1.example.fr:5432,db2.example.de:5432/fv"
audit_witnesses = ["syslog+tcp://siem.example.fr:6514", "file:///var/lib/w.log"]
[backup.targets.offsite]
url = "s3://bucket/fv"
endpoint = "https://s3.example.eu"
location = "DE"
[[residency.destinations]]
host = "db1.example.fr"
country = "FR"
[[residency.destinations]]
host = "db2.example.de"
country = "DE"
[[residency.destinations]]
host = "siem.example.fr"
country = "FR"
''')
    got = {(d.setting, d.host, d.country) for d in destinations(settings)}  # type: ignore[arg-type]
    assert got == {("data_dir", None, "FR"), ("database_url", "db1.example.fr", "FR"),
                   ("database_url", "db2.example.de", "DE"), ("audit_witnesses", "siem.example.fr", "FR"),
                   ("audit_witnesses", None, "FR"), ("backup.targets.offsite", "s3.example.eu", "DE"),
                   ("alerts.sinks[0]", None, "FR")}  # the default JSON-lines alert file
    assert allowed_hosts(settings) == {"db1.example.fr", "db2.example.de", "siem.example.fr",  # type: ignore[arg-type]
                                       "s3.example.eu"}


def test_the_outbound_guard_refuses_other_hosts_and_reports_them() -> None:
    seen: list[tuple[str, str]] = []
    guard = OutboundGuard({"hooks.example.fr"}, lambda host, what: seen.append((host, what)))
    guard.check("hooks.example.fr", "alert webhook")
    guard.check("127.0.0.1", "identity provider")  # loopback is always allowed
    guard.check("localhost", "identity provider")
    with pytest.raises(OutboundRefused, match=r"evil\.example\.com refused"):
        guard.check("evil.example.com", "identity provider")
    assert seen == [("evil.example.com", "identity provider")]


def test_check_outbound_applies_the_installed_guard_only() -> None:
    residency.check_outbound("https://anything.example.com/x", "test")  # no guard installed: one-shot tools
    residency.install_guard(OutboundGuard({"ok.example.fr"}))
    try:
        residency.check_outbound("https://ok.example.fr/path", "test")
        with pytest.raises(OutboundRefused):
            residency.check_outbound("https://jwks.elsewhere.example.com/keys", "identity provider")
    finally:
        residency.install_guard(None)


def test_alert_sinks_and_federation_are_held_to_the_allow_list() -> None:
    import asyncio

    import httpx

    from fhirvault.adapters.alert_sinks import SmtpSink, WebhookSink
    from fhirvault.services.alert_settings import SmtpSinkSettings, WebhookSinkSettings
    from fhirvault.services.federation import _fetch
    from tests.unit.adapters.test_alert_sinks import make_alert

    refused: list[str] = []
    calls: list[str] = []
    residency.install_guard(OutboundGuard({"hooks.example.fr"}, lambda host, what: refused.append(f"{host} {what}")))
    try:
        with pytest.raises(OutboundRefused):  # refused before any connection is attempted
            WebhookSink(WebhookSinkSettings(url="https://hooks.example.com/x", secret=b"k")).send(make_alert(), "firing")
        with pytest.raises(OutboundRefused):
            SmtpSink(SmtpSinkSettings(host="mail.example.com", sender="a@b.fr", recipients=("c@d.fr",))).send(
                make_alert(), "firing")

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(str(request.url))
            return httpx.Response(200, json={})

        async def fetch(url: str) -> tuple[int, str, bytes]:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                return await _fetch(client, "GET", url)

        assert asyncio.run(fetch("https://hooks.example.fr/.well-known/openid-configuration"))[0] == 200
        with pytest.raises(OutboundRefused):  # e.g. a jwks_uri on a host nobody declared
            asyncio.run(fetch("https://keys.elsewhere.example.net/jwks"))
    finally:
        residency.install_guard(None)
    assert calls == ["https://hooks.example.fr/.well-known/openid-configuration"]
    assert refused == ["hooks.example.com alert webhook", "mail.example.com alert e-mail",
                       "keys.elsewhere.example.net identity provider"]


def test_accepted_transfers_are_audited_once_per_change(tmp_path: Path) -> None:
    from fhirvault.bootstrap import initialise
    from fhirvault.container import build
    from fhirvault.ports import AuditQuery
    from fhirvault.services.config_audit import record_residency_overrides

    settings = _with_secret(tmp_path, WEBHOOK + '[[residency.destinations]]\nhost = "hooks.example.com"\n'
                            'country = "US"\nallow_non_eea = "SOC contract C-42, SCCs signed 2026-01"\n')
    initialise(settings)  # type: ignore[arg-type]
    container = build(settings)  # type: ignore[arg-type]
    try:
        assert record_residency_overrides(container) == [
            "alerts.sinks[0]: hooks.example.com in US, accepted: SOC contract C-42, SCCs signed 2026-01"]
        assert record_residency_overrides(container) == []  # unchanged: not recorded again
        rows = container.store.audit_find(AuditQuery(container.settings.tenant, descending=True, limit=50))
        docs = [container.audit.decrypt(r.seq, r.ts_ms, r.blob) for r in rows]
        details = [d["detail"] for d in docs if d.get("interaction") == "config-change"]
        assert details == ["destinations outside the EEA accepted: alerts.sinks[0]: hooks.example.com in US,"
                           " accepted: SOC contract C-42, SCCs signed 2026-01"]
    finally:
        container.close()
