"""``fhirvault register ...`` and ``fhirvault compliance report`` on a data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirvault.cli.main import main


def test_register_commands_keep_entries_and_refuse_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["init", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["register", "incident", "open", "--data-dir", data, "--title", "USB key lost",
                 "--detected", "2026-01-10T08:00:00Z", "--reason", "reported by the ward", "--by", "dpo"]) == 0
    inc = json.loads(capsys.readouterr().out)
    assert inc["notificationDue"] == "2026-01-13T08:00:00Z" and inc["notes"][0]["by"] == "dpo"
    assert main(["register", "incident", "list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert inc["id"] in listing and "OVERDUE" in listing
    assert main(["register", "incident", "update", "--data-dir", data, "--id", inc["id"], "--reason", "x"]) == 2
    assert "reason" in capsys.readouterr().err
    assert main(["register", "incident", "update", "--data-dir", data, "--id", inc["id"], "--status", "closed",
                 "--breach", "no", "--reason", "the key was encrypted"]) == 0
    assert json.loads(capsys.readouterr().out)["personalDataBreach"] is False
    assert main(["register", "request", "show", "--data-dir", data, "--id", "dsr-0000000000000000"]) == 2
    assert "no request" in capsys.readouterr().err
    assert main(["register", "processing", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["recipients"][0]["name"] == "admin"
    out = tmp_path / "report.html"
    assert main(["compliance", "report", "--data-dir", data, "--format", "html", "--lang", "fr", "--out", str(out)]) == 0
    assert "1 incident(s), 0 ouvert(s)" in out.read_text()
