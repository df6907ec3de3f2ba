"""The repository: policy → validate → encrypt → store → audit, in one transaction.

Every FHIR interaction on resources goes through here, so access decisions,
validation, encryption and the audit trail cannot be bypassed by another
route. Resource JSON is encrypted with the data key of its patient
compartment; associated data binds each blob to (tenant, type, id, version,
key id).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonpatch
import orjson

from fhirvault.domain import errors
from fhirvault.domain.compartment import patient_of
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import is_resource_type
from fhirvault.domain.validation import Validator
from fhirvault.ports import Clock, HistoryQuery, ResourceStore, StoredVersion, WriteTx
from fhirvault.services.audit import AuditRecord, TableAuditLog, outcome_for
from fhirvault.services.auth import Principal
from fhirvault.services.crypto import DecryptionError, associated_data
from fhirvault.services.keys import (
    TENANT_COMPARTMENT,
    DataKey,
    KeyError_,
    KeyRing,
    patient_compartment,
)

_MAX_PATCH_RETRIES = 5


@dataclass(frozen=True, slots=True)
class RequestContext:
    principal: Principal | None
    request_id: str
    source_ip: str | None = None


@dataclass(frozen=True, slots=True)
class ResourceResult:
    type: str
    id: str
    version: int
    last_updated_ms: int
    body: bytes  # the resource JSON as stored (plaintext)
    created: bool = False


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    version: StoredVersion
    body: bytes | None  # None for a deletion


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: list[HistoryEntry]
    next_before_seq: int | None
    total: int | None


def resource_aad(tenant: str, type: str, id: str, version: int, key_id: str) -> bytes:
    return associated_data("resource", tenant, type, id, version, key_id)


def _etag_version(version: int | None, current: StoredVersion | None) -> None:
    """If-Match check: the client's version must be the current one."""
    if version is None:
        return
    if current is None or current.deleted:
        raise errors.precondition_failed("If-Match given but the resource does not exist")
    if current.version != version:
        raise errors.precondition_failed(
            f"version conflict: If-Match names version {version}, current is {current.version}"
        )


class Repository:
    def __init__(self, store: ResourceStore, keys: KeyRing, audit: TableAuditLog, validator: Validator,
                 clock: Clock, *, tenant: str, allow_unknown_elements: bool = False) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit
        self._validator = validator
        self._clock = clock
        self.tenant = tenant
        self._lenient = allow_unknown_elements

    # -- policy ----------------------------------------------------------------
    async def authorize(self, ctx: RequestContext, rtype: str, permission: str, interaction: str,
                        entity: str | None = None) -> None:
        """Default deny: the token's SMART scopes must grant ``permission`` on ``rtype``."""
        p = ctx.principal
        if p is not None and p.tenant == self.tenant and p.grants.allows(rtype, permission):
            return
        detail = f"scope does not allow '{permission}' on {rtype}"
        await self.audit_event(ctx, interaction, 403, detail, entity=entity)
        raise errors.forbidden(f"Access denied: the token's scopes do not allow this interaction on {rtype}.")

    async def audit_event(self, ctx: RequestContext, interaction: str, status: int, detail: str,
                          entity: str | None = None) -> None:
        """Record an event that is not a resource write: a refusal, a token issued…"""
        record = self._record(ctx, interaction, status, entity=entity, detail=detail)
        await self._store.write("audit.event", lambda tx: self._audit.record(tx, record))

    async def remember_assertion(self, assertion_id: str, expires_ms: int) -> bool:
        """Record a client assertion id; False if it was seen before (a replay)."""
        now = self._clock.now_ms()
        return await self._store.write("oauth.jti", lambda tx: tx.remember_jti(assertion_id, expires_ms, now))

    def _record(self, ctx: RequestContext, interaction: str, status: int, *, entity: str | None = None,
                patient: str | None = None, query: str | None = None, detail: str | None = None) -> AuditRecord:
        return AuditRecord(
            ts_ms=self._clock.now_ms(), interaction=interaction, outcome=outcome_for(status), status=status,
            request_id=ctx.request_id, client_id=ctx.principal.client_id if ctx.principal else None,
            source_ip=ctx.source_ip, entity=entity, patient=patient, query=query, detail=detail,
        )

    # -- helpers -----------------------------------------------------------------
    def check_type(self, rtype: str) -> None:
        if not is_resource_type(rtype):
            raise errors.not_found("Unknown resource type.")

    def _validate(self, rtype: str, body: dict[str, Any]) -> None:
        found = body.get("resourceType")
        if found != rtype:
            raise errors.bad_request("resourceType in the body does not match the URL.", "resourceType")
        issues = self._validator.validate(body, allow_unknown_elements=self._lenient)
        if issues:
            raise errors.unprocessable(
                [Issue("error", i.code, i.message, (i.path,) if i.path else ()) for i in issues]
            )

    async def _key_for(self, rtype: str, body: dict[str, Any]) -> DataKey:
        pid = patient_of(rtype, body)
        return await self._keys.for_compartment(patient_compartment(pid) if pid else TENANT_COMPARTMENT)

    def _open(self, v: StoredVersion) -> bytes:
        try:
            key = self._keys.by_id(v.key_id)
            return key.aead.open(v.blob, resource_aad(self.tenant, v.type, v.id, v.version, v.key_id))
        except (DecryptionError, KeyError_) as exc:
            # Tampered row, swapped blob or destroyed key: never serve it, never guess.
            raise IntegrityError(f"{v.type} version failed its integrity check: {type(exc).__name__}") from None

    def _patient_ref(self, key_id: str) -> str | None:
        if not key_id:
            return None
        compartment = self._keys.by_id(key_id).compartment
        return "Patient/" + compartment[len("patient/"):] if compartment.startswith("patient/") else None

    def _seal_job(self, ctx: RequestContext, interaction: str, rtype: str, rid: str, body: dict[str, Any],
                  key: DataKey, if_match: int | None, *, must_exist: bool = False,
                  expect_version: int | None = None, status_new: int = 201, status_old: int = 200,
                  ) -> Callable[[WriteTx], ResourceResult]:
        """A write job: checks versions, stamps meta, encrypts, stores the version and its audit record."""
        tenant = self.tenant

        def job(tx: WriteTx) -> ResourceResult:
            current = tx.current(tenant, rtype, rid)
            _etag_version(if_match, current)
            if expect_version is not None and (current is None or current.version != expect_version):
                raise _Retry()
            if must_exist and (current is None or current.deleted):
                raise errors.not_found("Resource not found.")
            version = current.version + 1 if current else 1
            now = self._clock.now_ms()
            meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
            meta["versionId"] = str(version)
            meta["lastUpdated"] = instant(now)
            body["meta"] = meta
            body["id"] = rid
            plaintext = orjson.dumps(body)
            blob = key.aead.seal(plaintext, resource_aad(tenant, rtype, rid, version, key.key_id))
            tx.insert_version(tenant, StoredVersion(rtype, rid, version, now, False, key.key_id, blob))
            created = current is None or current.deleted
            status = status_new if created else status_old
            patient = self._patient_ref(key.key_id)
            self._audit.record(tx, self._record(ctx, interaction, status, entity=f"{rtype}/{rid}/_history/{version}",
                                                patient=patient))
            return ResourceResult(rtype, rid, version, now, plaintext, created)

        return job

    # -- interactions ----------------------------------------------------------
    async def create(self, ctx: RequestContext, rtype: str, body: dict[str, Any]) -> ResourceResult:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "c", "create")
        body.pop("id", None)  # R4: the server assigns the id and ignores one in the body
        self._validate(rtype, body)
        rid = str(uuid.uuid4())
        body["id"] = rid
        key = await self._key_for(rtype, body)
        return await self._store.write("resource.create", self._seal_job(ctx, "create", rtype, rid, body, key, None))

    async def update(self, ctx: RequestContext, rtype: str, rid: str, body: dict[str, Any],
                     if_match: int | None) -> ResourceResult:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "u", "update", f"{rtype}/{rid}")
        if body.get("id") != rid:
            raise errors.bad_request("The id in the body must be present and match the id in the URL.", "id")
        self._validate(rtype, body)
        current = self._store.read_current(self.tenant, rtype, rid)
        if current is None or current.deleted:
            # update-as-create: the client chooses the id, which needs create permission too.
            await self.authorize(ctx, rtype, "c", "update", f"{rtype}/{rid}")
        key = await self._key_for(rtype, body)
        return await self._store.write("resource.update", self._seal_job(ctx, "update", rtype, rid, body, key, if_match))

    async def patch(self, ctx: RequestContext, rtype: str, rid: str, operations: Any,
                    if_match: int | None) -> ResourceResult:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "u", "patch", f"{rtype}/{rid}")
        if not isinstance(operations, list) or not operations or not all(isinstance(o, dict) for o in operations):
            raise errors.bad_request("A JSON Patch body is a non-empty array of operation objects.")
        for _ in range(_MAX_PATCH_RETRIES):
            current = self._store.read_current(self.tenant, rtype, rid)
            if current is None or current.deleted:
                if current is not None:
                    raise errors.gone("Resource was deleted.")
                raise errors.not_found("Resource not found.")
            _etag_version(if_match, current)
            document = orjson.loads(self._open(current))
            try:
                patched = jsonpatch.JsonPatch(operations).apply(document)
            except jsonpatch.JsonPatchTestFailed:
                raise errors.conflict("A 'test' operation of the patch failed.") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError,
                    KeyError, IndexError):
                raise errors.bad_request("The JSON Patch cannot be applied to this resource.") from None
            if not isinstance(patched, dict) or patched.get("id") != rid or patched.get("resourceType") != rtype:
                raise errors.bad_request("A patch may not change the resource's id or resourceType.")
            self._validate(rtype, patched)
            key = await self._key_for(rtype, patched)
            job = self._seal_job(ctx, "patch", rtype, rid, patched, key, if_match,
                                 must_exist=True, expect_version=current.version)
            try:
                return await self._store.write("resource.patch", job)
            except _Retry:
                continue
        raise errors.conflict("The resource kept changing while the patch was applied; retry.")

    async def delete(self, ctx: RequestContext, rtype: str, rid: str, if_match: int | None) -> int | None:
        """Logical delete. Returns the deletion's version, or None if it was already deleted."""
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "d", "delete", f"{rtype}/{rid}")
        tenant = self.tenant

        def job(tx: WriteTx) -> int | None:
            current = tx.current(tenant, rtype, rid)
            _etag_version(if_match, current)
            if current is None:
                raise errors.not_found("Resource not found.")
            if current.deleted:
                return None
            version = current.version + 1
            now = self._clock.now_ms()
            tx.insert_version(tenant, StoredVersion(rtype, rid, version, now, True, "", b""))
            self._audit.record(tx, self._record(ctx, "delete", 204, entity=f"{rtype}/{rid}/_history/{version}",
                                                patient=self._patient_ref(current.key_id)))
            return version

        return await self._store.write("resource.delete", job)

    async def _audited_read(self, ctx: RequestContext, interaction: str, v: StoredVersion) -> ResourceResult:
        body = self._open(v)
        record = self._record(ctx, interaction, 200, entity=f"{v.type}/{v.id}/_history/{v.version}",
                              patient=self._patient_ref(v.key_id))
        await self._store.write("audit.read", lambda tx: self._audit.record(tx, record))
        return ResourceResult(v.type, v.id, v.version, v.last_updated_ms, body)

    async def read(self, ctx: RequestContext, rtype: str, rid: str) -> ResourceResult:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "r", "read", f"{rtype}/{rid}")
        v = self._store.read_current(self.tenant, rtype, rid)
        if v is None:
            raise errors.not_found("Resource not found.")
        if v.deleted:
            raise errors.gone("Resource was deleted.", {"ETag": f'W/"{v.version}"'})
        return await self._audited_read(ctx, "read", v)

    def current_version(self, rtype: str, rid: str) -> StoredVersion | None:
        """Routing data only (for conditional reads); no content, no audit needed."""
        return self._store.read_current(self.tenant, rtype, rid)

    async def vread(self, ctx: RequestContext, rtype: str, rid: str, version: int) -> ResourceResult:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "r", "vread", f"{rtype}/{rid}/_history/{version}")
        v = self._store.read_version(self.tenant, rtype, rid, version)
        if v is None:
            raise errors.not_found("Version not found.")
        if v.deleted:
            raise errors.gone("This version is a deletion.")
        return await self._audited_read(ctx, "vread", v)

    async def history(self, ctx: RequestContext, rtype: str | None, rid: str | None, *, since_ms: int | None,
                      before_seq: int | None, count: int, all_types: frozenset[str]) -> HistoryPage:
        types: frozenset[str] | None = None
        if rtype is not None:
            self.check_type(rtype)
            interaction = "history-instance" if rid else "history-type"
            # Instance history reads one resource (r); type history lists many (s), as SMART v2 says.
            await self.authorize(ctx, rtype, "r" if rid else "s", interaction, f"{rtype}/{rid}" if rid else None)
        else:
            interaction = "history-system"
            p = ctx.principal
            types = p.grants.types_with("s", all_types) if p is not None else frozenset()
            if types is not None and not types:
                await self.authorize(ctx, "*", "s", interaction)
        query = HistoryQuery(self.tenant, rtype, rid, types, since_ms, before_seq, count + 1)
        rows = self._store.history(query)
        has_more = len(rows) > count
        rows = rows[:count]
        entries = [HistoryEntry(v, None if v.deleted else self._open(v)) for v in rows]
        total = self._store.history_count(HistoryQuery(self.tenant, rtype, rid, None, since_ms)) if rid else None
        patients = sorted({p for p in (self._patient_ref(v.key_id) for v in rows) if p})
        record = self._record(ctx, interaction, 200, entity=f"{rtype}/{rid}" if rid else rtype,
                              patient=",".join(patients) or None,
                              query=f"_since={since_ms} _count={count} before={before_seq}")
        await self._store.write("audit.history", lambda tx: self._audit.record(tx, record))
        return HistoryPage(entries, rows[-1].seq if has_more and rows else None, total)


class IntegrityError(Exception):
    """Stored data failed authentication: it was tampered with or its key is gone."""


class _Retry(Exception):
    """The resource changed between read and write (optimistic concurrency); try again."""


__all__ = ["OperationOutcomeError", "Repository", "RequestContext", "ResourceResult"]
