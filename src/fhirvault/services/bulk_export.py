"""FHIR Bulk Data $export: kick-off checks, the export job, downloads, cancel, retention.

The export reads through the same machinery as a search: the caller's ``Access`` (services/access.py)
judges every resource (the cheap compartment check on the data key first, then the full decision on
the content), ``_typeFilter`` queries are parsed and resolved by the search engine. What the caller may
not read is left out, never reported. Patient- and Group-level exports keep the resources filed in a
patient compartment (known from the data key, without decrypting): a patient's token gets their own.

Outputs are NDJSON files sealed under the job's key (services/bulk_jobs.py), downloadable only by the
client (and user) that started the export, through signed links that expire, with its access token.
Every kick-off, completion, download and cancel is an audit entry; "export" feeds detection's
after-hours bulk rule.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.domain.errors import Issue
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import resource_types
from fhirvault.domain.search.match import matches
from fhirvault.domain.search.query import Criterion, parse_search
from fhirvault.ports import Clock, ResourceStore, SearchQuery, StoredVersion
from fhirvault.services.access import Access
from fhirvault.services.audit import AuditRecord, AuditTrail, outcome_for
from fhirvault.services.auth import Principal
from fhirvault.services.bulk_jobs import (
    COMPLETED,
    FAILED,
    FINISHED,
    BulkJob,
    BulkJobStore,
    JobCancelled,
    JobControl,
    JobFile,
    JobFiles,
    JobRunner,
    SealedWriter,
    new_job,
)
from fhirvault.services.crypto import DecryptionError
from fhirvault.services.keys import KeyRing
from fhirvault.services.repository import Repository, RequestContext, compartment_types
from fhirvault.services.search import SearchEngine

log = logging.getLogger("fhirvault.bulk")

URL_SECRET = "bulk-output-url"  # noqa: S105 - ServiceSecrets name of the output-link signing key
FILE_MAX_LINES = 10_000  # resources per output file: downloads stay bounded in memory
FILE_MAX_BYTES = 32 * 1024 * 1024
_SCAN = 500  # candidates read per store query
MAX_ACTIVE_PER_CLIENT = 3  # queued or running exports per client: more is a 429
_NOT_EXPORTED = frozenset({"AuditEvent"})  # the audit trail has its own API, not the resource store


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """A validated kick-off: the level, what to export, and the warnings of a lenient request."""

    level: str  # system | patient | group
    request_url: str
    types: tuple[str, ...] | None = None  # _type; None: every type the caller may read
    since_ms: int | None = None
    type_filters: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (type, query) per _typeFilter
    group: str | None = None
    patients: tuple[str, ...] | None = None  # the ``patient`` parameter: only these compartments
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class _Scope:
    """What one export job reads: types, filters, compartments; and what it found."""

    types: list[str]
    filters: dict[str, list[list[Criterion] | None]] = field(default_factory=dict)
    patient_level: bool = False
    patients: frozenset[str] | None = None
    found_patients: set[str] = field(default_factory=set)


def _scan_tags(engine: SearchEngine, rtype: str, filters: list[list[Criterion]]) -> tuple[
        tuple[tuple[bytes, ...], ...], tuple[str, ...] | None]:
    """Index tags (and _id values) narrowing the store scan: only with one filter (several are OR-ed)."""
    if len(filters) != 1:
        return (), None
    return engine.tag_groups(rtype, filters[0]), engine.id_filter(filters[0])


class BulkExportService:
    def __init__(self, repo: Repository, store: ResourceStore, keys: KeyRing, audit: AuditTrail, clock: Clock,
                 url_secret: bytes, data_dir: Path, *, tenant: str, retention_hours: int = 24,
                 link_minutes: int = 60, threads: int = 2) -> None:
        self._repo = repo
        self._store = store
        self._audit = audit
        self._clock = clock
        self._url_key = url_secret
        self._tenant = tenant
        self.retention_ms = retention_hours * 3_600_000
        self.link_ms = link_minutes * 60_000
        self.jobs = BulkJobStore(store, keys, tenant)
        self.files = JobFiles(data_dir / "bulk")
        self.runner = JobRunner(self.jobs, clock, threads=threads)

    # -- audit ------------------------------------------------------------------------
    def _record(self, ctx: RequestContext | None, job: BulkJob | None, interaction: str, status: int, *,
                entity: str, detail: str | None = None, query: str | None = None, patient: str | None = None,
                result_count: int | None = None, principal: Principal | None = None) -> AuditRecord:
        p = principal or (ctx.principal if ctx is not None else None)
        return AuditRecord(
            ts_ms=self._clock.now_ms(), interaction=interaction, outcome=outcome_for(status), status=status,
            request_id=ctx.request_id if ctx is not None else (f"bulk-{job.job_id[:12]}" if job else "-"),
            client_id=p.client_id if p else (job.client_id if job else None),
            source_ip=ctx.source_ip if ctx is not None else None, entity=entity, patient=patient, query=query,
            detail=detail, user=p.user if p else (job.user if job else None), role=p.role if p else None,
            result_count=result_count)

    async def _audit_async(self, record: AuditRecord) -> None:
        await self._store.write("audit.export", lambda tx: self._audit.record(tx, record))

    def _audit_sync(self, record: AuditRecord) -> None:
        self._store.write_sync("audit.export", lambda tx: self._audit.record(tx, record))

    # -- kick-off ------------------------------------------------------------------------
    async def kick_off(self, ctx: RequestContext, request: ExportRequest, entity: str) -> BulkJob:
        p = ctx.principal
        if p is None:
            raise errors.unauthorized("Authentication required.")
        access = self._repo.guard.for_principal(p, "search")
        if request.level == "system" and not (p.role is None and any(
                s.context == "system" and "r" in s.permissions for s in p.grants.scopes)):
            await self._audit_async(self._record(ctx, None, "export", 403, entity=entity,
                                                 detail="system-level export needs system scopes"))
            raise errors.forbidden("A system-level export needs a backend-services token with system/*.read "
                                   "(or system/[type].read) scopes.")
        scope = await self._plan(ctx, access, request, entity)
        active = [j for j in await asyncio.to_thread(self.jobs.all)
                  if j.kind == "export" and j.client_id == p.client_id and j.status not in FINISHED
                  and (self.runner.runs(j.job_id) or not j.stale(self._clock.now_ms()))]
        if len(active) >= MAX_ACTIVE_PER_CLIENT:
            raise errors.too_many_requests(f"At most {MAX_ACTIVE_PER_CLIENT} exports may run at once per client; "
                                           "wait for one to finish or cancel one.", 30)
        now = self._clock.now_ms()
        params: dict[str, Any] = {
            "level": request.level, "types": scope.types, "since_ms": request.since_ms,
            "filters": [[t, list(q)] for t, q in request.type_filters], "group": request.group,
            "patients": sorted(scope.patients) if scope.patients is not None else None,
            "warnings": list(request.warnings), "snapshot": self._store.max_rk(),
        }
        job = new_job("export", self._tenant, p.client_id, p.user, request.request_url, now, params)
        job.transaction_time_ms = now
        await asyncio.to_thread(self.jobs.save, job)
        own = access.facts.own_patient
        await self._audit_async(self._record(ctx, job, "export", 202, entity=entity,
                                             query=request.request_url.partition("?")[2][:2000] or None,
                                             patient=f"Patient/{own}" if own else None,
                                             detail=f"bulk export job {job.job_id} started"))
        principal = p
        self.runner.submit(job.job_id, lambda control: self._run(control, principal))
        return job

    async def _plan(self, ctx: RequestContext, access: Access, request: ExportRequest, entity: str) -> _Scope:
        """Types, filters and compartments of an export; a refused explicit type is a 403 (recorded)."""
        patient_level = request.level in ("patient", "group")
        universe = compartment_types() if patient_level else sorted(resource_types())
        universe = [t for t in universe if t not in _NOT_EXPORTED]
        if request.types is not None:
            outside = [t for t in request.types if t not in universe]
            if outside:
                raise errors.bad_request(f"_type names types this export cannot contain: {', '.join(outside[:10])}"
                                         + (" (not in a patient compartment)" if patient_level else ""), "_type")
            for rtype in request.types:
                await self._repo.authorize(ctx, rtype, "r", "export", entity)
            types = list(request.types)
        else:
            types = [t for t in universe if access.type_level(t, "r").allowed]
        for rtype, _query in request.type_filters:
            if rtype not in types:
                raise errors.bad_request(f"_typeFilter names {rtype}, which this export does not contain.",
                                         "_typeFilter")
        patients: frozenset[str] | None = frozenset(request.patients) if request.patients is not None else None
        if request.level == "group":
            members = await self._group_members(ctx, request.group or "")
            patients = members if patients is None else patients & members
        own = access.facts.own_patient
        if access.facts.role == "patient":  # a patient's token: their compartment, nothing else
            if own is None:
                raise errors.forbidden("This patient token names no patient (fhirUser).")
            patients = frozenset({own}) if patients is None else patients & {own}
        return _Scope(types, {}, patient_level, patients)

    async def _group_members(self, ctx: RequestContext, group_id: str) -> frozenset[str]:
        """The Patients a Group lists (read as the caller: the Group itself must be readable)."""
        result = await self._repo.read(ctx, "Group", group_id)
        group = orjson.loads(result.body)
        members = set()
        for member in group.get("member") or ():
            ref = (member.get("entity") or {}).get("reference") if isinstance(member, dict) else None
            if isinstance(ref, str) and ref.startswith("Patient/") and not member.get("inactive"):
                members.add(ref[len("Patient/"):])
        return frozenset(members)

    # -- the job ------------------------------------------------------------------------
    def _run(self, control: JobControl, principal: Principal) -> None:
        job = self.jobs.get(control.job_id)
        if job is None:
            return
        params = job.params
        access = self._repo.guard.for_principal(principal, "search")
        engine = self._repo.engine()
        visible = None if access.simple else access
        scope = _Scope(list(params["types"]), patient_level=params["level"] in ("patient", "group"),
                       patients=frozenset(params["patients"]) if params["patients"] is not None else None)
        for rtype, query in params["filters"]:
            parsed = parse_search(rtype, [tuple(pair) for pair in query], strict=True, now_ms=job.created_ms)
            scope.filters.setdefault(rtype, []).append(engine.resolve(rtype, parsed.criteria, visible))
        outputs: list[JobFile] = []
        total = 0
        try:
            for n, rtype in enumerate(scope.types):
                control.checkpoint(f"{n}/{len(scope.types)} types, {total} resources")
                written = self._export_type(job, control, engine, access, scope, rtype, params)
                outputs.extend(written)
                total += sum(f.count for f in written)
            errors_out = self._warnings_file(job, params["warnings"])
        except JobCancelled:
            raise
        except Exception:
            self.files.remove(job.job_id)
            raise
        patients = sorted(scope.found_patients)

        def fill(j: BulkJob) -> None:
            j.outputs, j.errors = outputs, errors_out

        if control.complete(fill) is None:  # cancelled meanwhile
            self.files.remove(job.job_id)
            return
        self._audit_sync(self._record(
            None, job, "export-complete", 200, entity=f"$export/{job.job_id}", principal=principal,
            result_count=total, patient=",".join(f"Patient/{p}" for p in patients[:100]) or None,
            detail=f"{total} resources of {len(patients)} patients in {len(outputs)} files"))

    def _export_type(self, job: BulkJob, control: JobControl, engine: SearchEngine, access: Access, scope: _Scope,
                     rtype: str, params: dict[str, Any]) -> list[JobFile]:
        filters = scope.filters.get(rtype, [])
        if filters and all(f is None for f in filters):
            return []  # every filter's chain or _has matched nothing
        live = [f for f in filters if f is not None]
        groups, ids = _scan_tags(engine, rtype, live)
        since, snapshot = params["since_ms"], params["snapshot"]
        files: list[JobFile] = []
        writer: SealedWriter | None = None
        lines = part = 0
        after: int | None = None
        try:
            while True:
                batch = self._store.search(SearchQuery(self._tenant, (rtype,), groups, after, snapshot + 1,
                                                       False, _SCAN, ids))
                for rk, version in batch:
                    after = rk
                    body = self._admit(access, scope, rtype, version, since, live)
                    if body is None:
                        continue
                    if writer is None or lines >= FILE_MAX_LINES or writer.size >= FILE_MAX_BYTES:
                        if writer is not None:
                            writer.close()
                            files.append(JobFile(rtype, f"{rtype}.{part}.ndjson", lines))
                        part += 1
                        lines = 0
                        writer = self.files.writer(job, f"{rtype}.{part}.ndjson")
                    writer.write(body + b"\n")
                    lines += 1
                control.checkpoint(f"{rtype}: {sum(f.count for f in files) + lines} resources")
                if len(batch) < _SCAN:
                    break
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
            files.append(JobFile(rtype, f"{rtype}.{part}.ndjson", lines))
        return files

    def _admit(self, access: Access, scope: _Scope, rtype: str, v: StoredVersion, since: int | None,
               filters: list[list[Criterion]]) -> bytes | None:
        """The resource's JSON if it belongs in the export and the caller may read it, else None."""
        if v.deleted or (since is not None and v.last_updated_ms < since):
            return None
        pid = self._repo.guard.patient_of_key(v.key_id)
        if scope.patient_level and (pid is None or (scope.patients is not None and pid not in scope.patients)):
            return None
        if not access.simple and not access.before(v):
            return None
        body = self._repo.open_version(v)
        if filters or not access.simple:
            resource = orjson.loads(body)
            if filters and not any(all(matches(c, rtype, resource) for c in f) for f in filters):
                return None
            if not access.simple and not access.after(rtype, resource, v):
                return None
        if pid is not None:
            scope.found_patients.add(pid)
        return body

    def _warnings_file(self, job: BulkJob, warnings: list[str]) -> list[JobFile]:
        if not warnings:
            return []
        outcome = errors.operation_outcome([Issue("warning", "not-supported", w) for w in warnings])
        writer = self.files.writer(job, "OperationOutcome.warnings.ndjson")
        writer.write(orjson.dumps(outcome) + b"\n")
        writer.close()
        return [JobFile("OperationOutcome", "OperationOutcome.warnings.ndjson", 1)]

    # -- status, download, cancel --------------------------------------------------------
    async def owned(self, ctx: RequestContext, job_id: str, interaction: str) -> BulkJob:
        """The caller's own job; anyone else's is a 404 (recorded), as if it did not exist."""
        job = await asyncio.to_thread(self.jobs.get, job_id)
        p = ctx.principal
        if job is None or job.kind != "export" or p is None or not job.owned_by(p.client_id, p.user):
            if job is not None:
                await self._audit_async(self._record(ctx, job, interaction, 403, entity=f"$export/{job_id[:64]}",
                                                     detail="bulk job of another client"))
            raise errors.not_found("No such export job (or it expired).")
        if job.stale(self._clock.now_ms()) and not self.runner.runs(job.job_id):  # its process died while it ran
            self.runner.cancel(job.job_id)
            job = await asyncio.to_thread(self.jobs.update, job_id, _failed_by_restart(self._clock.now_ms())) or job
        return job

    def sign(self, job: BulkJob, name: str, expires_ms: int) -> str:
        msg = "\n".join((job.job_id, name, str(expires_ms), job.client_id, job.user or "")).encode()
        return base64.urlsafe_b64encode(hmac.new(self._url_key, msg, hashlib.sha256).digest()[:24]).decode()

    async def download(self, ctx: RequestContext, job_id: str, name: str, expires: str | None,
                       sig: str | None) -> bytes:
        job = await self.owned(ctx, job_id, "export-download")
        entity = f"$export/{job_id}/{name[:100]}"
        known = {f.name: f for f in (*job.outputs, *job.errors)}
        if job.status != COMPLETED or name not in known:
            raise errors.not_found("No such output file.")
        now = self._clock.now_ms()
        valid = expires is not None and expires.isdigit() and len(expires) < 16 and sig is not None and \
            hmac.compare_digest(self.sign(job, name, int(expires)), sig)
        if not valid or int(expires or 0) < now:
            await self._audit_async(self._record(ctx, job, "export-download", 403, entity=entity,
                                                 detail="expired or invalid output link"))
            raise errors.forbidden("This output link is invalid or has expired: poll the status URL for fresh links.")
        try:
            data = await asyncio.to_thread(lambda: b"".join(self.files.read(job, name)))
        except (OSError, DecryptionError):
            log.error("bulk output file unreadable (missing or altered)")
            raise errors.internal_error() from None
        await self._audit_async(self._record(ctx, job, "export-download", 200, entity=entity,
                                             result_count=known[name].count))
        return data

    async def cancel(self, ctx: RequestContext, job_id: str) -> None:
        """Stop the job (if it runs here), delete its files and its row: afterwards it is a 404."""
        job = await self.owned(ctx, job_id, "export-cancel")
        self.runner.cancel(job.job_id)
        await asyncio.to_thread(self.jobs.delete, job.job_id)
        await asyncio.to_thread(self.files.remove, job.job_id)
        await self._audit_async(self._record(ctx, job, "export-cancel", 202, entity=f"$export/{job.job_id}",
                                             detail=f"bulk export job {job.job_id} cancelled, files deleted"))

    def manifest(self, job: BulkJob, base_url: str) -> dict[str, Any]:
        expires = self._clock.now_ms() + self.link_ms

        def entry(f: JobFile) -> dict[str, Any]:
            url = f"{base_url}/$bulk-output/{job.job_id}/{f.name}?expires={expires}&sig={self.sign(job, f.name, expires)}"
            return {"type": f.type, "url": url, "count": f.count}
        return {"transactionTime": instant(job.transaction_time_ms), "request": job.request,
                "requiresAccessToken": True, "output": [entry(f) for f in job.outputs],
                "error": [entry(f) for f in job.errors]}

    def expires_ms(self, job: BulkJob) -> int:
        """When the retention sweep deletes a finished job's outputs."""
        return job.finished_ms + self.retention_ms

    # -- retention --------------------------------------------------------------------------
    def sweep(self) -> int:
        """Delete finished jobs past retention (rows and files), fail stale ones, drop orphan folders."""
        now = self._clock.now_ms()
        removed = 0
        jobs = self.jobs.all()
        for job in jobs:  # $import jobs (services/bulk_import.py) share the store: kept as long as exports
            if job.status in FINISHED and now - job.finished_ms > self.retention_ms:
                self.jobs.delete(job.job_id)
                self.files.remove(job.job_id)
                removed += 1
                self._audit_sync(AuditRecord(now, f"{job.kind}-expire", "0", 200, "-", client_id=job.client_id,
                                             user=job.user, entity=f"${job.kind}/{job.job_id}", category="system",
                                             detail=f"bulk {job.kind} job and its files deleted after the retention time"))
            elif job.kind == "export" and job.stale(now) and not self.runner.runs(job.job_id):
                self.jobs.update(job.job_id, _failed_by_restart(now))
        live = {j.job_id for j in jobs}
        for folder in self.files.folders():
            if folder not in live and self.jobs.get(folder) is None:
                self.files.remove(folder)
        return removed

    def close(self) -> None:
        self.runner.close()


def _failed_by_restart(now: int) -> Callable[[BulkJob], bool]:
    def change(job: BulkJob) -> bool:
        if job.status in FINISHED:
            return False
        job.status, job.failure, job.finished_ms = FAILED, "the server stopped while the export ran", now
        return True

    return change

