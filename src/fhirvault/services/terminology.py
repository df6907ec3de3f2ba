"""Terminology service: the bundled R4 code systems and value sets plus packages loaded by the operator.

Packages (npm-style FHIR packages, ``package/*.json``) are stored in the database's ``meta``
table, so every worker and every node of a shared PostgreSQL sees them and backups carry them.
They are stored in clear (gzip-compressed JSON): code systems and value sets are published
reference data, not patient data. Each request compares the small package index row with the
one it last built from; a change (a load in another process) rebuilds the in-memory view.

The bundled table is read on first use only (a server that never answers a terminology request
never decompresses it).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
import uuid
from importlib import resources
from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import instant
from fhirvault.domain.terminology import Terminology, TerminologyError
from fhirvault.domain.validation import Validator
from fhirvault.ports import Clock, ResourceStore

DATA_FILE = "valuesets.json.gz"
INDEX_META = "terminology.packages"
PACKAGE_META = "terminology.package."
MAX_PACKAGE_BYTES = 64 * 1024 * 1024  # compressed .tgz
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_COUNT = 1000  # $expand page size when count is absent or larger

_base_lock = threading.Lock()
_base: list[dict[str, Any]] | None = None


def base_resources() -> list[dict[str, Any]]:
    """The R4 CodeSystems and ValueSets (scripts/gen_terminology.py), read once."""
    global _base
    if _base is None:
        with _base_lock:
            if _base is None:
                raw = resources.files("fhirvault.domain.r4").joinpath(DATA_FILE).read_bytes()
                data = orjson.loads(gzip.decompress(raw))
                if data.get("format") != 1:
                    raise RuntimeError(f"{DATA_FILE}: unsupported format {data.get('format')!r}")
                _base = data["resources"]
    return _base


class PackageError(Exception):
    """The file is not a usable FHIR package."""


def read_package(data: bytes) -> tuple[str, str, list[dict[str, Any]]]:
    """(name, version, CodeSystems and ValueSets) of an npm-style FHIR package (.tgz)."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"the package is larger than {MAX_PACKAGE_BYTES // (1024 * 1024)} MiB")
    manifest: dict[str, Any] | None = None
    found: list[dict[str, Any]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            manifest = _read_members(archive, found)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"not a gzip-compressed tar file ({exc})") from None
    if manifest is None or not isinstance(manifest.get("name"), str) or not isinstance(manifest.get("version"), str):
        raise PackageError("package/package.json with a name and a version is missing")
    if not found:
        raise PackageError("the package holds no CodeSystem or ValueSet")
    return manifest["name"], manifest["version"], found


def _read_members(archive: tarfile.TarFile, found: list[dict[str, Any]]) -> dict[str, Any] | None:
    manifest: dict[str, Any] | None = None
    unpacked = 0
    for member in archive:
        # Only regular files directly under package/ are read (no links, no paths elsewhere).
        name = member.name.removeprefix("./")
        if not member.isfile() or not name.startswith("package/") or "/" in name[8:] or not name.endswith(".json"):
            continue
        unpacked += member.size
        if unpacked > MAX_UNPACKED_BYTES:
            raise PackageError("the package unpacks to more than 512 MiB")
        fh = archive.extractfile(member)
        if fh is None:
            continue
        try:
            doc = orjson.loads(fh.read())
        except orjson.JSONDecodeError:
            raise PackageError(f"{name} is not valid JSON") from None
        if name == "package/package.json":
            manifest = doc if isinstance(doc, dict) else None
        elif isinstance(doc, dict) and doc.get("resourceType") in ("CodeSystem", "ValueSet") \
                and isinstance(doc.get("url"), str):
            found.append({k: v for k, v in doc.items() if k not in ("text", "contact")})
    return manifest


class TerminologyService:
    def __init__(self, store: ResourceStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._index_raw: bytes | None = b"-"  # never a stored value: the first call builds
        self._terms: Terminology | None = None

    # -- packages ------------------------------------------------------------------------
    def packages(self) -> list[dict[str, Any]]:
        raw = self._store.get_meta(INDEX_META)
        return list(orjson.loads(raw)) if raw else []

    def load_package(self, data: bytes) -> dict[str, Any]:
        """Stores a package (replacing an earlier load of the same name); returns its index row."""
        name, version, found = read_package(data)
        blob = gzip.compress(orjson.dumps(found), 6, mtime=0)
        row = {"name": name, "version": version, "loaded": instant(self._clock.now_ms()),
               "codeSystems": sum(1 for r in found if r["resourceType"] == "CodeSystem"),
               "valueSets": sum(1 for r in found if r["resourceType"] == "ValueSet")}

        def job(tx: Any) -> None:
            raw = tx.get_meta(INDEX_META)
            rows = [r for r in (orjson.loads(raw) if raw else []) if r["name"] != name]
            tx.set_meta(PACKAGE_META + name, blob)
            tx.set_meta(INDEX_META, orjson.dumps([*rows, row]))

        self._store.write_sync("terminology.load", job)
        return row

    def terminology(self) -> Terminology:
        """The current view: bundled R4, then the loaded packages in load order (later ones win)."""
        raw = self._store.get_meta(INDEX_META)
        terms = self._terms
        if terms is not None and raw == self._index_raw:
            return terms
        with self._lock:
            if self._terms is not None and raw == self._index_raw:
                return self._terms
            loaded: list[dict[str, Any]] = []
            for row in orjson.loads(raw) if raw else []:
                blob = self._store.get_meta(PACKAGE_META + row["name"])
                if blob is not None:
                    loaded.extend(orjson.loads(gzip.decompress(blob)))
            self._terms = Terminology([*base_resources(), *loaded])
            self._index_raw = raw
            return self._terms

    # -- operations ----------------------------------------------------------------------
    def holds(self, kind: str, rid: str) -> bool:
        """Whether a bundled or loaded resource has this id."""
        return self.terminology().url_of(kind, rid) is not None

    def run(self, rtype: str, rid: str | None, name: str, query: list[tuple[str, str]],
            body: Any, stored: dict[str, Any] | None = None) -> dict[str, Any]:
        """One terminology operation; a Parameters (or ValueSet) resource, or an OperationOutcomeError.

        ``stored`` is the ValueSet [id] names when it is not a bundled or loaded one but stored in the
        repository (the caller read it)."""
        params = _Params(query, body)
        try:
            terms = self.terminology()
            if name == "$lookup" and rtype == "CodeSystem":
                return self._lookup(terms, rid, params)
            if name == "$expand" and rtype == "ValueSet":
                return self._expand(terms, rid, params, stored)
            if name == "$validate-code" and rtype == "ValueSet":
                vs = stored or self._value_set(terms, rid, params)
                return terms.validate_in_value_set(vs, params.codings())
            if name == "$validate-code" and rtype == "CodeSystem":
                url = self._url(terms, "CodeSystem", rid, params)
                return terms.validate_in_code_system(url, params.text("version"), params.codings())
        except TerminologyError as exc:
            raise errors.OperationOutcomeError(exc.status, [errors.Issue("error", exc.code, exc.message)]) from None
        raise errors.not_found(f"{name} is not served on {rtype}.")

    @staticmethod
    def _url(terms: Terminology, kind: str, rid: str | None, params: _Params) -> str:
        if rid is not None:
            url = terms.url_of(kind, rid)
            if url is None:
                raise TerminologyError(f"No {kind} with this id on this server.", code="not-found", status=404)
            return url
        url = params.text("url") or (params.text("system") if kind == "CodeSystem" else None)
        if url is None:
            raise errors.bad_request(f"Name the {kind} with the 'url' parameter (or call {kind}/[id]/...).", "url")
        return url

    def _value_set(self, terms: Terminology, rid: str | None, params: _Params) -> dict[str, Any]:
        given = params.resource("valueSet")
        if given is not None and rid is None:
            if given.get("resourceType") != "ValueSet":
                raise errors.bad_request("The 'valueSet' parameter must hold a ValueSet.", "valueSet")
            issues = Validator.default().validate(given)  # a client's value set: R4-valid before use
            if issues:
                raise errors.unprocessable([errors.Issue("error", i.code, i.message, (i.path,) if i.path else ())
                                            for i in issues])
            return given
        return terms.value_set(self._url(terms, "ValueSet", rid, params), params.text("valueSetVersion"))

    def _lookup(self, terms: Terminology, rid: str | None, params: _Params) -> dict[str, Any]:
        coding = params.coding("coding")
        system = params.text("system") or (coding or {}).get("system")
        code = params.text("code") or (coding or {}).get("code")
        if rid is not None:
            system = self._url(terms, "CodeSystem", rid, params)
        if not isinstance(system, str) or not isinstance(code, str):
            raise errors.bad_request("$lookup needs system and code (or coding).", "code")
        return terms.lookup(system, code, params.text("version"), params.texts("property") or None)

    def _expand(self, terms: Terminology, rid: str | None, params: _Params,
                stored: dict[str, Any] | None) -> dict[str, Any]:
        vs = stored or self._value_set(terms, rid, params)
        offset = params.integer("offset") or 0
        count = params.integer("count")
        count = MAX_COUNT if count is None else min(count, MAX_COUNT)
        text = params.text("filter")
        active = params.boolean("activeOnly") or False
        echo: list[dict[str, Any]] = []
        if text:
            echo.append({"name": "filter", "valueString": text})
        echo += [{"name": "offset", "valueInteger": offset}, {"name": "count", "valueInteger": count}]
        if active:
            echo.append({"name": "activeOnly", "valueBoolean": True})
        return terms.expand(vs, text=text, offset=offset, count=count, active_only=active, echo=echo,
                            timestamp=instant(self._clock.now_ms()), identifier=f"urn:uuid:{uuid.uuid4()}")


class _Params:
    """Operation parameters from the query string and/or a Parameters body (body values win)."""

    def __init__(self, query: list[tuple[str, str]], body: Any) -> None:
        self._values: dict[str, list[Any]] = {}
        for k, v in query:
            if k not in ("_format", "_pretty"):
                self._values.setdefault(k, []).append(v)
        if body is None:
            return
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise errors.bad_request("The operation takes a Parameters resource.", code="structure")
        for p in body.get("parameter") or []:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise errors.bad_request("Parameters.parameter must be objects with a name.", code="structure")
            value = p.get("resource")
            if value is None:
                value = next((v for k, v in p.items() if k.startswith("value")), None)
            self._values.setdefault(p["name"], []).append(value)

    def _one(self, name: str) -> Any:
        values = self._values.get(name) or []
        if len(values) > 1:
            raise errors.bad_request(f"The parameter '{name}' is given more than once.", name)
        return values[0] if values else None

    def text(self, name: str) -> str | None:
        value = self._one(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise errors.bad_request(f"The parameter '{name}' must be a non-empty string.", name)
        return value

    def texts(self, name: str) -> list[str]:
        return [v for v in self._values.get(name) or [] if isinstance(v, str)]

    def integer(self, name: str) -> int | None:
        value = self._one(name)
        if isinstance(value, str) and value.isdigit() and len(value) <= 9:
            return int(value)
        if value is None or (type(value) is int and 0 <= value < 10**9):
            return value
        raise errors.bad_request(f"The parameter '{name}' must be a non-negative integer.", name)

    def boolean(self, name: str) -> bool | None:
        value = self._one(name)
        if value in ("true", "false"):
            return bool(value == "true")
        if value is None:
            return None
        if isinstance(value, bool):
            return value is True
        raise errors.bad_request(f"The parameter '{name}' must be true or false.", name)

    def resource(self, name: str) -> dict[str, Any] | None:
        value = self._one(name)
        if value is not None and not isinstance(value, dict):
            raise errors.bad_request(f"The parameter '{name}' must hold a resource.", name)
        return value

    def coding(self, name: str) -> dict[str, Any] | None:
        value = self._one(name)
        if value is not None and not isinstance(value, dict):
            raise errors.bad_request(f"The parameter '{name}' must be a Coding.", name)
        return value

    def codings(self) -> list[dict[str, Any]]:
        """$validate-code's concept: code (+ system, display), a coding, or a codeableConcept."""
        code = self.text("code")
        if code is not None:
            return [{"code": code, "system": self.text("system"), "display": self.text("display")}]
        coding = self.coding("coding")
        if coding is not None:
            return [coding]
        concept = self.coding("codeableConcept")
        if concept is not None and isinstance(concept.get("coding"), list):
            return [c for c in concept["coding"] if isinstance(c, dict)]
        raise errors.bad_request("$validate-code needs code (with system), coding or codeableConcept.", "code")
