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

Every file is all-or-nothing (services/bulk_import.py). Jobs live in the shared bulk job store
(services/bulk_jobs.py: a sealed row in the database, files sealed under the job's key in
``DATA_DIR/bulk/<job>/``), run on its thread pool, and are visible to the client that started them only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import is_resource_type
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.services.bulk_import import BulkImporter, FileOutcome
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
    new_job,
)
from fhirvault.services.repository import RequestContext

NDJSON = "application/fhir+ndjson"
_NDJSON_TYPES = {NDJSON, "application/ndjson", "application/x-ndjson"}
MAX_FILES = 1000
UPLOAD = "upload.ndjson"  # a direct upload's body, sealed in the job's folder
MAX_FILE_BYTES = 256 << 20  # a file is held in memory while it is validated (all or nothing): split larger ones


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
    """Kick-off, status, error files and cancel of import jobs, kept in the shared bulk job store."""

    def __init__(self, importer: BulkImporter, import_dir: Path, jobs: BulkJobStore, files: JobFiles,
                 runner: JobRunner, now_ms: Callable[[], int], tenant: str) -> None:
        self._importer = importer
        self._dir = import_dir
        self._jobs = jobs
        self._files = files
        self._runner = runner
        self._now_ms = now_ms
        self._tenant = tenant

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
            inputs: list[tuple[str | None, str]] = [(rtype, UPLOAD)]
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
        if direct is None:
            for _t, url in inputs:
                resolve_input(self._dir, url)  # refused now (400), not later in the job
        p = req.ctx.principal
        assert p is not None  # authorize() refused anonymous callers
        job = new_job("import", self._tenant, p.client_id, p.user, req.base_url + "/$import", self._now_ms(),
                      {"inputs": [[t, url] for t, url in inputs], "source": source[:500], "files": [],
                       "upload": direct is not None})
        await asyncio.to_thread(self._jobs.save, job)
        if direct is not None:  # kept sealed under the job's key until the job has read it
            await asyncio.to_thread(self._store_upload, job, direct)
        done: Future[None] = Future()
        ctx = req.ctx
        failures: list[Exception] = []

        def work(control: JobControl) -> None:
            try:
                self._run(control, ctx)
            except JobCancelled:
                raise
            except Exception as exc:  # recorded before the synchronous caller is woken up
                failures.append(exc)
                self._jobs.update(control.job_id, control.fail(_reason(exc)))
                raise
            finally:
                # The upload is resource content: not kept once read (the error files name no values).
                (self._files.folder(control.job_id) / UPLOAD).unlink(missing_ok=True)
                done.set_result(None)

        self._runner.submit(job.job_id, work)
        if "respond-async" not in (req.header("prefer") or ""):
            waiting = asyncio.wrap_future(done)
            while True:  # the job's end, or its row finished by someone else (a shutdown never runs it)
                await asyncio.wait([waiting], timeout=2)
                finished = await asyncio.to_thread(self._jobs.get, job.job_id)
                if waiting.done() or finished is None or finished.status in FINISHED or finished.stale(
                        self._now_ms()):
                    break
            if failures and isinstance(failures[0], errors.OperationOutcomeError):
                raise failures[0]  # with its own status (409 for a conflict)
            if finished is None or finished.status != COMPLETED:
                raise _failure(finished)
            return self._manifest(req, finished)
        status = f"{req.base_url}/$import-status/{job.job_id}"
        return FhirResponse(202, b"", {"Content-Location": status})

    def _store_upload(self, job: BulkJob, data: bytes) -> None:
        writer = self._files.writer(job, UPLOAD)
        writer.write(data)
        writer.close()

    def _run(self, control: JobControl, ctx: RequestContext) -> None:
        """The import of a job's files, one after the other (each file all-or-nothing)."""
        job = self._jobs.get(control.job_id)
        if job is None:
            return
        inputs = job.params["inputs"]
        outcomes: list[FileOutcome] = []
        error_files: list[JobFile] = []
        for n, (rtype, url) in enumerate(inputs):
            control.checkpoint(f"file {n + 1} of {len(inputs)}", force=True)
            if job.params["upload"]:
                data = b"".join(self._files.read(job, UPLOAD))
            else:
                path = resolve_input(self._dir, url)
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ValueError(f"input {n + 1} is larger than {MAX_FILE_BYTES} bytes")
                data = path.read_bytes()
            outcome = self._importer.import_file(ctx, url, data, expected_type=rtype, job_id=job.job_id)
            outcomes.append(outcome)
            if outcome.errors:
                name = f"errors-{n}.ndjson"
                writer = self._files.writer(job, name)
                for e in outcome.errors:
                    writer.write(orjson.dumps(e.outcome()) + b"\n")
                writer.close()
                error_files.append(JobFile("OperationOutcome", name, len(outcome.errors)))

        def fill(j: BulkJob) -> None:
            j.errors = error_files
            j.outputs = [JobFile(t, f"input-{n}", c) for n, o in enumerate(outcomes) if o.committed
                         for t, c in sorted(o.counts.items())]
            j.params["files"] = [{"inputUrl": o.source, "sha256": o.sha256, "lines": o.lines,
                                  "committed": o.committed, "count": o.count if o.committed else 0,
                                  "refusedLines": len(o.errors)} for o in outcomes]

        control.complete(fill)

    # -- status -------------------------------------------------------------------
    async def _job(self, req: FhirRequest, job_id: str) -> BulkJob:
        job = await asyncio.to_thread(self._jobs.get, job_id)
        p = req.ctx.principal
        # Another client's job is not found: its existence is not confirmed.
        if job is None or job.kind != "import" or p is None or not job.owned_by(p.client_id, p.user):
            raise errors.not_found("No such import job.")
        if job.stale(self._now_ms()):  # the process running it died
            self._runner.cancel(job.job_id)
            job.status, job.failure = FAILED, "the server stopped while the import ran"
        return job

    async def _status(self, req: FhirRequest) -> FhirResponse:
        seg = req.segments
        if len(seg) not in (2, 4) or (len(seg) == 4 and seg[2] != "error"):
            raise errors.not_found("Unknown URL.")
        job = await self._job(req, seg[1])
        if len(seg) == 4:
            if req.method != "GET":
                raise errors.method_not_allowed("Error files are read with GET.")
            name = f"errors-{seg[3]}.ndjson"
            if job.status != COMPLETED or name not in {f.name for f in job.errors}:
                raise errors.not_found("No such error file.")
            body = await asyncio.to_thread(lambda: b"".join(self._files.read(job, name)))
            return FhirResponse(200, body, {"Content-Type": NDJSON})
        if req.method == "DELETE":
            self._runner.cancel(job.job_id)
            await asyncio.to_thread(self._jobs.delete, job.job_id)
            await asyncio.to_thread(self._files.remove, job.job_id)
            return FhirResponse(202)
        if req.method != "GET":
            raise errors.method_not_allowed("Poll the status with GET, forget the job with DELETE.")
        if job.status not in FINISHED:
            return FhirResponse(202, b"", {"X-Progress": job.progress[:100], "Retry-After": "1"})
        if job.status != COMPLETED:
            raise _failure(job)
        return self._manifest(req, job)

    def _manifest(self, req: FhirRequest, job: BulkJob) -> FhirResponse:
        status = f"{req.base_url}/$import-status/{job.job_id}"
        files = job.params.get("files", [])
        inputs = job.params["inputs"]
        outputs = [{"type": f.type, "inputUrl": inputs[_number(f.name)][1], "count": f.count} for f in job.outputs]
        errs = [{"type": "OperationOutcome", "inputUrl": inputs[_number(f.name)][1], "count": f.count,
                 "url": f"{status}/error/{_number(f.name)}"} for f in job.errors]
        doc = {"transactionTime": instant(job.finished_ms or job.created_ms), "request": job.request,
               "requiresAccessToken": True, "output": outputs, "error": errs, "extension": {"files": files}}
        return FhirResponse(200, orjson.dumps(doc), {"Content-Type": "application/json"})


def _reason(exc: Exception) -> str:
    """One line for a failed job: the outcome's diagnostics (a conflict…), a ValueError's text, or the type."""
    if isinstance(exc, errors.OperationOutcomeError):
        return "; ".join(i.diagnostics for i in exc.issues)[:200]
    return str(exc.args[0])[:200] if isinstance(exc, ValueError) and exc.args else type(exc).__name__


def _number(name: str) -> int:
    """The input number in a job file's name (input-3, errors-3.ndjson)."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


def _failure(job: BulkJob | None) -> errors.OperationOutcomeError:
    reason = job.failure if job is not None and job.failure else "unknown"
    return errors.OperationOutcomeError(500, [errors.Issue("error", "exception", f"The import failed: {reason}")])
