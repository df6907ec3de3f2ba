"""Parsing the [alerts] TOML section: defaults, every sink type, secrets from files/env, precise errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from fhirvault.config import SettingsError
from fhirvault.services.alert_settings import (
    AlertSettings,
    JsonLinesSinkSettings,
    SmtpSinkSettings,
    SyslogSinkSettings,
    WebhookSinkSettings,
    parse_alert_settings,
)

ORIGIN = "config file /etc/fhirvault.toml"


def parse(text: str, tmp_path: Path, environ: dict[str, str] | None = None) -> AlertSettings:
    doc = tomllib.loads(text)
    return parse_alert_settings(doc.get("alerts", {}), ORIGIN, tmp_path, environ or {})


def test_defaults_all_rules_on_and_a_jsonl_sink(tmp_path: Path) -> None:
    s = parse("", tmp_path)
    assert s == AlertSettings.default(tmp_path)
    d = s.detection
    rules: list[Any] = [d.brute_force, d.mass_access, d.care_relationship, d.break_glass, d.restricted, d.after_hours,
             d.mfa_new_source, d.clock_skew]
    assert all(r.enabled for r in rules)
    assert s.sinks == (JsonLinesSinkSettings(path=tmp_path / "alerts.jsonl"),)


def test_full_example(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("s3cr3t-hook\n")
    text = f"""
[alerts]
renotify_seconds = 600
queue_size = 50
max_tracked_actors = 5000

[alerts.rules.brute_force]
failures = 5
window_seconds = 300
lock_seconds = 900
lock_accounts = false

[alerts.rules.mass_access]
distinct_patients = 100
baseline_factor = 4

[alerts.rules.after_hours]
timezone = "Europe/Paris"
days = ["mon", "tue", "wed", "thu", "fri", "sat"]
start_hour = 8
end_hour = 18

[alerts.rules.restricted]
enabled = false

[alerts.rules.break_glass]
severity = "critical"

[[alerts.sinks]]
type = "webhook"
url = "https://hooks.example.org/fhirvault"
secret_file = "{tmp_path / 'hook.secret'}"
format = "alertmanager"

[[alerts.sinks]]
type = "smtp"
host = "smtp.example.org"
port = 587
from = "fhirvault@example.org"
to = ["soc@example.org"]
username = "alerts"
password_env = "SMTP_PASSWORD"

[[alerts.sinks]]
type = "syslog"
host = "127.0.0.1"
transport = "tcp"
facility = "local4"

[[alerts.sinks]]
type = "jsonl"
path = "{tmp_path / 'siem.jsonl'}"
min_severity = "medium"
"""
    s = parse(text, tmp_path, {"SMTP_PASSWORD": "pw from env"})
    assert (s.renotify_seconds, s.queue_size, s.detection.max_tracked_actors) == (600, 50, 5000)
    bf = s.detection.brute_force
    assert (bf.failures, bf.window_seconds, bf.lock_seconds, bf.lock_accounts, bf.throttle_sources) == (
        5, 300, 900, False, True)
    assert s.detection.mass_access.distinct_patients == 100 and s.detection.mass_access.baseline_factor == 4.0
    ah = s.detection.after_hours
    assert (ah.timezone, ah.days, ah.start_hour, ah.end_hour) == ("Europe/Paris", (0, 1, 2, 3, 4, 5), 8, 18)
    assert not s.detection.restricted.enabled and s.detection.break_glass.severity == "critical"
    webhook, smtp, syslog, jsonl = s.sinks
    assert isinstance(webhook, WebhookSinkSettings) and webhook.secret == b"s3cr3t-hook"
    assert webhook.format == "alertmanager"
    assert isinstance(smtp, SmtpSinkSettings) and smtp.password == "pw from env"
    assert smtp.recipients == ("soc@example.org",) and smtp.starttls and smtp.port == 587
    assert "pw from env" not in repr(s) and "s3cr3t" not in repr(s)
    assert isinstance(syslog, SyslogSinkSettings) and (syslog.transport, syslog.facility) == ("tcp", "local4")
    assert isinstance(jsonl, JsonLinesSinkSettings) and jsonl.min_severity == "medium"


def test_empty_sink_list_disables_delivery(tmp_path: Path) -> None:
    assert parse("[alerts]\nsinks = []\n", tmp_path).sinks == ()


@pytest.mark.parametrize(("text", "message"), [
    ("[alerts]\nrenotify = 5", "unknown setting 'alerts.renotify'"),
    ("[alerts.rules.brute_force]\nfailurez = 5", "unknown setting 'alerts.rules.brute_force.failurez'"),
    ("[alerts.rules.ddos]\nenabled = true", "unknown rule 'alerts.rules.ddos'"),
    ("[alerts.rules.brute_force]\nfailures = 0", "alerts.rules.brute_force.failures: must be between 1"),
    ("[alerts.rules.brute_force]\nfailures = '5'", "alerts.rules.brute_force.failures: expected an integer"),
    ("[alerts.rules.brute_force]\nenabled = 1", "alerts.rules.brute_force.enabled: expected true or false"),
    ("[alerts.rules.restricted]\nseverity = 'urgent'", "alerts.rules.restricted.severity: must be one of"),
    ("[alerts.rules.after_hours]\ntimezone = 'Mars/Olympus'", "unknown time zone 'Mars/Olympus'"),
    ("[alerts.rules.after_hours]\ndays = ['monday']", "alerts.rules.after_hours.days"),
    ("[alerts.rules.after_hours]\nstart_hour = 19\nend_hour = 8", "start_hour must be before end_hour"),
    ("[[alerts.sinks]]\ntype = 'pager'", "alerts.sinks[0].type: must be one of"),
    ("[[alerts.sinks]]\ntype = 'webhook'\nurl = 'ftp://x'\nsecret_env = 'X'", "alerts.sinks[0].url: must start"),
    ("[[alerts.sinks]]\ntype = 'webhook'\nurl = 'https://x'", "alerts.sinks[0]: secret_file or secret_env is required"),
    ("[[alerts.sinks]]\ntype = 'webhook'\nurl = 'https://x'\nsecret = 'inline'",
     "unknown setting 'alerts.sinks[0].secret'"),
    ("[[alerts.sinks]]\ntype = 'webhook'\nurl = 'https://x'\nsecret_env = 'NOPE'",
     "environment variable NOPE is not set"),
    ("[[alerts.sinks]]\ntype = 'webhook'\nurl = 'https://x'\nsecret_file = '/nonexistent/s'", "cannot read"),
    ("[[alerts.sinks]]\ntype = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['x']", "alerts.sinks[0].to"),
    ("[[alerts.sinks]]\ntype = 'smtp'\nhost = 'h'\nto = ['x@y']", "alerts.sinks[0].from is required"),
    ("[[alerts.sinks]]\ntype = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['x@y']\npassword = 'p'",
     "unknown setting 'alerts.sinks[0].password'"),
    ("[[alerts.sinks]]\ntype = 'syslog'\nhost = 'h'\ntransport = 'dtls'", "alerts.sinks[0].transport"),
    ("[[alerts.sinks]]\ntype = 'syslog'\nhost = 'h'\nfacility = 'local9'", "alerts.sinks[0].facility"),
    ("[alerts]\nsinks = 'jsonl'", "alerts.sinks: expected an array of tables"),
    ("[alerts]\nretry_initial_seconds = 10.0\nretry_max_seconds = 1.0", "must not exceed retry_max_seconds"),
])
def test_errors_name_the_key_and_origin(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        parse(text, tmp_path)
    assert message in str(err.value)
    assert ORIGIN in str(err.value)


def test_tls_sink_settings(tmp_path: Path) -> None:
    text = ("[[alerts.sinks]]\ntype = 'syslog'\nhost = 'siem'\nport = 6514\ntransport = 'tls'\nca_file = 'ca.pem'\n"
            "[[alerts.sinks]]\ntype = 'smtp'\nhost = 'h'\nport = 465\nimplicit_tls = true\nfrom = 'a@b'\n"
            "to = ['x@y']\nusername = 'u'\npassword_env = 'HOME'\n")
    syslog, smtp = parse(text, tmp_path, {"HOME": "pw"}).sinks
    assert isinstance(syslog, SyslogSinkSettings) and syslog.transport == "tls" and syslog.ca_file is not None
    assert isinstance(smtp, SmtpSinkSettings) and smtp.implicit_tls and smtp.ca_file is None


def test_smtp_password_needs_tls(tmp_path: Path) -> None:
    text = ("[[alerts.sinks]]\ntype = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['x@y']\nstarttls = false\n"
            "username = 'u'\npassword_env = 'PW'\n")
    with pytest.raises(SettingsError, match="a password is only sent over TLS"):
        parse(text, tmp_path, {"PW": "secret"})
    assert parse(text.replace("starttls = false", "implicit_tls = true"), tmp_path, {"PW": "secret"}).sinks


def test_empty_secret_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "empty"
    secret.write_text("\n")
    text = f"[[alerts.sinks]]\ntype = 'webhook'\nurl = 'https://x'\nsecret_file = '{secret}'"
    with pytest.raises(SettingsError, match="secret is empty"):
        parse(text, tmp_path)


def test_not_a_table(tmp_path: Path) -> None:
    raw: Any = ["x"]
    with pytest.raises(SettingsError, match="alerts: expected a table"):
        parse_alert_settings(raw, ORIGIN, tmp_path, {})
