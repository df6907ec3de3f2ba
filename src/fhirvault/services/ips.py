"""Patient/$summary: the International Patient Summary of one patient's stored record.

The record is read through Repository.everything, so the rules of $everything hold (scopes,
care relationships, consent, labels; the patient first) and the read is audited as
``Patient/[id]/$summary``. Resources the section entries reference that are not in the
patient's compartment (Medication, Practitioner, Organization...) are read one by one, each
through the same checks and audit; one the caller may not read is left out (the document
then says nothing of it).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import instant
from fhirvault.domain.ips import SECTION_TYPES, build_document, references, section_of
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.services.search import VERIFY_CAP

# Compartment types read besides the section ones: referenced by entries, copied into the document.
_CONTEXT_TYPES = frozenset({"Encounter", "Specimen", "Device"})
# Outside the compartment: read by reference when an entry points at them.
_REFERENCED_TYPES = frozenset({"Medication", "Practitioner", "PractitionerRole", "Organization", "Location",
                               "Substance"})
MAX_REFERENCED = 200


async def patient_summary(repo: Repository, ctx: RequestContext, pid: str, *, base_url: str,
                          now_ms: int) -> dict[str, Any]:
    outcome = await repo.everything(ctx, pid, types=SECTION_TYPES | _CONTEXT_TYPES | {"Patient"}, since_ms=None,
                                    count=VERIFY_CAP, offset=0, snapshot=None, operation="$summary")
    patient: dict[str, Any] | None = None
    in_sections: list[dict[str, Any]] = []
    context: dict[str, dict[str, Any]] = {}
    for m in outcome.matches:
        r = m.resource
        if r.get("resourceType") == "Patient" and r.get("id") == pid:
            patient = r
        elif section_of(r) is not None:
            in_sections.append(r)
        else:
            context[f"{r['resourceType']}/{r['id']}"] = r
    if patient is None:
        raise errors.not_found("Resource not found.")
    withheld: set[str] = set()
    for w in outcome.warnings:
        if w.code == "suppressed" and ":" in w.diagnostics:
            withheld.update(t.strip() for t in w.diagnostics.split(":", 1)[1].split(","))
    extra: dict[str, dict[str, Any]] = {}
    wanted = [ref for r in in_sections for ref in references(r)]
    for ref in dict.fromkeys(wanted):
        if ref in context:
            extra[ref] = context[ref]
            continue
        rtype, _, rid = ref.partition("/")
        if rtype in _REFERENCED_TYPES and rid and "/" not in rid and len(extra) < MAX_REFERENCED:
            try:
                result = await repo.read(ctx, rtype, rid)
            except errors.OperationOutcomeError:
                continue  # not there, deleted, or not for this caller: left out
            extra[ref] = orjson.loads(result.body)
    return build_document(patient, in_sections, base_url=base_url, timestamp=instant(now_ms),
                          document_id=str(uuid.uuid4()), composition_id=str(uuid.uuid4()),
                          author_id=str(uuid.uuid4()), withheld_types=frozenset(withheld),
                          extra=list(extra.values()))
