"""NDJSON bulk import: a file of resources, validated line by line, written all-or-nothing.

The fast path does all the per-resource work (JSON parsing, validation, search tags, encryption)
outside the store's writer, then writes the whole file in one store job: one database transaction,
so a file is either entirely stored or not at all (a bad line anywhere, even the last, stores
nothing). Ids come from the file (PUT semantics: a new resource or a new version of an existing
one, update-as-create). Search tags are written with each resource, as for any write, so a search
sees every resource of a file as soon as its import is acknowledged.

Audit (what an HDS auditor needs to answer "who put this data here, when, from what"): one
``import`` entry for the file (the client, the source, its SHA-256, the counts by type), and one
entry per patient compartment the file wrote into, so a patient's access history
(``Patient/$access-history``) shows that an import touched their record. Per-resource entries would
multiply the log by the size of the import without telling more: the file hash identifies every
resource written, and each version's ``meta.source`` names the import.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.domain.compartment import patient_of
from fhirvault.domain.errors import Issue
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import is_resource_type
from fhirvault.ports import ResourceStore, StoredVersion, VersionConflict, WriteTx
from fhirvault.services.keys import TENANT_COMPARTMENT, DataKey, KeyRing, patient_compartment
from fhirvault.services.relationships import WATCHED_TYPES, relationship_change
from fhirvault.services.repository import (
    ConcurrentChange,
    Repository,
    RequestContext,
    resource_aad,
)
from fhirvault.services.search_index import SearchIndex

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
MAX_LINE_BYTES = 8 << 20  # a single resource larger than this is refused (its line only)
MAX_ERRORS = 1000  # per file: beyond this the file is abandoned with a last error saying so
_RETRIES = 3


@dataclass(frozen=True, slots=True)
class LineError:
    """Why line ``line`` (1-based) of a file was refused."""

    line: int
    issues: tuple[Issue, ...]

    def outcome(self) -> dict[str, Any]:
        """The OperationOutcome of the error file: one per line, the line in each issue's location."""
        out = []
        for i in self.issues:
            doc = i.to_fhir()
            doc["location"] = [f"Line[{self.line}]"]
            doc["diagnostics"] = f"line {self.line}: {i.diagnostics}"
            out.append(doc)
        return {"resourceType": "OperationOutcome", "issue": out}


@dataclass(slots=True)
class FileOutcome:
    """The result of one file: committed (every resource stored) or not (nothing stored)."""

    source: str
    sha256: str
    lines: int
    committed: bool
    counts: dict[str, int] = field(default_factory=dict)  # stored resources by type
    errors: list[LineError] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class _Item:
    line: int
    type: str
    id: str
    body: dict[str, Any]
    compartment: str
    base_tags: list[bytes]  # every tag but those of the stamped meta
    key: DataKey | None = None
    tags: list[bytes] = field(default_factory=list)
    expect: int = 0  # the current version when prepared (0: none); the stored one is expect + 1
    blob: bytes = b""


def may_import(principal: Any, tenant: str, types: Iterable[str]) -> str | None:
    """None if the caller may bulk-import these types, else why not.

    Only backend services and admin clients (system-level scopes, no user behind the token) may:
    an import bypasses the per-resource relationship checks a user's write goes through."""
    if principal is None or principal.tenant != tenant:
        return "no valid token for this tenant"
    if principal.user is not None or principal.role is not None:
        return "bulk import is for backend services (system scopes), not user tokens"
    if any(s.query for s in principal.grants.scopes):
        return "bulk import needs unrestricted system scopes"
    for rtype in types:
        if not (principal.grants.allows(rtype, "c") and principal.grants.allows(rtype, "u")):
            return f"the token's system scopes do not allow creating and updating {rtype}"
    return None


def data_keys(store: ResourceStore, keys: KeyRing, compartments: set[str]) -> dict[str, DataKey]:
    """The data key of every compartment; the missing ones are created in one transaction first
    (a key without data, if the import then fails, is harmless: that is what single writes do)."""
    missing = sorted(c for c in compartments if keys.cached_for(c) is None)
    if missing:
        def create(tx: WriteTx) -> list[tuple[DataKey, bytes]]:
            return [keys.get_or_create_in_tx(tx, c) for c in missing]

        for key, lookup in store.write_sync("keys.data-key", create):
            keys.remember(key, lookup)
    return {c: keys.for_compartment_sync(c) for c in compartments}


class FileIndex(SearchIndex):
    """The search index with its tags remembered for the length of one file: bulk data repeats the
    same terms (codes, statuses, the patient reference of every resource of a patient) about ten
    times in a hundred, and the HMAC of each is half the cost of indexing. Dropped with the file,
    so no plaintext term outlives it."""

    def __init__(self, keys: KeyRing) -> None:
        super().__init__(keys)
        self._memo: dict[tuple[str, str, bytes], bytes] = {}

    def tags(self, rtype: str, code: str, terms: Iterable[bytes]) -> list[bytes]:
        memo = self._memo
        out = []
        for term in terms:
            tag = memo.get((rtype, code, term))
            if tag is None:
                tag = memo[(rtype, code, term)] = super().tags(rtype, code, (term,))[0]
            out.append(tag)
        return out


def _refusal(issue: Issue) -> tuple[Issue, ...]:
    return (issue,)


class BulkImporter:
    """Imports NDJSON files through the repository's validation, keys, index and audit trail."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        # The repository's own parts: an import applies exactly the rules of a single write (the lead may
        # prefer a public accessor on Repository for these).
        self._store = repo._store
        self._keys = repo._keys
        self._audit = repo._audit
        self._clock = repo._clock

    async def authorize(self, ctx: RequestContext, types: Iterable[str], entity: str) -> None:
        """Refuse (audited, 403) unless the caller is a backend service allowed to write these types."""
        why = may_import(ctx.principal, self._repo.tenant, types)
        if why is not None:
            await self._repo.audit_event(ctx, "import", 403, why, entity=entity)
            raise errors.forbidden(f"Access denied: {why}.")

    def parse(self, data: bytes, expected_type: str | None,
              index: SearchIndex) -> tuple[list[_Item], list[LineError], int]:
        """Every line parsed, validated and indexed; the refused lines with their reasons."""
        items: list[_Item] = []
        problems: list[LineError] = []
        last = 0  # the last line with content (a final newline ends a line, it does not start one)
        for number, raw in enumerate(data.split(b"\n"), start=1):
            line = raw.strip()
            if not line:
                continue
            last = number
            if len(problems) >= MAX_ERRORS:
                problems.append(LineError(number, _refusal(Issue(
                    "error", "too-costly", f"more than {MAX_ERRORS} refused lines: the rest was not examined"))))
                break
            item = self._item(number, line, expected_type, problems, index)
            if item is not None:
                items.append(item)
        return items, problems, last

    def _item(self, number: int, line: bytes, expected_type: str | None, problems: list[LineError],
              index: SearchIndex) -> _Item | None:
        def refuse(code: str, message: str, expression: str | None = None) -> None:
            problems.append(LineError(number, _refusal(Issue("error", code, message,
                                                             (expression,) if expression else ()))))

        if len(line) > MAX_LINE_BYTES:
            refuse("too-costly", f"the line is longer than {MAX_LINE_BYTES} bytes")
            return None
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError:
            refuse("structure", "the line is not valid JSON")
            return None
        if not isinstance(body, dict):
            refuse("structure", "the line is not a JSON object")
            return None
        rtype = body.get("resourceType")
        if not isinstance(rtype, str) or not is_resource_type(rtype):
            refuse("invalid", "unknown or missing resourceType", "resourceType")
            return None
        if expected_type is not None and rtype != expected_type:
            refuse("invalid", f"a {rtype} in a file declared as {expected_type}", "resourceType")
            return None
        if rtype == "AuditEvent":
            refuse("forbidden", "AuditEvents are written only by the server", "resourceType")
            return None
        rid = body.get("id")
        if not isinstance(rid, str) or not _ID.match(rid):
            refuse("required", "each resource needs an id (1-64 of A-Z a-z 0-9 - .): ids are kept", "id")
            return None
        issues = self._repo.validation_issues(rtype, body)  # the rules of any write
        if issues:
            problems.append(LineError(number, tuple(issues)))
            return None
        pid = patient_of(rtype, body)
        compartment = patient_compartment(pid) if pid else TENANT_COMPARTMENT
        tags = index.resource_tags(rtype, body, skip=frozenset({"_lastUpdated"}))
        return _Item(number, rtype, rid, body, compartment, tags)

    def _keys_for(self, items: list[_Item]) -> None:
        found = data_keys(self._store, self._keys, {i.compartment for i in items})
        for item in items:
            item.key = found[item.compartment]

    def _seal(self, items: list[_Item], now: int, source: str, index: SearchIndex) -> None:
        """Stamp, encrypt and finish the tags of each item, numbering versions from the store."""
        tenant = self._repo.tenant
        stamp = instant(now)
        latest: dict[tuple[str, str], int] = {}
        for item in items:
            ref = (item.type, item.id)
            if ref in latest:  # the same resource twice in a file: consecutive versions
                item.expect = latest[ref]
            else:
                current = self._store.read_current(tenant, item.type, item.id)
                item.expect = current.version if current else 0
            version = latest[ref] = item.expect + 1
            meta = {k: v for k, v in (item.body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
            meta["versionId"] = str(version)
            meta["lastUpdated"] = stamp
            meta.setdefault("source", source)
            item.body["meta"] = meta
            key = item.key
            assert key is not None
            item.blob = key.aead.seal(orjson.dumps(item.body),
                                      resource_aad(tenant, item.type, item.id, version, key.key_id))
            item.tags = item.base_tags + index.param_tags(item.type, "_lastUpdated", item.body)

    def _job(self, ctx: RequestContext, items: list[_Item], now: int, outcome: FileOutcome,
             job_id: str | None) -> Callable[[WriteTx], None]:
        repo = self._repo
        tenant = repo.tenant

        def job(tx: WriteTx) -> None:
            seen: dict[tuple[str, str], int] = {}
            bodies: dict[tuple[str, str], dict[str, Any] | None] = {}  # the version before, watched types
            patients: dict[str, int] = {}
            for item in items:
                ref = (item.type, item.id)
                if ref not in seen:
                    current = tx.current(tenant, item.type, item.id)
                    if (current.version if current else 0) != item.expect:
                        raise ConcurrentChange()  # written meanwhile: prepare the file again
                    if item.type in WATCHED_TYPES:
                        alive = current is not None and not current.deleted
                        bodies[ref] = orjson.loads(repo.open_version(current)) if current is not None and alive else None
                if item.type in WATCHED_TYPES:
                    # Relationship sources (CareTeam, Encounter…): the caches they feed are dropped at COMMIT.
                    change = relationship_change(item.type, bodies.get(ref), item.body)
                    if change is not None:
                        repo._relationship_changed(tx, change)
                    bodies[ref] = item.body
                seen[ref] = item.expect + 1
                assert item.key is not None
                tx.insert_version(tenant, StoredVersion(item.type, item.id, item.expect + 1, now, False,
                                                        item.key.key_id, item.blob))
                if item.compartment != TENANT_COMPARTMENT:
                    patients[item.compartment] = patients.get(item.compartment, 0) + 1
            for item in items:
                if seen.get((item.type, item.id)) == item.expect + 1:  # the last version of each resource
                    tx.set_search_tags(tenant, item.type, item.id, item.tags)
            where = f"$import/{job_id}" if job_id else "$import"
            counts = ", ".join(f"{t} {n}" for t, n in sorted(outcome.counts.items()))
            repo._audit.record(tx, repo._record(
                ctx, "import", 200, entity=where, result_count=len(items),
                detail=f"file sha256={outcome.sha256} lines={outcome.lines}: {counts}"[:1000],
                query=outcome.source[:500]))
            for compartment, n in sorted(patients.items()):
                patient = "Patient/" + compartment[len("patient/"):]
                repo._audit.record(tx, repo._record(ctx, "import", 200, entity=where, patient=patient,
                                                    result_count=n, detail=f"file sha256={outcome.sha256}"))

        return job

    def import_file(self, ctx: RequestContext, source: str, data: bytes, *, expected_type: str | None = None,
                    job_id: str | None = None) -> FileOutcome:
        """Import one NDJSON file (blocking: run it in a worker thread). All or nothing."""
        digest = hashlib.sha256(data).hexdigest()
        index = FileIndex(self._keys)
        items, problems, lines = self.parse(data, expected_type, index)
        outcome = FileOutcome(source, digest, lines, False, errors=problems)
        if problems or not items:
            outcome.committed = not problems  # an empty file is stored entirely, trivially
            return outcome
        for item in items:
            outcome.counts[item.type] = outcome.counts.get(item.type, 0) + 1
        self._keys_for(items)
        label = f"fhirvault-import:{job_id}" if job_id else "fhirvault-import"
        for attempt in range(_RETRIES):
            now = self._clock.now_ms()
            self._seal(items, now, label, index)
            try:
                self._store.write_sync("resource.import", self._job(ctx, items, now, outcome, job_id))
            except (ConcurrentChange, VersionConflict):
                if attempt == _RETRIES - 1:
                    raise ConcurrentChange() from None
                continue
            outcome.committed = True
            return outcome
        raise ConcurrentChange()
