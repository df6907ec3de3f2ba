"""``$import``: NDJSON in, by direct upload or from the server's import directory; sync or async.

- ``POST [base]/$import`` with ``Content-Type: application/fhir+ndjson``: the body is one file
  (``?type=Patient`` optionally declares its type).
- ``POST [base]/$import`` with a Parameters resource (the Bulk Data import manifest style):
  ``inputFormat`` (application/fhir+ndjson), ``inputSource`` (where the data comes from, recorded),
  and ``input`` parts of ``type`` and ``url``. A url names a file in the server's import directory
  (``DATA_DIR/import/``, by name or as a ``file://`` URL inside it): nothing else is ever read, so
  a token cannot make the server read an arbitrary local file or fetch from the network.
- ``Prefer: respond-async``: 202 with ``Content-Location`` naming ``[base]/$import-status/{job}``;
  polling it answers 202 (``X-Progress``) then 200 with the manifest; each file's refused lines are
  an NDJSON of OperationOutcomes at ``.../$import-status/{job}/error/{n}``; DELETE forgets the job.
  Without it the import runs during the request and the manifest is the answer.

Every file is all-or-nothing (services/bulk_import.py). Jobs are kept in this process's memory
(lost at a restart; with several workers, poll the worker that answered): they hold counts and
error outcomes, never resource content (error diagnostics never echo submitted values).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import is_resource_type
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.services.bulk_import import BulkImporter, FileOutcome
from fhirvault.services.repository import RequestContext

log = logging.getLogger("fhirvault.import")
NDJSON = "application/fhir+ndjson"
_NDJSON_TYPES = {NDJSON, "application/ndjson", "application/x-ndjson"}
MAX_FILES = 1000
MAX_JOBS = 100  # finished jobs kept in memory; the oldest are forgotten first
MAX_FILE_BYTES = 2 << 30


@dataclass(slots=True)
class ImportJob:
    job_id: str
    client_id: str
    request: str
    created_ms: int
    inputs: list[tuple[str | None, str]]  # (declared type, source url)
    status: str = "running"  # running | completed | failed
    progress: str = "queued"
    files: list[FileOutcome] = field(default_factory=list)
    failure: str | None = None
    finished_ms: int = 0


def _media(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _parameters(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.bad_request("$import takes a Parameters resource or an application/fhir+ndjson body.")
    params = body.get("parameter")
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise errors.bad_request("Parameters.parameter must be a list of parameters.", "parameter")
    return params


def _value(part: dict[str, Any]) -> str | None:
    for key in ("valueString", "valueUri", "valueUrl", "valueCode", "valueCanonical"):
        if isinstance(part.get(key), str):
            return str(part[key])
    return None


def parse_manifest(body: Any) -> tuple[str | None, list[tuple[str | None, str]]]:
    """(inputSource, [(type, url)]) of a Bulk Data import Parameters resource."""
    source: str | None = None
    inputs: list[tuple[str | None, str]] = []
    for p in _parameters(body):
        name = p.get("name")
        if name == "inputFormat":
            if _media(_value(p)) not in _NDJSON_TYPES:
                raise errors.bad_request("inputFormat must be application/fhir+ndjson.", "inputFormat")
        elif name == "inputSource":
            source = _value(p)
        elif name == "input":
            parts = {q.get("name"): _value(q) for q in p.get("part") or [] if isinstance(q, dict)}
            url, rtype = parts.get("url"), parts.get("type")
            if not url:
                raise errors.bad_request("Each input needs a url part.", "input.url")
            if rtype is not None and not is_resource_type(rtype):
                raise errors.bad_request("An input's type is not an R4 resource type.", "input.type")
            inputs.append((rtype, url))
        elif name in ("storageDetail", "mode"):
            continue
        else:
            raise errors.bad_request("Unknown $import parameter.", str(name)[:40])
    if not inputs:
        raise errors.bad_request("$import needs at least one input.", "input")
    if len(inputs) > MAX_FILES:
        raise errors.bad_request(f"At most {MAX_FILES} inputs per $import.", "input")
    return source, inputs


def resolve_input(root: Path, url: str) -> Path:
    """The file an input url names, which must be a regular file inside the import directory."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file") or (parsed.scheme == "file" and parsed.netloc not in ("", "localhost")):
        raise errors.bad_request("Inputs are read only from the server's import directory (file names or file:// "
                                 "URLs inside it); other URLs are not fetched.", "input.url")
    name = unquote(parsed.path) if parsed.scheme else url
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise errors.bad_request("An input is outside the server's import directory.", "input.url")
    if not path.is_file():
        raise errors.bad_request("An input file does not exist in the import directory.", "input.url")
    return path


class ImportApi:
    def __init__(self, importer: BulkImporter, import_dir: Path, now_ms: Any) -> None:
        self._importer = importer
        self._dir = import_dir
        self._now_ms = now_ms
        self._jobs: dict[str, ImportJob] = {}
        self._lock = threading.Lock()

    async def handle(self, req: FhirRequest) -> FhirResponse:
        seg = req.segments
        if seg[0] == "$import":
            if len(seg) != 1 or req.method != "POST":
                raise errors.method_not_allowed("$import is a POST on the server base.")
            return await self._kick_off(req)
        return await self._status(req)

    # -- kick-off ---------------------------------------------------------------
    async def _kick_off(self, req: FhirRequest) -> FhirResponse:
        media = _media(req.header("content-type"))
        direct: bytes | None = None
        if media in _NDJSON_TYPES:
            rtype = req.param("type")
            if rtype is not None and not is_resource_type(rtype):
                raise errors.bad_request("type is not an R4 resource type.", "type")
            inputs: list[tuple[str | None, str]] = [(rtype, "upload")]
            direct, source = req.body, "upload"
            types = [rtype] if rtype else ["*"]
        else:
            if media and media not in ("application/fhir+json", "application/json"):
                raise errors.unsupported_media_type("$import takes application/fhir+ndjson or a Parameters resource.")
            try:
                body = orjson.loads(req.body or b"null")
            except orjson.JSONDecodeError:
                raise errors.bad_request("The request body is not valid JSON.", code="structure") from None
            source_name, inputs = parse_manifest(body)
            source = source_name or "import-directory"
            types = sorted({t or "*" for t, _ in inputs})
        await self._importer.authorize(req.ctx, types, "$import")
        files = [] if direct is not None else [resolve_input(self._dir, url) for _t, url in inputs]
        job = ImportJob(secrets.token_urlsafe(18), req.ctx.principal.client_id if req.ctx.principal else "",
                        req.base_url + "/$import", self._now_ms(), inputs)
        run = _Run(self._importer, job, req.ctx, direct, files, source)
        self._remember(job)  # also when synchronous: the manifest's error files are read from it
        if "respond-async" not in (req.header("prefer") or ""):
            await asyncio.to_thread(run)
            if run.error is not None:
                raise run.error
            return self._manifest(req, job)
        threading.Thread(target=run, name="fhirvault-import", daemon=True).start()
        status = f"{req.base_url}/$import-status/{job.job_id}"
        return FhirResponse(202, b"", {"Content-Location": status})

    def _remember(self, job: ImportJob) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j.status != "running"]
            for old in sorted(finished, key=lambda j: j.created_ms)[:max(0, len(self._jobs) - MAX_JOBS + 1)]:
                self._jobs.pop(old.job_id, None)
            self._jobs[job.job_id] = job

    # -- status -------------------------------------------------------------------
    def _job(self, req: FhirRequest, job_id: str) -> ImportJob:
        with self._lock:
            job = self._jobs.get(job_id)
        p = req.ctx.principal
        # Another client's job is not found: its existence is not confirmed.
        if job is None or p is None or p.client_id != job.client_id:
            raise errors.not_found("No such import job.")
        return job

    async def _status(self, req: FhirRequest) -> FhirResponse:
        seg = req.segments
        if len(seg) not in (2, 4) or (len(seg) == 4 and seg[2] != "error"):
            raise errors.not_found("Unknown URL.")
        job = self._job(req, seg[1])
        if len(seg) == 4:
            if req.method != "GET":
                raise errors.method_not_allowed("Error files are read with GET.")
            if not seg[3].isdigit() or int(seg[3]) >= len(job.files) or job.status == "running":
                raise errors.not_found("No such error file.")
            outcome = job.files[int(seg[3])]
            body = b"".join(orjson.dumps(e.outcome()) + b"\n" for e in outcome.errors)
            return FhirResponse(200, body, {"Content-Type": NDJSON})
        if req.method == "DELETE":
            with self._lock:
                self._jobs.pop(job.job_id, None)
            return FhirResponse(202)
        if req.method != "GET":
            raise errors.method_not_allowed("Poll the status with GET, forget the job with DELETE.")
        if job.status == "running":
            return FhirResponse(202, b"", {"X-Progress": job.progress, "Retry-After": "1"})
        if job.status == "failed":
            raise errors.OperationOutcomeError(500, [errors.Issue("error", "exception",
                                                                  f"The import failed: {job.failure}")])
        return self._manifest(req, job)

    def _manifest(self, req: FhirRequest, job: ImportJob) -> FhirResponse:
        status = f"{req.base_url}/$import-status/{job.job_id}"
        outputs, errs, details = [], [], []
        for n, f in enumerate(job.files):
            outputs += [{"type": t, "inputUrl": f.source, "count": c} for t, c in sorted(f.counts.items())
                        if f.committed]
            if f.errors:
                errs.append({"type": "OperationOutcome", "inputUrl": f.source, "count": len(f.errors),
                             "url": f"{status}/error/{n}"})
            details.append({"inputUrl": f.source, "sha256": f.sha256, "lines": f.lines, "committed": f.committed,
                            "count": f.count if f.committed else 0, "refusedLines": len(f.errors)})
        doc = {"transactionTime": instant(job.finished_ms or job.created_ms), "request": job.request,
               "requiresAccessToken": True, "output": outputs, "error": errs, "extension": {"files": details}}
        return FhirResponse(200, orjson.dumps(doc), {"Content-Type": "application/json"})


class _Run:
    """The import of a job's files, one after the other (each file all-or-nothing)."""

    def __init__(self, importer: BulkImporter, job: ImportJob, ctx: RequestContext, direct: bytes | None,
                 files: list[Path], source: str) -> None:
        self._importer = importer
        self._job = job
        self._ctx = ctx
        self._direct = direct
        self._files = files
        self._source = source
        self.error: errors.OperationOutcomeError | None = None

    def __call__(self) -> None:
        job = self._job
        try:
            if self._direct is not None:
                job.files.append(self._importer.import_file(self._ctx, self._source, self._direct,
                                                            expected_type=job.inputs[0][0], job_id=job.job_id))
            listed = job.inputs if self._direct is None else []
            for n, (path, (rtype, url)) in enumerate(zip(self._files, listed, strict=True)):
                job.progress = f"file {n + 1} of {len(self._files)}"
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ValueError(f"input {n + 1} is larger than {MAX_FILE_BYTES} bytes")
                data = path.read_bytes()
                job.files.append(self._importer.import_file(self._ctx, url, data, expected_type=rtype,
                                                            job_id=job.job_id))
            job.status = "completed"
        except errors.OperationOutcomeError as exc:
            self.error = exc
            job.status, job.failure = "failed", "; ".join(i.diagnostics for i in exc.issues)[:200]
        except Exception as exc:
            log.exception("import job failed")
            self.error = errors.OperationOutcomeError(500, [errors.Issue("error", "exception", "The import failed.")])
            job.status, job.failure = "failed", type(exc).__name__
        finally:
            job.finished_ms = int(time.time() * 1000)
            job.progress = job.status
