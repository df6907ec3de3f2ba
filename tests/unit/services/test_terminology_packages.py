"""Reading FHIR packages: only package/*.json, only CodeSystems and ValueSets, refusals with a reason."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from fhirvault.services.terminology import PackageError, read_package

CS = {"resourceType": "CodeSystem", "url": "https://example.org/cs", "content": "complete", "status": "active",
      "text": {"status": "generated", "div": "<div/>"}}


def tgz(files: dict[str, object], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, doc in files.items():
            raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


MANIFEST = {"package/package.json": {"name": "example.pkg", "version": "0.1.0"}}


def test_reads_code_systems_and_value_sets_only() -> None:
    name, version, found = read_package(tgz({**MANIFEST, "package/CodeSystem-a.json": CS,
                                             "./package/ValueSet-b.json": {"resourceType": "ValueSet",
                                                                           "url": "https://example.org/vs"},
                                             "package/Patient-x.json": {"resourceType": "Patient"},
                                             "package/example/CodeSystem-c.json": {**CS, "url": "https://c"},
                                             "other/CodeSystem-d.json": {**CS, "url": "https://d"}},
                                            links={"package/CodeSystem-link.json": "/etc/passwd"}))
    assert (name, version) == ("example.pkg", "0.1.0")
    assert sorted(r["url"] for r in found) == ["https://example.org/cs", "https://example.org/vs"]
    assert all("text" not in r for r in found)  # narratives are not kept


@pytest.mark.parametrize(("data", "message"), [
    (b"plain text", "not a gzip-compressed tar file"),
    (tgz({"package/CodeSystem-a.json": CS}), "package.json with a name and a version"),
    (tgz({**MANIFEST, "package/Patient-x.json": {"resourceType": "Patient"}}), "no CodeSystem or ValueSet"),
    (tgz({**MANIFEST, "package/CodeSystem-a.json": b"{not json"}), "is not valid JSON"),
])
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        read_package(data)
