"""$import inputs: only regular files inside the import directory; manifests parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.fhir.bulk_import_api import parse_manifest, resolve_input


def test_a_symlink_leading_out_of_the_import_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "import"
    root.mkdir()
    secret = tmp_path / "root.key"
    secret.write_text("k")
    (root / "inside.ndjson").write_text("{}\n")
    (root / "link.ndjson").symlink_to(secret)
    (root / "sub").mkdir()
    assert resolve_input(root, "inside.ndjson") == (root / "inside.ndjson").resolve()
    assert resolve_input(root, f"file://{root}/inside.ndjson") == (root / "inside.ndjson").resolve()
    for url in ("link.ndjson", "sub", ".", "", "file:///etc/hostname", "ftp://x/y"):
        with pytest.raises(OperationOutcomeError) as caught:
            resolve_input(root, url)
        assert caught.value.status == 400


def test_manifest_parsing() -> None:
    source, inputs = parse_manifest({"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "inputSource", "valueUri": "https://ehr.example.org"},
        {"name": "input", "part": [{"name": "url", "valueUrl": "a.ndjson"}]},
        {"name": "input", "part": [{"name": "type", "valueCode": "Patient"}, {"name": "url", "valueUri": "b"}]}]})
    assert source == "https://ehr.example.org"
    assert inputs == [(None, "a.ndjson"), ("Patient", "b")]
    for bad in ({"resourceType": "Bundle"},
                {"resourceType": "Parameters", "parameter": [{"name": "inputFormat", "valueCode": "text/csv"},
                                                             {"name": "input", "part": [{"name": "url",
                                                                                         "valueUri": "a"}]}]},
                {"resourceType": "Parameters", "parameter": [{"name": "input", "part": []}]},
                {"resourceType": "Parameters", "parameter": [{"name": "surprise", "valueString": "x"}]},
                {"resourceType": "Parameters", "parameter": "x"}):
        with pytest.raises(OperationOutcomeError):
            parse_manifest(bad)
