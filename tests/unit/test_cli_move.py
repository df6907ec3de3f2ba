"""``fhirvault move`` refuses to switch the configuration when the proof fails (no database needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.backup import move as move_module
from fhirvault.backup.move import MoveReport
from fhirvault.bootstrap import initialise
from fhirvault.cli.main import main
from fhirvault.config import load_settings

URL = "postgresql://fv:s3cret@127.0.0.1:1/clinic"


def test_a_copy_that_differs_leaves_the_configuration_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    initialise(load_settings({"data_dir": data}, environ={}))
    (data / "fhirvault.toml").write_text('log_level = "info"\n')
    calls: list[Path] = []

    def lossy(source: object, target: object, sink: object, staging: Path) -> MoveReport:
        calls.append(staging)
        return MoveReport(mismatches=["fhirvault.sqlite3/clients: 2 rows (sha256 x) in the source, 1 rows …"])

    monkeypatch.setattr(move_module, "move", lossy)
    assert main(["move", "--data-dir", str(data), "--to", URL]) == 1
    out = capsys.readouterr()
    assert calls == [data]
    assert "the configuration was not changed" in out.err and "clients" in out.err
    assert "s3cret" not in out.out + out.err
    assert (data / "fhirvault.toml").read_text() == 'log_level = "info"\n'
    assert not (data / "fhirvault.toml.before-move").exists()
