"""The repository: policy → validate → encrypt → store → audit, in one transaction.

Every FHIR interaction on resources goes through here, so access decisions,
validation, encryption and the audit trail cannot be bypassed by another
route. Resource JSON is encrypted with the data key of its patient
compartment; associated data binds each blob to (tenant, type, id, version,
key id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

import jsonpatch
import orjson

from fhirvault.domain import errors
from fhirvault.domain.compartment import patient_of, patients_referenced
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.instants import instant
from fhirvault.domain.policy import (
    ETREAT,
    GAIN_REFUSED,
    REFERENCE_REFUSED,
    RELATIONSHIP_CHANGE,
    SELF_ASSIGNED,
    Decision,
    labels_of,
)
from fhirvault.domain.r4 import is_resource_type, patient_compartment_params, resource_types
from fhirvault.domain.scopes import LIFECYCLE_SCOPE
from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.query import (
    AnyCriterion,
    ChainCriterion,
    HasCriterion,
    ParsedSearch,
    parse_search,
    reference_criterion,
)
from fhirvault.domain.validation import Validator
from fhirvault.ports import (
    Clock,
    HistoryQuery,
    ResourceStore,
    StoredVersion,
    StoreUnavailable,
    VersionConflict,
    WriteTx,
)
from fhirvault.services.access import Access, AccessGuard
from fhirvault.services.audit import AuditRecord, AuditTrail, outcome_for
from fhirvault.services.auth import Principal
from fhirvault.services.break_glass import (
    CLOSED,
    DECISIONS,
    MAX_TEXT,
    MIN_REASON,
    OPEN,
    BreakGlass,
    Grant,
)
from fhirvault.services.coherence import RELATIONSHIPS, publish
from fhirvault.services.crypto import DecryptionError, associated_data
from fhirvault.services.erasure import Lifecycle
from fhirvault.services.keys import (
    TENANT_COMPARTMENT,
    DataKey,
    KeyError_,
    KeyRing,
    patient_compartment,
)
from fhirvault.services.relationships import (
    WATCHED_TYPES,
    Change,
    Relationships,
    RelationshipSettings,
    relationship_change,
    self_added,
)
from fhirvault.services.search import (
    INCLUDE_CAP,
    SORT_CAP,
    VERIFY_CAP,
    Match,
    SearchEngine,
    SearchOutcome,
    TooCostly,
    sort_matches,
)
from fhirvault.services.search_index import SearchIndex

_MAX_PATCH_RETRIES = 5
RESTRICTED_DETAIL = "processing restricted (GDPR art. 18)"


def _conditional_key(rtype: str, params: list[tuple[str, str]]) -> str:
    """What conditional creates and deletes on the same criteria lock (``WriteTx.serialize``)."""
    return "conditional-create:" + rtype + "?" + urlencode(sorted(params))
_STAMPED = frozenset({"_lastUpdated"})  # search parameters on the meta the write transaction stamps
_RELATIONSHIP_LIMIT = 5_000  # resources one relationship source may return
_BREAK_GLASS_ROLES = frozenset({"practitioner", "nurse"})
T = TypeVar("T")


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


def _unstamped(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource without what the server stamps (meta.versionId, meta.lastUpdated)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    return {**resource, "meta": meta}


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
    def __init__(self, store: ResourceStore, keys: KeyRing, audit: AuditTrail, validator: Validator,
                 clock: Clock, index: SearchIndex, *, tenant: str, allow_unknown_elements: bool = False,
                 relationships: RelationshipSettings | None = None, break_glass_hours: float = 4) -> None:
        self._store = store
        self._index = index
        self._engine: SearchEngine | None = None
        self._keys = keys
        self._audit = audit
        self._validator = validator
        self._clock = clock
        self.tenant = tenant
        self._lenient = allow_unknown_elements
        # Access control: relationships and consents are read from the data through the search engine.
        self.relationships = Relationships(self._internal_find, clock, relationships)
        self.break_glass = BreakGlass(store, keys, clock, tenant=tenant, hours=break_glass_hours)
        self.guard = AccessGuard(tenant, self.relationships, self.break_glass, self._patient_id)
        # GDPR art. 18 restriction and art. 17 erasure (services/erasure.py); set by the container.
        self.lifecycle: Lifecycle | None = None
        # Per-type checks of content being written (Subscription: criteria, endpoint, owner), after validation.
        self.preparers: dict[str, Callable[[RequestContext, dict[str, Any]], Awaitable[None]]] = {}
        # Called in every resource write's transaction (type, id, new version): the subscription outbox.
        self.write_hooks: list[Callable[[WriteTx, str, str, int], None]] = []

    # -- policy ----------------------------------------------------------------
    # Decisions are made by domain/policy.py; services/access.py gathers their facts. Here they are
    # applied to every interaction: type-level first (may this caller ever do this on this type?),
    # then on each resource before it leaves the repository or is written.
    async def authorize(self, ctx: RequestContext, rtype: str, permission: str, interaction: str,
                        entity: str | None = None) -> Access:
        """Default deny, type-level: may the caller ever exercise ``permission`` on ``rtype``?"""
        access = self.guard.for_principal(ctx.principal, interaction)
        p = ctx.principal
        if access.simple and p is not None and p.grants.allows(rtype, permission):
            return access  # a backend service with plain system scopes: the scope is the whole decision
        decision = access.type_level(rtype, permission)
        if not decision.allowed:
            await self._refuse(ctx, interaction, decision, entity, rtype=rtype)
        return access

    async def _refuse(self, ctx: RequestContext, interaction: str, decision: Decision, entity: str | None, *,
                      rtype: str | None = None, patient: str | None = None, status: int | None = None) -> None:
        """Record the refusal with its reason, then answer 404 (hidden) or 403.

        The audit record says 403 either way: it was a refusal, whatever the client was told."""
        await self.audit_event(ctx, interaction, 403, decision.reason, entity=entity,
                               patient=f"Patient/{patient}" if patient else None, restricted=decision.restricted)
        if (status or decision.status) == 404:
            raise errors.not_found("Resource not found.")
        if decision.reason.startswith("scope"):
            raise errors.forbidden(f"Access denied: the token's scopes do not allow this interaction on {rtype}.")
        raise errors.forbidden(f"Access denied: {decision.reason}.")

    async def _check(self, ctx: RequestContext, access: Access, v: StoredVersion, document: dict[str, Any],
                     interaction: str, permission: str, entity: str) -> Decision:
        """The decision on one stored resource; a refusal is recorded and raised."""
        decision = access.version(v, document, permission)
        if not decision.allowed:
            await self._refuse(ctx, interaction, decision, entity, rtype=v.type, patient=self._patient_id(v.key_id))
        return decision

    async def _check_new(self, ctx: RequestContext, access: Access, rtype: str, body: dict[str, Any],
                         interaction: str, permission: str, entity: str | None, *, new: bool = False) -> Decision:
        """The decision on content being written. A write into, or referring into, a compartment the
        caller cannot see is refused with 404 as a read would be (nothing about it is confirmed); a
        refusal of the type or of the caller's own content is a 403."""
        pid = patient_of(rtype, body)
        decision = access.resource(rtype, body, pid, permission=permission, new=new)
        if not decision.allowed:
            await self._refuse(ctx, interaction, decision, entity, rtype=rtype, patient=pid)
        # Observation.performer, Patient.link…: the resource also lands in these compartments
        # (their $everything, their searches), so the writer must see them too.
        for other in sorted(patients_referenced(rtype, body) - {pid}):
            reached = access.reaches(other)
            if not reached.allowed:
                await self._refuse(ctx, interaction, Decision(False, REFERENCE_REFUSED, hidden=True), entity,
                                   rtype=rtype, patient=other)
        return decision

    async def _guard_relationships(self, ctx: RequestContext, access: Access, rtype: str,
                                   old: dict[str, Any] | None, new: dict[str, Any] | None, interaction: str,
                                   entity: str, *, registering: bool = False) -> str | None:
        """A user's write of a relationship field (CareTeam members, Encounter participants, Patient
        generalPractitioner/link, EpisodeOfCare organisation, PractitionerRole practitioner…).

        The caller was already allowed to see the patient before and after (``_check``/``_check_new``);
        here the new version is evaluated as a relationship source for the writer: a patient it
        would open to the writer that their cached relationships do not already reach is a refusal
        (403), so nobody hands themselves a patient, also not one they see only through
        break-the-glass. Returns the audit detail of the write (watched by services/detection.py)."""
        if rtype not in WATCHED_TYPES or rtype == "Consent" or relationship_change(rtype, old, new) is None:
            return None
        reach = access.reach()
        me = reach.members or frozenset(filter(None, [access.facts.fhir_user]))
        myself = not registering and self_added(rtype, old, new, me)
        gained = set(self.relationships.granted(rtype, new, reach, access.facts.organization)) - set(reach.patients)
        if registering and new is not None:
            gained.discard(str(new.get("id")))  # a patient being registered (server-assigned id) is new
        if gained:
            reason = GAIN_REFUSED + (f"; {SELF_ASSIGNED}" if myself else "")
            await self._refuse(ctx, interaction, Decision(False, reason), entity, rtype=rtype,
                               patient=min(gained))
        return RELATIONSHIP_CHANGE + (f"; {SELF_ASSIGNED}" if myself else "")

    def internal_find(self, rtype: str, params: list[tuple[str, str]], limit: int) -> list[dict[str, Any]]:
        """The server's own searches (relationships, consents, subscriptions): unfiltered, never audited."""
        parsed = parse_search(rtype, params, strict=True, base_url=None, now_ms=self._clock.now_ms())
        engine = self.engine()
        criteria = engine.resolve(rtype, parsed.criteria)
        if criteria is None:
            return []
        return [m.resource for m in engine.find(rtype, criteria, limit=limit).matches]

    @property
    def index(self) -> SearchIndex:
        return self._index

    def _internal_find(self, rtype: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The server's own searches (relationships, consents): unfiltered, never audited, never returned."""
        return self.internal_find(rtype, params, _RELATIONSHIP_LIMIT)

    async def audit_event(self, ctx: RequestContext, interaction: str, status: int, detail: str,
                          entity: str | None = None, *, client_id: str | None = None,
                          category: str = "rest", user: str | None = None, role: str | None = None,
                          patient: str | None = None, purpose_of_use: str | None = None,
                          restricted: bool = False) -> None:
        """Record an event that is not a resource write: a refusal, a token issued…

        ``client_id`` names the client when there is no principal yet (a token request: the
        id the caller claimed, so failures can be counted per account)."""
        record = self._record(ctx, interaction, status, entity=entity, detail=detail)
        if client_id is not None and record.client_id is None:
            record = dataclasses.replace(record, client_id=client_id[:128])
        if category != record.category:
            record = dataclasses.replace(record, category=category)
        if user or role or patient or purpose_of_use or restricted:
            record = dataclasses.replace(record, user=user or record.user, role=role or record.role,
                                         patient=patient or record.patient,
                                         purpose_of_use=purpose_of_use or record.purpose_of_use,
                                         restricted=restricted or record.restricted)
        await self._store.write("audit.event", lambda tx: self._audit.record(tx, record))

    async def remember_assertion(self, assertion_id: str, expires_ms: int) -> bool:
        """Record a client assertion id; False if it was seen before (a replay)."""
        now = self._clock.now_ms()
        return await self._store.write("oauth.jti", lambda tx: tx.remember_jti(assertion_id, expires_ms, now))

    def _record(self, ctx: RequestContext, interaction: str, status: int, *, entity: str | None = None,
                patient: str | None = None, query: str | None = None, detail: str | None = None,
                purpose: str | None = None, restricted: bool = False,
                result_count: int | None = None) -> AuditRecord:
        p = ctx.principal
        return AuditRecord(
            ts_ms=self._clock.now_ms(), interaction=interaction, outcome=outcome_for(status), status=status,
            request_id=ctx.request_id, client_id=p.client_id if p else None,
            source_ip=ctx.source_ip, entity=entity, patient=patient, query=query, detail=detail,
            user=p.user if p else None, role=p.role if p else None, purpose_of_use=purpose,
            restricted=restricted, result_count=result_count,
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

    def validation_issues(self, rtype: str, body: dict[str, Any]) -> list[Issue]:
        """$validate: what a write of ``body`` would be refused for (the same rules, nothing stored)."""
        try:
            self._validate(rtype, body)
        except errors.OperationOutcomeError as exc:
            return list(exc.issues)
        return []

    async def _key_for(self, rtype: str, body: dict[str, Any]) -> DataKey:
        pid = patient_of(rtype, body)
        return await self._keys.for_compartment(patient_compartment(pid) if pid else TENANT_COMPARTMENT)

    def open_version(self, v: StoredVersion) -> bytes:
        """The plaintext of a stored version, for server-side processing (retention rules, bulk export, subscription notifications)."""
        return self._open(v)

    def _open(self, v: StoredVersion) -> bytes:
        try:
            key = self._keys.by_id(v.key_id)
            return key.aead.open(v.blob, resource_aad(self.tenant, v.type, v.id, v.version, v.key_id))
        except (DecryptionError, KeyError_) as exc:
            # Tampered row, swapped blob or destroyed key: never serve it, never guess.
            raise IntegrityError(f"{v.type} version failed its integrity check: {type(exc).__name__}") from None

    def _patient_ref(self, key_id: str) -> str | None:
        pid = self._patient_id(key_id)
        return "Patient/" + pid if pid is not None else None

    def _patient_id(self, key_id: str) -> str | None:
        """The patient compartment a version is filed under, from its data key: no decryption needed."""
        if not key_id:
            return None
        compartment = self._keys.by_id(key_id).compartment
        return compartment[len("patient/"):] if compartment.startswith("patient/") else None

    # -- restriction of processing (GDPR art. 18) ---------------------------------
    @staticmethod
    def may_lift_restriction(ctx: RequestContext) -> bool:
        """Holders of the lifecycle scope (the DPO's tools) read restricted records; nobody else."""
        p = ctx.principal
        return p is not None and LIFECYCLE_SCOPE in p.scope.split()

    def _restricted_keys(self, ctx: RequestContext, key_ids: set[str]) -> set[str]:
        """The data keys among ``key_ids`` whose patient's processing is restricted for this caller."""
        lc = self.lifecycle
        if lc is None or self.may_lift_restriction(ctx):
            return set()
        return {k for k in key_ids if k and lc.restricted_compartment(self._keys.by_id(k).compartment)}

    async def _refuse_restricted(self, ctx: RequestContext, interaction: str, v: StoredVersion) -> None:
        if self._restricted_keys(ctx, {v.key_id}):
            await self.audit_event(ctx, interaction, 403, RESTRICTED_DETAIL, entity=f"{v.type}/{v.id}",
                                   patient=self._patient_ref(v.key_id))
            raise errors.forbidden("Processing of this patient's data is restricted (GDPR art. 18): it is stored"
                                   " but may not be read until the restriction is lifted.")

    def _seal_job(self, ctx: RequestContext, interaction: str, rtype: str, rid: str, body: dict[str, Any],
                  key: DataKey, if_match: int | None, *, must_exist: bool = False,
                  expect_version: int | None = None, status_new: int = 201, status_old: int = 200,
                  decision: Decision | None = None, detail: str | None = None) -> Callable[[WriteTx], ResourceResult]:
        """A write job: checks versions, stamps meta, encrypts, stores the version and its audit record."""
        tenant = self.tenant
        tags = self._index.resource_tags(rtype, body, skip=_STAMPED)
        # A patient's key may have been erased by another process since it was cached here: never seal under
        # a destroyed key (the version would be unreadable at once); the retry finds or makes the current one.
        lookup = self._keys.compartment_lookup(key.compartment) if key.compartment.startswith("patient/") else None

        def job(tx: WriteTx) -> ResourceResult:
            if lookup is not None and getattr(tx.data_key_by_lookup(tenant, lookup), "key_id", None) != key.key_id:
                self._keys.forget(key.key_id, lookup)
                raise ConcurrentChange()
            current = tx.current(tenant, rtype, rid)
            _etag_version(if_match, current)
            if expect_version is not None and (current is None or current.version != expect_version):
                raise ConcurrentChange()
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
            for hook in self.write_hooks:
                hook(tx, rtype, rid, version)
            # Most tags were computed before the transaction (off the writer thread); the
            # ones that depend on the stamped meta are computed here.
            tx.set_search_tags(tenant, rtype, rid, tags + self._index.param_tags(rtype, "_lastUpdated", body))
            created = current is None or current.deleted
            status = status_new if created else status_old
            patient = self._patient_ref(key.key_id)
            note = detail
            if rtype in WATCHED_TYPES:
                before = orjson.loads(self._open(current)) if current is not None and not current.deleted else None
                change = relationship_change(rtype, before, body)
                if change is not None:
                    self._relationship_changed(tx, change)
                    if rtype != "Consent":
                        note = note or RELATIONSHIP_CHANGE
            self._audit.record(tx, self._record(
                ctx, interaction, status, entity=f"{rtype}/{rid}/_history/{version}", patient=patient,
                purpose=decision.purpose_of_use if decision else None,
                restricted=bool(decision and decision.restricted), detail=note))
            return ResourceResult(rtype, rid, version, now, plaintext, created)

        return job

    async def _prepare(self, ctx: RequestContext, rtype: str, body: dict[str, Any]) -> None:
        preparer = self.preparers.get(rtype)
        if preparer is not None:
            await preparer(ctx, body)

    async def server_update(self, rtype: str, rid: str, body: dict[str, Any], expect_version: int,
                            detail: str) -> ResourceResult:
        """A change the server itself makes (a Subscription's status): no caller to authorise, no
        preparer; audited with ``detail``. Fails with ConcurrentChange if the resource moved on."""
        self._validate(rtype, body)
        key = await self._key_for(rtype, body)
        job = self._seal_job(RequestContext(None, "server"), "update", rtype, rid, body, key, None, must_exist=True,
                             expect_version=expect_version, detail=detail)
        try:
            return await self._store.write("resource.server-update", job)
        except VersionConflict:
            raise ConcurrentChange() from None

    # -- interactions ----------------------------------------------------------
    # Each write interaction is prepared first (policy, validation, keys: everything
    # that may await or fail cheaply), giving a job that runs inside one store
    # transaction. A single interaction writes its job alone; a transaction bundle
    # writes all its entries' jobs in one job, so they commit or fail together.
    @staticmethod
    def _check_writable(rtype: str) -> None:
        # Defence in depth: the router already serves AuditEvent from the trail, read-only.
        if rtype == "AuditEvent":
            raise errors.method_not_allowed("AuditEvents are written only by the server; they are read-only.")

    async def prepare_create(self, ctx: RequestContext, rtype: str, body: dict[str, Any],
                             rid: str | None = None) -> Callable[[WriteTx], ResourceResult]:
        self.check_type(rtype)
        self._check_writable(rtype)
        access = await self.authorize(ctx, rtype, "c", "create")
        body.pop("id", None)  # R4: the server assigns the id and ignores one in the body
        self._validate(rtype, body)
        rid = rid or str(uuid.uuid4())
        body["id"] = rid
        await self._prepare(ctx, rtype, body)
        decision, detail = None, None
        if not access.simple:
            decision = await self._check_new(ctx, access, rtype, body, "create", "c", rtype, new=True)
            detail = await self._guard_relationships(ctx, access, rtype, None, body, "create", f"{rtype}/{rid}",
                                                     registering=rtype == "Patient")
        key = await self._key_for(rtype, body)
        return self._seal_job(ctx, "create", rtype, rid, body, key, None, decision=decision, detail=detail)

    async def create(self, ctx: RequestContext, rtype: str, body: dict[str, Any]) -> ResourceResult:
        job = await self.prepare_create(ctx, rtype, body)
        try:
            return await self._store.write("resource.create", job)
        except StoreUnavailable as exc:
            # The connection broke during COMMIT. The id is ours alone (a fresh UUID): if the
            # database has it now, the create committed.
            stored = self._committed_after_all(exc, rtype, body["id"], 1, body)
            if stored is None:
                raise
            return dataclasses.replace(stored, created=True)

    def _committed_after_all(self, exc: StoreUnavailable, rtype: str, rid: str, version: int,
                             body: dict[str, Any]) -> ResourceResult | None:
        """After a write's outcome was unknown: the result it stored, if the store now holds it.

        Only a positive answer counts (a COMMIT still under way may land after this read):
        version ``version`` of ``rid`` whose content, but for the stamped meta, is ``body``."""
        if not exc.outcome_unknown:
            return None
        found = self._store.read_version(self.tenant, rtype, rid, version)
        if found is None or found.deleted:
            return None
        plaintext = self._open(found)
        if _unstamped(orjson.loads(plaintext)) != _unstamped(body):
            return None
        return ResourceResult(rtype, rid, version, found.last_updated_ms, plaintext)

    async def prepare_update(self, ctx: RequestContext, rtype: str, rid: str, body: dict[str, Any],
                             if_match: int | None) -> Callable[[WriteTx], ResourceResult]:
        self.check_type(rtype)
        self._check_writable(rtype)
        entity = f"{rtype}/{rid}"
        access = await self.authorize(ctx, rtype, "u", "update", entity)
        if body.get("id") != rid:
            raise errors.bad_request("The id in the body must be present and match the id in the URL.", "id")
        self._validate(rtype, body)
        await self._prepare(ctx, rtype, body)
        current = self._store.read_current(self.tenant, rtype, rid)
        creating = current is None or current.deleted
        if creating:
            # update-as-create: the client chooses the id, which needs create permission too.
            await self.authorize(ctx, rtype, "c", "update", entity)
        decision, detail = None, None
        if not access.simple:
            old: dict[str, Any] | None = None
            if not creating:
                assert current is not None
                old = orjson.loads(self._open(current))
                await self._check(ctx, access, current, old, "update", "u", entity)
            elif current is not None:  # re-creating a deleted resource: judged on what it was
                await self._check_deleted(ctx, access, current, "update", entity)
            decision = await self._check_new(ctx, access, rtype, body, "update", "c" if creating else "u", entity,
                                             new=creating)
            detail = await self._guard_relationships(ctx, access, rtype, old, body, "update", entity)
        key = await self._key_for(rtype, body)
        return self._seal_job(ctx, "update", rtype, rid, body, key, if_match, decision=decision, detail=detail)

    async def update(self, ctx: RequestContext, rtype: str, rid: str, body: dict[str, Any],
                     if_match: int | None) -> ResourceResult:
        for _ in range(_MAX_PATCH_RETRIES):
            try:
                return await self._store.write("resource.update",
                                               await self.prepare_update(ctx, rtype, rid, body, if_match))
            except VersionConflict:  # another server process wrote this resource meanwhile: judge it again
                continue
            except StoreUnavailable as exc:
                # With If-Match the version it would have made is known: is it there, with this content?
                stored = None if if_match is None else self._committed_after_all(exc, rtype, rid, if_match + 1, body)
                if stored is None:
                    raise
                return stored
        raise ConcurrentChange()

    async def prepare_patch(self, ctx: RequestContext, rtype: str, rid: str, operations: Any,
                            if_match: int | None) -> Callable[[WriteTx], ResourceResult]:
        """Apply the patch to the current version; the job fails with ConcurrentChange if that version changed."""
        self.check_type(rtype)
        self._check_writable(rtype)
        access = await self.authorize(ctx, rtype, "u", "patch", f"{rtype}/{rid}")
        if not isinstance(operations, list) or not operations or not all(isinstance(o, dict) for o in operations):
            raise errors.bad_request("A JSON Patch body is a non-empty array of operation objects.")
        current = self._store.read_current(self.tenant, rtype, rid)
        if current is None or current.deleted:
            if current is not None:
                if not access.simple:
                    await self._check_deleted(ctx, access, current, "patch", f"{rtype}/{rid}")
                raise errors.gone("Resource was deleted.")
            raise errors.not_found("Resource not found.")
        document = orjson.loads(self._open(current))
        if not access.simple:
            await self._check(ctx, access, current, document, "patch", "u", f"{rtype}/{rid}")
        _etag_version(if_match, current)
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
        await self._prepare(ctx, rtype, patched)
        decision, detail = None, None
        if not access.simple:
            decision = await self._check_new(ctx, access, rtype, patched, "patch", "u", f"{rtype}/{rid}")
            detail = await self._guard_relationships(ctx, access, rtype, document, patched, "patch",
                                                     f"{rtype}/{rid}")
        key = await self._key_for(rtype, patched)
        return self._seal_job(ctx, "patch", rtype, rid, patched, key, if_match, must_exist=True,
                              expect_version=current.version, decision=decision, detail=detail)

    async def patch(self, ctx: RequestContext, rtype: str, rid: str, operations: Any,
                    if_match: int | None) -> ResourceResult:
        for _ in range(_MAX_PATCH_RETRIES):
            job = await self.prepare_patch(ctx, rtype, rid, operations, if_match)
            try:
                return await self._store.write("resource.patch", job)
            except (ConcurrentChange, VersionConflict):
                continue
        raise errors.conflict("The resource kept changing while the patch was applied; retry.")

    async def prepare_delete(self, ctx: RequestContext, rtype: str, rid: str, if_match: int | None,
                             *, missing_ok: bool = False) -> Callable[[WriteTx], int | None]:
        """Logical delete job. It returns the deletion's version, or None if there was nothing to delete."""
        self.check_type(rtype)
        self._check_writable(rtype)
        access = await self.authorize(ctx, rtype, "d", "delete", f"{rtype}/{rid}")
        tenant = self.tenant
        decision: Decision | None = None
        if not access.simple:
            seen = self._store.read_current(tenant, rtype, rid)
            if seen is not None and not seen.deleted:
                decision = await self._check(ctx, access, seen, orjson.loads(self._open(seen)), "delete", "d",
                                             f"{rtype}/{rid}")
            elif seen is not None:
                await self._check_deleted(ctx, access, seen, "delete", f"{rtype}/{rid}")

        def job(tx: WriteTx) -> int | None:
            current = tx.current(tenant, rtype, rid)
            _etag_version(if_match, current)
            if current is None and not missing_ok:
                raise errors.not_found("Resource not found.")
            if current is None or current.deleted:
                return None
            if decision is None and not access.simple:
                raise ConcurrentChange()  # created between the check and the write: decide again
            version = current.version + 1
            now = self._clock.now_ms()
            tx.insert_version(tenant, StoredVersion(rtype, rid, version, now, True, "", b""))
            for hook in self.write_hooks:
                hook(tx, rtype, rid, version)
            tx.set_search_tags(tenant, rtype, rid, [])
            note = None
            if rtype in WATCHED_TYPES:
                change = relationship_change(rtype, orjson.loads(self._open(current)), None)
                if change is not None:
                    self._relationship_changed(tx, change)
                    note = RELATIONSHIP_CHANGE if rtype != "Consent" else None
            self._audit.record(tx, self._record(ctx, "delete", 204, entity=f"{rtype}/{rid}/_history/{version}",
                                                patient=self._patient_ref(current.key_id),
                                                purpose=decision.purpose_of_use if decision else None,
                                                restricted=bool(decision and decision.restricted), detail=note))
            return version

        return job

    def _relationship_changed(self, tx: WriteTx, change: Change) -> None:
        """At COMMIT, this process and (through the database) the others forget what ``change`` touches."""
        rel = self.relationships
        publish(tx, RELATIONSHIPS, rel.published_keys(change), lambda: rel.invalidate(change))

    async def write_jobs(self, name: str, fn: Callable[[WriteTx], T]) -> T:
        """Run prepared jobs together in one transaction (transaction bundles)."""
        try:
            return await self._store.write(name, fn)
        except VersionConflict:
            raise ConcurrentChange() from None

    async def delete(self, ctx: RequestContext, rtype: str, rid: str, if_match: int | None) -> int | None:
        for _ in range(_MAX_PATCH_RETRIES):
            try:
                return await self._store.write("resource.delete", await self.prepare_delete(ctx, rtype, rid, if_match))
            except VersionConflict:
                continue
        raise ConcurrentChange()

    async def _audited_read(self, ctx: RequestContext, interaction: str, v: StoredVersion,
                            access: Access) -> ResourceResult:
        await self._refuse_restricted(ctx, interaction, v)
        body = self._open(v)
        entity = f"{v.type}/{v.id}/_history/{v.version}"
        purpose, restricted = None, False
        if not access.simple:
            decision = await self._check(ctx, access, v, orjson.loads(body), interaction, "r", entity)
            purpose, restricted = decision.purpose_of_use, decision.restricted
        elif b"v3-Confidentiality" in body:
            restricted = bool(labels_of(orjson.loads(body)))
        record = self._record(ctx, interaction, 200, entity=entity, patient=self._patient_ref(v.key_id),
                              purpose=purpose, restricted=restricted)
        await self._store.write("audit.read", lambda tx: self._audit.record(tx, record))
        return ResourceResult(v.type, v.id, v.version, v.last_updated_ms, body)

    async def _check_deleted(self, ctx: RequestContext, access: Access, v: StoredVersion, interaction: str,
                             entity: str) -> None:
        """A deletion has no content: the caller must have been allowed to read what was deleted
        (else 404, so that 410 does not reveal that a forbidden resource existed)."""
        before = self._store.read_version(self.tenant, v.type, v.id, v.version - 1) if v.version > 1 else None
        if before is None or before.deleted:
            await self._refuse(ctx, interaction, Decision(False, "deleted resource of unknown compartment",
                                                          hidden=True), entity)
            return
        await self._check(ctx, access, before, orjson.loads(self._open(before)), interaction, "r", entity)

    async def read(self, ctx: RequestContext, rtype: str, rid: str) -> ResourceResult:
        self.check_type(rtype)
        access = await self.authorize(ctx, rtype, "r", "read", f"{rtype}/{rid}")
        v = self._store.read_current(self.tenant, rtype, rid)
        if v is None:
            raise errors.not_found("Resource not found.")
        if v.deleted:
            if not access.simple:
                await self._check_deleted(ctx, access, v, "read", f"{rtype}/{rid}")
            raise errors.gone("Resource was deleted.", {"ETag": f'W/"{v.version}"'})
        return await self._audited_read(ctx, "read", v, access)

    async def readable_current(self, ctx: RequestContext, rtype: str, rid: str) -> StoredVersion | None:
        """The current version's routing data (conditional reads: If-None-Match), once the caller is
        known to be allowed to read it, so that a 304 never confirms a forbidden resource."""
        access = await self.authorize(ctx, rtype, "r", "read", f"{rtype}/{rid}")
        current = self._store.read_current(self.tenant, rtype, rid)
        if current is not None and not current.deleted:
            await self._refuse_restricted(ctx, "read", current)  # a 304 would confirm it too
        if current is None or current.deleted or access.simple:
            return current
        await self._check(ctx, access, current, orjson.loads(self._open(current)), "read", "r", f"{rtype}/{rid}")
        return current

    def current_version(self, rtype: str, rid: str) -> StoredVersion | None:
        """Routing data only; callers serving clients use readable_current."""
        return self._store.read_current(self.tenant, rtype, rid)

    async def vread(self, ctx: RequestContext, rtype: str, rid: str, version: int) -> ResourceResult:
        self.check_type(rtype)
        access = await self.authorize(ctx, rtype, "r", "vread", f"{rtype}/{rid}/_history/{version}")
        v = self._store.read_version(self.tenant, rtype, rid, version)
        if v is None:
            raise errors.not_found("Version not found.")
        if v.deleted:
            if not access.simple:
                await self._check_deleted(ctx, access, v, "vread", f"{rtype}/{rid}")
            raise errors.gone("This version is a deletion.")
        return await self._audited_read(ctx, "vread", v, access)

    async def history(self, ctx: RequestContext, rtype: str | None, rid: str | None, *, since_ms: int | None,
                      before_seq: int | None, count: int, all_types: frozenset[str]) -> HistoryPage:
        types: frozenset[str] | None = None
        if rtype is not None:
            self.check_type(rtype)
            interaction = "history-instance" if rid else "history-type"
            # Instance history reads one resource (r); type history lists many (s), as SMART v2 says.
            access = await self.authorize(ctx, rtype, "r" if rid else "s", interaction,
                                          f"{rtype}/{rid}" if rid else None)
        else:
            interaction = "history-system"
            p = ctx.principal
            access = self.guard.for_principal(p, interaction)
            if p is not None and p.role is not None:
                types = frozenset(t for t in all_types if access.type_level(t, "s").allowed)
            else:
                types = p.grants.types_with("s", all_types) if p is not None else frozenset()
            if types is not None and not types:
                await self.authorize(ctx, "*", "s", interaction)
        if rid is not None and rtype is not None and not access.simple:
            # The instance as a whole: judged on its latest content (404 when forbidden).
            current = self._store.read_current(self.tenant, rtype, rid)
            if current is not None and current.deleted:
                await self._check_deleted(ctx, access, current, interaction, f"{rtype}/{rid}")
            elif current is not None:
                await self._check(ctx, access, current, orjson.loads(self._open(current)), interaction, "r",
                                  f"{rtype}/{rid}")
        query = HistoryQuery(self.tenant, rtype, rid, types, since_ms, before_seq, count + 1)
        rows = self._store.history(query)
        has_more = len(rows) > count
        rows = rows[:count]
        next_seq = rows[-1].seq if has_more and rows else None
        withheld = self._restricted_keys(ctx, {v.key_id for v in rows})
        rows = [v for v in rows if v.key_id not in withheld]
        entries = [HistoryEntry(v, None if v.deleted else self._open(v)) for v in rows]
        if not access.simple:
            # Each version on its own content; deletions only inside an instance the caller may read.
            permission = "r" if rid else "s"
            entries = [e for e in entries if (e.body is None and rid is not None) or (
                e.body is not None and access.version(e.version, orjson.loads(e.body), permission).allowed)]
            rows = [e.version for e in entries]
        total = self._store.history_count(HistoryQuery(self.tenant, rtype, rid, None, since_ms)) if rid else None
        patients = sorted({p for p in (self._patient_ref(v.key_id) for v in rows) if p})
        record = self._record(ctx, interaction, 200, entity=f"{rtype}/{rid}" if rid else rtype,
                              patient=",".join(patients) or None,
                              query=f"_since={since_ms} _count={count} before={before_seq}",
                              purpose=access.purpose(), restricted=access.restricted, result_count=len(entries))
        await self._store.write("audit.history", lambda tx: self._audit.record(tx, record))
        return HistoryPage(entries, next_seq, total)


    # -- search ---------------------------------------------------------------
    def engine(self) -> SearchEngine:
        if self._engine is None:
            self._engine = SearchEngine(self._store, self._index, self._open, self.tenant)
        return self._engine

    async def _authorize_types(self, ctx: RequestContext, criteria: tuple[AnyCriterion, ...]) -> None:
        """Chained and _has parameters search other types: the token must allow that too."""
        for c in criteria:
            if isinstance(c, ChainCriterion):
                await self.authorize(ctx, c.target_type, "s", "search")
                await self._authorize_types(ctx, (c.inner,))
            elif isinstance(c, HasCriterion):
                await self.authorize(ctx, c.source_type, "s", "search")
                await self._authorize_types(ctx, (c.inner,))

    @staticmethod
    def _may_read(access: Access, rtype: str) -> bool:
        return access.type_level(rtype, "r").allowed or access.type_level(rtype, "s").allowed

    async def parse(self, ctx: RequestContext, rtype: str, params: list[tuple[str, str]], *, strict: bool,
                    base_url: str | None) -> ParsedSearch:
        self.check_type(rtype)
        await self.authorize(ctx, rtype, "s", "search")
        parsed = parse_search(rtype, params, strict=strict, base_url=base_url, now_ms=self._clock.now_ms())
        await self._authorize_types(ctx, parsed.criteria)
        return parsed

    async def search(self, ctx: RequestContext, parsed: ParsedSearch, *, count: int, after: int | None,
                     before: int | None, snapshot: int | None, offset: int, query_text: str) -> SearchOutcome:
        """Run a parsed search for one page; the caller formats the Bundle.

        Every candidate goes through the caller's access decision before it is paged or counted:
        ``_total`` and ``_summary=count`` count only what the caller may see."""
        access = self.guard.for_principal(ctx.principal, "search")
        visible = None if access.simple else access
        outcome = await asyncio.to_thread(self._search_page, parsed, count, after, before, snapshot, offset, visible)
        allowed: list[Match] = []
        for m in outcome.includes:
            # Included resources are read, not searched: judged with 'r' on their own content.
            if self._may_read(access, m.version.type) and (
                    access.simple or access.version(m.version, m.resource, "r").allowed):
                allowed.append(m)
            elif not any(w.code == "suppressed" for w in outcome.warnings):
                outcome.warnings.append(Issue("warning", "suppressed",
                                              "Some included resources were left out: the caller may not read them."))
        outcome.includes = allowed
        withheld = self._restricted_keys(ctx, {m.version.key_id for m in outcome.matches + allowed})
        if withheld:
            outcome.matches = [m for m in outcome.matches if m.version.key_id not in withheld]
            outcome.includes = allowed = [m for m in allowed if m.version.key_id not in withheld]
            outcome.warnings.append(Issue("warning", "suppressed", "Some resources were left out: processing of"
                                          " their patient's data is restricted (GDPR art. 18)."))
        patients = {p for p in (self._patient_ref(m.version.key_id) for m in outcome.matches + allowed) if p}
        restricted = access.restricted or any(labels_of(m.resource) for m in outcome.matches + allowed)
        record = self._record(ctx, "search", 200, entity=parsed.resource_type, patient=",".join(sorted(patients)) or None,
                              query=query_text, purpose=access.purpose(), restricted=restricted,
                              result_count=len(outcome.matches) + len(allowed),
                              detail=f"{access.withheld} resources withheld by policy" if access.withheld else None)
        await self._store.write("audit.search", lambda tx: self._audit.record(tx, record))
        return outcome

    async def find_ids(self, ctx: RequestContext, rtype: str, params: list[tuple[str, str]], limit: int = 2) -> list[str]:
        """Ids matching a conditional URL's criteria (conditional create/update/delete, references)."""
        return await asyncio.to_thread(await self.matcher(ctx, rtype, params, limit))

    async def create_unless(self, ctx: RequestContext, rtype: str, body: dict[str, Any],
                            params: list[tuple[str, str]]) -> ResourceResult | list[str]:
        """Conditional create: the ids matching ``params``, or the new resource if none.

        Callers check first and hold an in-process lock; stores whose database other processes
        write too (PostgreSQL) also lock the criteria in the database and re-check inside the write."""
        find = await self.matcher(ctx, rtype, params)
        job = await self.prepare_create(ctx, rtype, body)
        key = _conditional_key(rtype, params)

        def guarded(tx: WriteTx) -> ResourceResult | list[str]:
            if tx.serialize(key) and (ids := find()):
                return ids
            return job(tx)

        return await self._store.write("resource.create", guarded)

    async def delete_matching(self, ctx: RequestContext, rtype: str, params: list[tuple[str, str]]) -> int | None:
        """Conditional delete: delete the one resource matching ``params`` (412 if several); returns the
        deletion's version, or None if nothing matched.

        The delete applies to the version the search matched: if another writer (in any process) changed the
        resource since, the search runs again. Conditional creates and deletes on the same criteria also lock
        them in the database (other processes) and re-check inside the write, as ``create_unless`` does."""
        find = await self.matcher(ctx, rtype, params, versions=True)
        key = _conditional_key(rtype, params)
        for _ in range(_MAX_PATCH_RETRIES):
            matches = await asyncio.to_thread(find)
            if len(matches) > 1:
                raise errors.precondition_failed("The conditional delete matches more than one resource.")
            if not matches:
                return None
            # If-Match on the matched version: the job compares it with the current version it reads itself,
            # and a writer committing after that read makes its insert conflict (VersionConflict).
            job = await self.prepare_delete(ctx, rtype, matches[0][0], matches[0][1], missing_ok=True)
            guarded = self._still_matching(key, find, matches, job)
            try:
                return await self._store.write("resource.delete", guarded)
            except (ConcurrentChange, VersionConflict):
                continue
        raise ConcurrentChange()

    def _still_matching(self, key: str, find: Callable[[], list[Any]], matches: list[tuple[str, int]],
                        job: Callable[[WriteTx], T]) -> Callable[[WriteTx], T]:
        """``job`` (an If-Match delete of the one match), searching again if the match changed meanwhile
        (with other processes: also after locking the criteria)."""

        def guarded(tx: WriteTx) -> T:
            if tx.serialize(key) and find() != matches:
                raise ConcurrentChange()
            try:
                return job(tx)
            except OperationOutcomeError as exc:
                if exc.status == 412:  # the If-Match: another writer changed the resource since the search
                    raise ConcurrentChange() from None
                raise

        return guarded

    async def matcher(self, ctx: RequestContext, rtype: str, params: list[tuple[str, str]],
                      limit: int = 2, *, versions: bool = False) -> Callable[[], list[Any]]:
        """The search behind ``find_ids``, to run (blocking) later: ids, or (id, version) pairs."""
        parsed = await self.parse(ctx, rtype, params, strict=True, base_url=None)
        if not parsed.criteria:
            raise errors.bad_request("A conditional request needs at least one search criterion.")
        access = self.guard.for_principal(ctx.principal, "search")
        visible = None if access.simple else access  # a match the caller may not see is no match

        def run() -> list[Any]:
            criteria = self.engine().resolve(rtype, parsed.criteria, visible)
            if criteria is None:
                return []
            found = self.engine().find(rtype, criteria, limit=limit, visible=visible).matches
            return [(m.version.id, m.version.version) if versions else m.version.id for m in found]

        return run

    def _search_page(self, parsed: ParsedSearch, count: int, after: int | None, before: int | None,
                     snapshot: int | None, offset: int, visible: Access | None = None) -> SearchOutcome:
        engine = self.engine()
        rtype = parsed.resource_type
        snap = snapshot if snapshot is not None else self._store.max_rk()
        out = SearchOutcome([], [], None, None, None, None, None, snap, [])
        criteria = engine.resolve(rtype, parsed.criteria, visible)
        if criteria is None:
            out.total = 0
            return out
        limit_before = snap + 1 if before is None else min(before, snap + 1)
        if parsed.summary == "count" or parsed.total == "accurate" or parsed.sort:
            cap = SORT_CAP if parsed.sort else VERIFY_CAP
            everything = engine.find(rtype, criteria, limit=cap + 1, before=snap + 1, visible=visible)
            if len(everything.matches) > cap:  # never a silently truncated total
                what = "_sort" if parsed.sort else "An exact total"
                raise TooCostly(f"{what} is limited to result sets of at most {cap} resources: narrow the search.")
            out.total = len(everything.matches)
            if parsed.summary == "count":
                return out
            if parsed.sort:
                ordered = sort_matches(everything.matches, parsed.sort)
                out.matches = ordered[offset:offset + count]
                out.next_offset = offset + count if offset + count < len(ordered) else None
                out.prev_offset = max(0, offset - count) if offset > 0 else None
                out.includes = self._includes(parsed, out.matches, visible)
                return out
        if before is not None:  # previous page: walk backwards, then restore the order
            found = engine.find(rtype, criteria, limit=count + 1, before=limit_before, descending=True,
                                visible=visible)
            page = found.matches[:count]
            page.reverse()
            out.matches = page
            out.next_after = page[-1].rk if page else None
            out.prev_before = page[0].rk if len(found.matches) > count and page else None
        else:
            found = engine.find(rtype, criteria, limit=count + 1, after=after, before=limit_before, visible=visible)
            out.matches = found.matches[:count]
            if len(found.matches) > count and out.matches:
                out.next_after = out.matches[-1].rk
            if after is not None and out.matches:
                out.prev_before = out.matches[0].rk
            if after is None and out.total is None and len(found.matches) <= count:
                out.total = len(found.matches)  # everything fit on the first page: the total is known
        out.includes = self._includes(parsed, out.matches, visible)
        return out

    async def everything(self, ctx: RequestContext, pid: str, *, types: frozenset[str] | None, since_ms: int | None,
                         count: int, offset: int, snapshot: int | None,
                         operation: str = "$everything") -> SearchOutcome:
        """Patient/$everything: the patient and every resource of its compartment, paged by offset.

        ``operation`` names the request in the audit trail ($summary reads the record through here)."""
        access = await self.authorize(ctx, "Patient", "r", "operation", f"Patient/{pid}")
        patient = self._store.read_current(self.tenant, "Patient", pid)
        if patient is None:
            raise errors.not_found("Resource not found.")
        if patient.deleted:
            if not access.simple:
                await self._check_deleted(ctx, access, patient, "operation", f"Patient/{pid}")
            raise errors.gone("Resource was deleted.")
        await self._refuse_restricted(ctx, "operation", patient)
        patient_doc = orjson.loads(self._open(patient))
        if not access.simple:
            # The patient first: without access to the patient, nothing of the compartment (404).
            await self._check(ctx, access, patient, patient_doc, "operation", "r", f"Patient/{pid}/{operation}")
        visible = None if access.simple else access
        wanted = sorted(t for t in compartment_types() if (types is None or t in types) and self._may_read(access, t))
        skipped = [t for t in compartment_types() if (types is None or t in types) and not self._may_read(access, t)]

        def run() -> SearchOutcome:
            snap = snapshot if snapshot is not None else self._store.max_rk()
            engine = self.engine()
            everything: list[Match] = []
            if types is None or "Patient" in types:
                everything.append(Match(0, patient, self._open(patient), patient_doc))
            for rtype in wanted:
                seen: set[int] = set()
                rows: list[Match] = []
                for code, _paths in patient_compartment_params(rtype):
                    param = search_params(rtype).get(code)
                    if param is None or param.type != "reference":
                        continue
                    crit = reference_criterion(code, param, [f"Patient/{pid}"])
                    for m in engine.find(rtype, [crit], limit=VERIFY_CAP, before=snap + 1, visible=visible).matches:
                        if m.rk not in seen and (rtype != "Patient" or m.version.id != pid):
                            seen.add(m.rk)
                            rows.append(m)
                rows.sort(key=lambda m: m.rk)
                everything.extend(rows)
                if len(everything) > VERIFY_CAP:
                    raise TooCostly(f"$everything would return more than {VERIFY_CAP} resources: use _type or _since.")
            if since_ms is not None:
                everything = [m for m in everything if m.version.last_updated_ms >= since_ms]
            page = everything[offset:offset + count]
            warnings = [Issue("warning", "suppressed", "Resource types the token may not read were left out: "
                              + ", ".join(skipped[:20]))] if skipped else []
            return SearchOutcome(page, [], len(everything), None, None,
                                 offset + count if offset + count < len(everything) else None,
                                 max(0, offset - count) if offset > 0 else None, snap, warnings)

        outcome = await asyncio.to_thread(run)
        patients = f"Patient/{pid}"
        record = self._record(ctx, "operation", 200, entity=f"Patient/{pid}/{operation}", patient=patients,
                              query=f"_type={sorted(types) if types else '*'} _since={since_ms} offset={offset}",
                              purpose=access.purpose(), restricted=access.restricted or any(
                                  labels_of(m.resource) for m in outcome.matches),
                              result_count=len(outcome.matches))
        await self._store.write("audit.everything", lambda tx: self._audit.record(tx, record))
        return outcome

    def _includes(self, parsed: ParsedSearch, page: list[Match], visible: Access | None = None) -> list[Match]:
        """_include and _revinclude targets; the caller filters them again with 'r' on their content."""
        if not page or not (parsed.includes or parsed.revincludes):
            return []
        engine = self.engine()
        seen = {(m.version.type, m.version.id) for m in page}
        included: list[Match] = []
        frontier = list(page)
        rounds = 0
        while frontier and rounds < 4:  # :iterate, bounded
            rounds += 1
            new: list[Match] = []
            for inc in parsed.includes:
                if rounds > 1 and not inc.iterate:
                    continue
                for m in frontier:
                    if inc.source_type not in (None, m.version.type):
                        continue
                    params = [inc.param] if inc.param else [p for p in search_params(m.version.type).values()
                                                              if p.type == "reference"]
                    for param in params:
                        for ref in engine.references_from(m, param):
                            if not ref.type or not ref.id or ref.base is not None:
                                continue
                            if inc.target_type and ref.type != inc.target_type:
                                continue
                            if (ref.type, ref.id) in seen or len(included) + len(new) >= INCLUDE_CAP:
                                continue
                            v = self._store.read_current(self.tenant, ref.type, ref.id)
                            if v is None or v.deleted:
                                continue
                            seen.add((ref.type, ref.id))
                            body = self._open(v)
                            new.append(Match(0, v, body, orjson.loads(body)))
            for inc in parsed.revincludes:
                if rounds > 1 and not inc.iterate:
                    continue
                if inc.param is None or inc.source_type is None:
                    continue
                refs = [f"{m.version.type}/{m.version.id}" for m in frontier]
                crit = reference_criterion(inc.param.code, inc.param, refs)
                for r in engine.find(inc.source_type, [crit], limit=INCLUDE_CAP, visible=visible).matches:
                    key = (r.version.type, r.version.id)
                    if key not in seen and len(included) + len(new) < INCLUDE_CAP:
                        seen.add(key)
                        new.append(r)
            included.extend(new)
            frontier = new
        return included


    # -- break-the-glass ----------------------------------------------------------
    async def start_break_glass(self, ctx: RequestContext, pid: str, reason: Any, purpose: Any) -> Grant:
        """Emergency access of a practitioner or nurse to one patient (Patient/{id}/$break-glass)."""
        entity = f"Patient/{pid}"
        p = ctx.principal
        if p is None or p.tenant != self.tenant or p.role not in _BREAK_GLASS_ROLES or not p.user:
            await self._refuse(ctx, "break-the-glass", Decision(False, "break-the-glass is for practitioners and"
                                                                       " nurses"), entity)
        assert p is not None and p.user is not None
        await self.authorize(ctx, "Patient", "r", "break-the-glass", entity)
        if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON or len(reason) > MAX_TEXT:
            raise errors.bad_request(f"'reason' is required: {MIN_REASON} to {MAX_TEXT} characters.", "reason")
        if purpose != ETREAT:
            raise errors.bad_request("'purposeOfUse' must be ETREAT (emergency treatment).", "purposeOfUse")
        patient = self._store.read_current(self.tenant, "Patient", pid)
        if patient is None or patient.deleted:
            raise errors.not_found("Resource not found.")
        record = dataclasses.replace(self._record(ctx, "break-the-glass", 201, entity=entity, patient=entity,
                                                  purpose=ETREAT, detail="emergency access started"))
        return await self.break_glass.start(user_id=p.user, role=p.role, fhir_user=p.fhir_user, patient_id=pid,
                                            reason=reason.strip(), purpose=ETREAT,
                                            audit=lambda tx: self._audit.record(tx, record))

    async def _security_officer(self, ctx: RequestContext, interaction: str, entity: str) -> str:
        p = ctx.principal
        if p is None or p.tenant != self.tenant or p.role != "security_officer" or not p.user:
            await self.audit_event(ctx, interaction, 403, "break-the-glass review is for security officers",
                                   entity=entity, category="security")
            raise errors.forbidden("Access denied: the break-the-glass queue is for security officers.")
        return p.user

    async def break_glass_queue(self, ctx: RequestContext, status: str | None) -> list[Grant]:
        await self._security_officer(ctx, "break-the-glass-queue", "break-glass")
        if status not in (None, OPEN, CLOSED):
            raise errors.bad_request("status must be open or closed.", "status")
        grants = self.break_glass.queue(status)
        await self.audit_event(ctx, "break-the-glass-queue", 200, f"{len(grants)} grants listed",
                               entity="break-glass", category="security")
        return grants

    async def review_break_glass(self, ctx: RequestContext, grant_id: str, decision: Any, note: Any) -> Grant:
        entity = f"break-glass/{grant_id[:64]}"
        reviewer = await self._security_officer(ctx, "break-the-glass-review", entity)
        if decision not in DECISIONS:
            raise errors.bad_request("decision must be justified or unjustified.", "decision")
        if not isinstance(note, str) or not note.strip() or len(note) > MAX_TEXT:
            raise errors.bad_request(f"a note (1 to {MAX_TEXT} characters) is required.", "note")
        grant = self.break_glass.get(grant_id) if len(grant_id) <= 64 else None
        if grant is None:
            raise errors.not_found("No such break-the-glass grant.")
        if grant.status != OPEN:
            raise errors.conflict("This break-the-glass case was already reviewed.")
        record = dataclasses.replace(
            self._record(ctx, "break-the-glass-review", 200, entity=entity, patient=f"Patient/{grant.patient_id}",
                         detail=f"decision: {decision}"), category="security")
        return await self.break_glass.review(grant, reviewer=reviewer, decision=decision, note=note.strip(),
                                             audit=lambda tx: self._audit.record(tx, record))


def compartment_types() -> list[str]:
    """Resource types that can belong to a patient compartment (R4 CompartmentDefinition)."""
    return sorted(t for t in resource_types() if patient_compartment_params(t))


class IntegrityError(Exception):
    """Stored data failed authentication: it was tampered with or its key is gone."""


class ConcurrentChange(OperationOutcomeError):
    """The resource changed between read and write (optimistic concurrency); try again."""

    def __init__(self) -> None:
        super().__init__(409, [Issue("error", "conflict", "The resource changed while the request was processed; retry.")])


__all__ = ["OperationOutcomeError", "Repository", "RequestContext", "ResourceResult"]
