"""The files shipped in deploy/ stay valid: the example config loads through the real settings parser,
the systemd unit passes ``systemd-analyze verify`` and keeps its hardening, and the docs name the
alert rules the code raises."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fhirvault.backup import scheduler
from fhirvault.config import load_settings
from fhirvault.services import detection

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _example_config(tmp_path: Path) -> Path:
    """deploy/fhirvault.toml with its absolute paths moved under tmp_path (the secret files it names exist)."""
    text = (DEPLOY / "fhirvault.toml").read_text()
    for prefix in ("/etc/fhirvault/", "/var/lib/fhirvault"):
        text = text.replace(prefix, f"{tmp_path}{prefix}")
    for secret in ("smtp.password", "s3-secret"):
        path = tmp_path / "etc/fhirvault" / secret
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not-a-real-secret\n")
    config = tmp_path / "fhirvault.toml"
    config.write_text(text)
    return config


def test_example_config_loads_through_the_real_parser(tmp_path: Path) -> None:
    settings = load_settings({}, environ={"S3_ACCESS_KEY_ID": "AKIAEXAMPLE"}, config_file=_example_config(tmp_path))
    assert settings.data_dir == tmp_path / "var/lib/fhirvault"
    assert settings.root_key_path == tmp_path / "etc/fhirvault/keys/root.key"
    assert settings.root_key_path.parent != settings.data_dir  # keys apart from the data
    assert (settings.host, settings.port, settings.public_base_url) == ("127.0.0.1", 8080, "https://fhir.clinic.example")
    assert settings.audit_witnesses is not None and settings.audit_witnesses[0].startswith("syslog+tcp://")
    assert settings.backup is not None and set(settings.backup.targets) == {"nas", "offsite"}
    assert all(t.location == "FR" for t in settings.backup.targets.values())
    assert settings.alerts is not None
    assert [type(s).__name__ for s in settings.alerts.sinks] == ["SmtpSinkSettings", "JsonLinesSinkSettings"]


def test_example_config_refuses_what_it_should(tmp_path: Path) -> None:
    """The parser really reads this file: a typo in it is an error, not a silently ignored key."""
    config = _example_config(tmp_path)
    config.write_text(config.read_text().replace("token_ttl_seconds", "token_ttl_secs"))
    with pytest.raises(Exception, match="token_ttl_secs"):
        load_settings({}, environ={"S3_ACCESS_KEY_ID": "x"}, config_file=config)


# Hardening the unit must keep (docs/deployment.md explains each).
REQUIRED = {
    "Unit": {"After": "network-online.target time-sync.target", "Wants": "network-online.target time-sync.target"},
    "Service": {
        "User": "fhirvault", "Group": "fhirvault", "StateDirectory": "fhirvault", "StateDirectoryMode": "0700",
        "UMask": "0077", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "Restart": "on-failure",
    },
    "Install": {"WantedBy": "multi-user.target"},
}


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "fhirvault.service").read_text())
    return parser


def test_unit_file_keeps_its_hardening() -> None:
    unit = _unit()
    for section, keys in REQUIRED.items():
        for key, value in keys.items():
            assert unit.get(section, key, fallback=None) == value, f"[{section}] {key} must be {value!r}"
    exec_start = unit.get("Service", "ExecStart")
    assert exec_start.split()[1:3] == ["serve", "--config"] and exec_start.endswith("/etc/fhirvault/fhirvault.toml")
    paths = unit.get("Service", "ReadWritePaths").split()
    assert all(p.lstrip("-").startswith("/mnt/") for p in paths), "the only extra writable path is the backup share"


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    """systemd's own checks, where systemd is installed (Debian's systemd package ships systemd-analyze);
    the key checks above run everywhere."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (it is only used to check the unit)")
    # verify checks that ExecStart is executable: point it at a stand-in.
    stand_in = tmp_path / "fhirvault"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "fhirvault.service"
    unit.write_text((DEPLOY / "fhirvault.service").read_text().replace("/opt/fhirvault/bin/fhirvault", str(stand_in)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "fhirvault.service" not in r.stderr, r.stderr
    r = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                       timeout=60, check=False)
    match = re.search(r"Overall exposure level for fhirvault.service: ([0-9.]+) (\w+)", r.stdout)
    assert match, r.stdout + r.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) == "OK", match.group(0)


def test_docs_name_the_alert_rules_the_code_raises() -> None:
    rules = {v for m in (detection, scheduler) for k, v in vars(m).items()
             if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z]+(_[a-z]+)+", v)}
    assert {"audit_verification_failed", "backup_stale", "brute_force"} <= rules
    for doc in ("audit.md", "alerting.md", "disaster-recovery.md", "deployment.md"):
        text = (ROOT / "docs" / doc).read_text()
        named = set(re.findall(r"`([a-z]+(?:_[a-z]+)+)` alert", text))
        named |= set(re.findall(r"alert \(?`?([a-z]+(?:_[a-z]+)+)`?\)?", text))
        assert named <= rules, f"docs/{doc} names unknown alert rules: {sorted(named - rules)}"
