"""Separation of duties in production mode: no clinical scope at bootstrap, owned clinical clients only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirvault.cli.main import main
from tests.backup.test_recovery_e2e import fv
from tests.conftest import free_port


def _dir(tmp_path: Path, *, production: bool) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    if production:
        (data / "fhirvault.toml").write_text('mode = "production"\ncountry = "FR"\n')
    return data


def test_production_bootstrap_client_scope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dir(tmp_path, production=True)
    main(["init", "--data-dir", str(data)])
    capsys.readouterr()
    main(["client", "list", "--data-dir", str(data), "--json"])
    (admin,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert admin["scope"] == "fhirvault/registers.read fhirvault/metrics.read"


def test_default_bootstrap_keeps_the_getting_started_scope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dir(tmp_path, production=False)
    main(["init", "--data-dir", str(data)])
    capsys.readouterr()
    main(["client", "list", "--data-dir", str(data), "--json"])
    (admin,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert admin["scope"] == "system/*.cruds"


def test_a_clinical_client_needs_an_owner_and_a_purpose_in_production(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = _dir(tmp_path, production=True)
    main(["init", "--data-dir", str(data)])
    capsys.readouterr()
    assert main(["client", "create", "--data-dir", str(data), "--name", "lab", "--scope", "system/Observation.cr"]) == 2
    assert "needs --owner" in capsys.readouterr().err
    # operational scopes only: no owner needed
    assert main(["client", "create", "--data-dir", str(data), "--name", "prom", "--scope", "fhirvault/metrics.read"]) == 0
    capsys.readouterr()
    assert main(["client", "create", "--data-dir", str(data), "--name", "lab", "--scope", "system/Observation.cr",
                 "--owner", "Lab IT (J. Martin)", "--purpose", "results from the analysers"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["owner"] == "Lab IT (J. Martin)" and out["purpose"] == "results from the analysers"


def test_the_server_refuses_production_while_a_clinical_client_has_no_owner(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = _dir(tmp_path, production=False)  # the default install: admin client with system/*.cruds, no owner
    main(["init", "--data-dir", str(data)])
    client_id = json.loads((data / "admin-client.json").read_text())["client_id"]
    (data / "fhirvault.toml").write_text('mode = "production"\ncountry = "FR"\n')
    # in a process of its own: serve configures logging for the whole process
    r = fv("serve", "--data-dir", str(data), "--port", str(free_port()))
    assert r.returncode == 2
    assert f"production mode: client(s) {client_id} hold clinical scopes without a named owner" in r.stderr
    assert main(["client", "set-owner", "--data-dir", str(data), "--client-id", client_id, "--owner", "IT ops",
                 "--purpose", "initial data load"]) == 0
    from fhirvault.config import load_settings
    from fhirvault.container import build
    from fhirvault.services.client_owners import production_problems

    container = build(load_settings({"data_dir": data}, environ={}))
    try:
        assert production_problems(container.store, "default") == []
    finally:
        container.close()
