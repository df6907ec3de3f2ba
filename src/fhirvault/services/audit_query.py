"""Querying the audit trail: AuditEvent search and read, and the patient's access history.

The trail is read through ``AuditSource`` (seq, decrypted record). Today's adapter
scans the encrypted audit table in sequence order; an indexed source may use the
``AuditHint`` to skip entries that cannot match, but ``AuditQuery.matches`` always
re-checks every entry exactly, so a hint only ever makes a scan cheaper.

Reading the trail is itself an access to patient data: every search, read and
access-history request appends one record (interaction ``search``/``read``/
``operation``, entity ``AuditEvent``…). Those records are appended after the page
is computed, never while scanning, so reading cannot feed itself.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

from fhirvault.domain import errors
from fhirvault.domain.search.query import SearchError, safe_name
from fhirvault.domain.search.values import parse_date
from fhirvault.ports import AuditQuery as StoreAuditQuery
from fhirvault.ports import Clock, ResourceStore
from fhirvault.services.audit import AuditRecord, AuditTrail, outcome_for
from fhirvault.services.crypto import DecryptionError
from fhirvault.services.repository import IntegrityError, Repository, RequestContext

_MIN, _MAX = -(2**63), 2**63
CHUNK = 1000  # entries fetched per source call while scanning
_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_ACTIONS = frozenset("CRUDE")
_OUTCOMES = frozenset({"0", "4", "8", "12"})
_IGNORED = frozenset({"_format", "_pretty"})
SEARCH_PARAMS = ("patient", "agent", "date", "action", "outcome", "entity", "subtype")
RESULT_PARAMS = ("_count", "_sort", "_cursor")
ACCESS_HISTORY_PARAMS = ("date", "action", "outcome", "_count", "_sort", "_cursor")


@dataclass(frozen=True, slots=True)
class AuditHint:
    """What an indexed source may pre-filter on (each group: any of its values)."""

    patients: tuple[frozenset[str], ...] = ()  # "Patient/x"
    agents: tuple[frozenset[str], ...] = ()  # client ids or users
    since_ms: int | None = None  # every match has since_ms <= ts_ms < until_ms
    until_ms: int | None = None


class AuditSource(Protocol):
    def entries(self, after_seq: int, limit: int, *, before_seq: int | None = None, descending: bool = False,
                hint: AuditHint | None = None) -> list[tuple[int, dict[str, Any]]]:
        """At most ``limit`` (seq, record) with after_seq < seq < before_seq, in seq order
        (newest first if ``descending``). With a ``hint`` the source may leave out entries
        that cannot match it, or ignore it."""
        ...


class StoreAuditSource:
    """AuditSource over the store's audit log: date range and agent tags pushed down to SQL.

    Patient tags are pushed down only with ``push_patients``: they find a record only if
    the log tagged each of its patients (a search names several) and the Patient a
    refused request targeted (which has no patient field), see docs/audit.md.
    """

    def __init__(self, store: ResourceStore, log: AuditTrail, *, push_patients: bool = False) -> None:
        self._store = store
        self._log = log
        self._push_patients = push_patients

    def _tags(self, hint: AuditHint | None) -> tuple[bytes, ...]:
        if hint is None:
            return ()
        if hint.patients and self._push_patients:
            return tuple(self._log.tag("patient", p) for p in sorted(hint.patients[0]))
        if hint.agents:
            return tuple(self._log.tag("agent", a) for a in sorted(hint.agents[0]))
        return ()

    def entries(self, after_seq: int, limit: int, *, before_seq: int | None = None, descending: bool = False,
                hint: AuditHint | None = None) -> list[tuple[int, dict[str, Any]]]:
        query = StoreAuditQuery(
            self._log.tenant, self._tags(hint), after_seq, before_seq,
            hint.since_ms if hint else None,
            hint.until_ms - 1 if hint and hint.until_ms is not None else None,  # the store's bound is inclusive
            descending, limit)
        out: list[tuple[int, dict[str, Any]]] = []
        for row in self._store.audit_find(query):
            try:
                out.append((row.seq, self._log.decrypt(row.seq, row.ts_ms, row.blob)))
            except (DecryptionError, ValueError):  # tampered entry: never guess, never skip silently
                raise IntegrityError("an audit record failed its integrity check") from None
        return out


# ---------------------------------------------------------------- records

def audit_event_id(seq: int) -> str:
    return f"audit-{seq}"


def parse_audit_event_id(rid: str) -> int | None:
    """The trail sequence number of an AuditEvent id, None if it is not one of ours."""
    digits = rid[len("audit-"):] if rid.startswith("audit-") else ""
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18 or digits.startswith("0"):
        return None
    return int(digits)


def patients_of(record: dict[str, Any]) -> list[str]:
    """``Patient/x`` references the record is about: its patient field, or a Patient entity."""
    found = [p for p in str(record.get("patient") or "").split(",") if p.startswith("Patient/")]
    entity = record.get("entity")
    if isinstance(entity, str) and entity.startswith("Patient/"):
        ref = "/".join(entity.split("/")[:2]).split("$")[0].rstrip("/")
        if ref != "Patient" and ref not in found:
            found.append(ref)
    return found


# ---------------------------------------------------------------- the query

@dataclass(frozen=True, slots=True)
class DateBound:
    prefix: str
    lo: int
    hi: int

    def matches(self, ts: int) -> bool:
        """R4 date semantics for the instant [ts, ts + 1 ms) against [lo, hi)."""
        lo, hi = ts, ts + 1
        inside = self.lo <= lo and hi <= self.hi
        p = self.prefix
        if p == "eq":
            return inside
        if p == "ne":
            return not inside
        if p in ("gt", "sa"):
            return lo >= self.hi
        if p in ("lt", "eb"):
            return hi <= self.lo
        if p == "ge":
            return inside or lo >= self.hi
        return inside or hi <= self.lo  # le

    def span(self) -> tuple[int, int]:
        """[lo, hi) of the instants this bound can match."""
        return {"eq": (self.lo, self.hi), "gt": (self.hi, _MAX), "sa": (self.hi, _MAX), "ge": (self.lo, _MAX),
                "lt": (_MIN, self.lo), "eb": (_MIN, self.lo), "le": (_MIN, self.hi)}.get(self.prefix, (_MIN, _MAX))


@dataclass(frozen=True)
class AuditQuery:
    """Parsed AuditEvent search. Repeated parameters AND, comma-separated values OR."""

    patients: tuple[frozenset[str], ...] = ()
    agents: tuple[frozenset[str], ...] = ()
    dates: tuple[tuple[DateBound, ...], ...] = ()
    actions: tuple[frozenset[str], ...] = ()
    outcomes: tuple[frozenset[str], ...] = ()
    entities: tuple[tuple[str, ...], ...] = ()
    subtypes: tuple[frozenset[str], ...] = ()
    count: int | None = None
    descending: bool = True
    cursor: int | None = None  # seq: before it when descending, after it when ascending
    criteria: tuple[tuple[str, str], ...] = field(default=())  # as sent, for links and the audit record

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]], *, allowed: Iterable[str] = SEARCH_PARAMS + RESULT_PARAMS,
              base_url: str | None = None) -> AuditQuery:
        allow = frozenset(allowed)
        groups: dict[str, list[Any]] = collections.defaultdict(list)
        criteria: list[tuple[str, str]] = []
        count: int | None = None
        descending = True
        cursor: str | None = None
        for name, raw in params:
            if name in _IGNORED:
                continue
            if name not in allow:
                what = "modifier" if ":" in name and name.split(":")[0] in allow else "parameter"
                raise SearchError(f"Unsupported AuditEvent search {what}: {safe_name(name)}.", safe_name(name))
            if name == "_count":
                if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
                    raise SearchError("_count must be a non-negative integer.", "_count")
                count = int(raw)
                continue
            if name == "_sort":
                if raw not in ("date", "-date"):
                    raise SearchError("_sort must be date or -date.", "_sort")
                descending = raw == "-date"
                continue
            if name == "_cursor":
                cursor = raw
                continue
            criteria.append((name, raw))
            values = raw.split(",")
            if not raw or not all(values):
                raise SearchError(f"Search parameter '{name}' needs a value.", name)
            groups[name].append(_parse_values(name, values, base_url))
        return cls(
            patients=tuple(frozenset(v) for v in groups["patient"]),
            agents=tuple(frozenset(v) for v in groups["agent"]),
            dates=tuple(tuple(v) for v in groups["date"]),
            actions=tuple(frozenset(v) for v in groups["action"]),
            outcomes=tuple(frozenset(v) for v in groups["outcome"]),
            entities=tuple(tuple(v) for v in groups["entity"]),
            subtypes=tuple(frozenset(v) for v in groups["subtype"]),
            count=count, descending=descending, cursor=_parse_cursor(cursor, descending),
            criteria=tuple(criteria),
        )

    def for_patient(self, patient: str) -> AuditQuery:
        """This query narrowed to the records about one patient (``Patient/x``)."""
        return dataclasses.replace(self, patients=(*self.patients, frozenset({patient})))

    def hint(self) -> AuditHint:
        lo, hi = _MIN, _MAX
        for group in self.dates:  # AND of groups; each group spans the union of its values
            ranges = [d.span() for d in group]
            lo = max(lo, min(r[0] for r in ranges))
            hi = min(hi, max(r[1] for r in ranges))
        return AuditHint(self.patients, self.agents, lo if lo != _MIN else None, hi if hi != _MAX else None)

    def matches(self, record: dict[str, Any]) -> bool:
        if self.patients:
            mine = set(patients_of(record))
            if not all(mine & group for group in self.patients):
                return False
        if self.agents:
            who = {v for v in (record.get("client_id"), record.get("user")) if isinstance(v, str)}
            if not all(who & group for group in self.agents):
                return False
        if self.dates:
            ts = record.get("ts_ms")
            if not isinstance(ts, int) or not all(any(d.matches(ts) for d in g) for g in self.dates):
                return False
        if not all(record.get("action") in g for g in self.actions):
            return False
        if not all(str(record.get("outcome")) in g for g in self.outcomes):
            return False
        if self.subtypes:
            interaction = record.get("interaction")
            codes = {interaction, "search-type"} if interaction == "search" else {interaction}
            if not all(codes & g for g in self.subtypes):
                return False
        if self.entities:
            entity = record.get("entity")
            if not isinstance(entity, str) or not all(any(_entity_matches(entity, v) for v in g)
                                                      for g in self.entities):
                return False
        return True


def _parse_cursor(raw: str | None, descending: bool) -> int | None:
    if raw is None:
        return None
    direction, digits = raw[:1], raw[1:]
    if direction != ("b" if descending else "a") or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise SearchError("Malformed or mismatched paging cursor.", "_cursor")
    return int(digits)


def cursor_text(seq: int, descending: bool) -> str:
    return ("b" if descending else "a") + str(seq)


def _reference(name: str, value: str, base_url: str | None) -> str:
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1:]
    return value


def _parse_values(name: str, values: list[str], base_url: str | None) -> list[Any]:
    if name == "patient":
        out = []
        for v in values:
            ref = _reference(name, v, base_url)
            pid = ref[len("Patient/"):] if ref.startswith("Patient/") else ref
            if not pid or "/" in pid or len(pid) > 64:
                raise SearchError("Search parameter 'patient' takes Patient/[id] or [id].", name)
            out.append("Patient/" + pid)
        return out
    if name == "agent":
        return [v.split("|", 1)[1] if "|" in v else v for v in values]  # system|value or value
    if name == "date":
        bounds = []
        for v in values:
            prefix, rest = (v[:2], v[2:]) if v[:2].isalpha() else ("eq", v)
            rng = parse_date(rest) if prefix in _DATE_PREFIXES else None
            if rng is None:
                raise SearchError("Search parameter 'date': expected [eq|ne|gt|lt|ge|le|sa|eb]YYYY[-MM[-DD[Thh:mm[:ss]]]].",
                                  name)
            bounds.append(DateBound(prefix, *rng))
        return bounds
    if name in ("action", "outcome", "subtype"):
        codes = [v.split("|", 1)[1] if "|" in v else v for v in values]
        valid = _ACTIONS if name == "action" else _OUTCOMES if name == "outcome" else None
        if valid is not None and not all(c in valid for c in codes):
            allowed = "C, R, U, D or E" if name == "action" else "0, 4, 8 or 12"
            raise SearchError(f"Search parameter '{name}' takes {allowed}.", name)
        return codes
    # entity: Type/id[/_history/n] or a bare id
    return [_reference(name, v, base_url) for v in values]


def _entity_matches(entity: str, value: str) -> bool:
    if "/" not in value:  # [id]: any type
        parts = entity.split("/")
        return len(parts) >= 2 and parts[1].split("$")[0] == value
    return entity == value or entity.startswith(value + "/")


# ---------------------------------------------------------------- running it

@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[tuple[int, dict[str, Any]]]
    next_cursor: str | None
    total: int | None  # known on a first page of a newest-first search


def run_query(source: AuditSource, query: AuditQuery, count: int) -> AuditPage:
    """One page of matches, fetched in chunks until the page (and one more) is found."""
    hint = query.hint()
    found: list[tuple[int, dict[str, Any]]] = []
    after, before = (0, query.cursor) if query.descending else (query.cursor or 0, None)
    while len(found) <= count:
        chunk = source.entries(after, CHUNK, before_seq=before, descending=query.descending, hint=hint)
        found.extend((seq, r) for seq, r in chunk if query.matches(r))
        if len(chunk) < CHUNK:
            break
        if query.descending:
            before = chunk[-1][0]
        else:
            after = chunk[-1][0]
    page = found[:count]
    more = len(found) > count and bool(page)
    # Everything was seen when a first page is not full: then the total is known.
    total = len(found) if query.cursor is None and not more and len(found) <= count else None
    return AuditPage(page, cursor_text(page[-1][0], query.descending) if more else None, total)


def read_entry(source: AuditSource, seq: int) -> dict[str, Any] | None:
    found = source.entries(seq - 1, 1, before_seq=seq + 1)
    return found[0][1] if found and found[0][0] == seq else None


# ---------------------------------------------------------------- the service

RecordWriter = Callable[[AuditRecord], Awaitable[None]]


class AuditReader:
    """AuditEvent search/read and $access-history: access decisions, query, and their own audit."""

    def __init__(self, source: AuditSource, write: RecordWriter, repo: Repository, clock: Clock, *,
                 server_id: str, show_names: bool = False) -> None:
        self._source = source
        self._write = write
        self._repo = repo
        self._clock = clock
        self.server_id = server_id
        self.show_names = show_names  # access history: show the individual, not only role and organisation

    @classmethod
    def over_store(cls, store: ResourceStore, log: AuditTrail, repo: Repository, clock: Clock, *,
                   server_id: str, show_names: bool = False, push_patients: bool = False) -> AuditReader:
        async def write(record: AuditRecord) -> None:
            await store.write("audit.trail", lambda tx: log.record(tx, record))

        source = StoreAuditSource(store, log, push_patients=push_patients)
        return cls(source, write, repo, clock, server_id=server_id, show_names=show_names)

    # -- access decisions --------------------------------------------------------
    def permits(self, ctx: RequestContext, permission: str, patient_id: str | None = None) -> bool:
        """Whether the caller may read (r) or search (s) the trail; ``patient_id`` for $access-history.

        Backend services: SMART system scopes on AuditEvent. Users: the auditor and security-officer
        roles read the whole trail; a patient reads only their own ``$access-history``; every
        other role nothing (docs/access-control.md).
        """
        p = ctx.principal
        if p is None or p.tenant != self._repo.tenant:
            return False
        if p.role is None:  # backend services: system scopes
            return p.grants.allows("AuditEvent", permission)
        if p.role in ("auditor", "security_officer"):
            return True
        # A patient reads the history of access to their own record, and nothing else of the trail.
        return (p.role == "patient" and patient_id is not None and p.fhir_user == f"Patient/{patient_id}"
                and permission == "s")

    async def authorize(self, ctx: RequestContext, permission: str, interaction: str, entity: str,
                        patient_id: str | None = None) -> None:
        if self.permits(ctx, permission, patient_id):
            return
        await self._repo.audit_event(ctx, interaction, 403, f"not allowed '{permission}' on the audit trail",
                                     entity=entity)
        raise errors.forbidden("Access denied: the token does not allow reading the audit trail.")

    async def refuse_write(self, ctx: RequestContext, interaction: str, entity: str) -> None:
        """Writes to AuditEvent: the trail is written only by the server (refused, and audited)."""
        await self._repo.audit_event(ctx, interaction, 405, "the audit trail is written only by the server",
                                     entity=entity)
        raise errors.method_not_allowed("AuditEvents are written only by the server; they are read-only.")

    # -- interactions ------------------------------------------------------------
    async def search(self, ctx: RequestContext, params: list[tuple[str, str]], *, count: int,
                     base_url: str | None) -> tuple[AuditQuery, AuditPage]:
        await self.authorize(ctx, "s", "search", "AuditEvent")
        query = AuditQuery.parse(params, base_url=base_url)
        n = count if query.count is None else min(query.count, count)
        page = await asyncio.to_thread(run_query, self._source, query, n)
        await self._trace(ctx, "search", "AuditEvent", page.entries, urlencode(query.criteria))
        return query, page

    async def read(self, ctx: RequestContext, rid: str) -> tuple[int, dict[str, Any]]:
        entity = f"AuditEvent/{rid}"
        await self.authorize(ctx, "r", "read", entity)
        seq = parse_audit_event_id(rid)
        record = None if seq is None else await asyncio.to_thread(read_entry, self._source, seq)
        if seq is None or record is None:
            raise errors.not_found("Resource not found.")
        await self._trace(ctx, "read", entity, [(seq, record)], None)
        return seq, record

    async def access_history(self, ctx: RequestContext, pid: str, params: list[tuple[str, str]], *,
                             count: int) -> tuple[AuditQuery, AuditPage]:
        """The accesses to one patient's record, for the patient view."""
        entity = f"Patient/{pid}/$access-history"
        await self.authorize(ctx, "s", "operation", entity, patient_id=pid)
        query = AuditQuery.parse(params, allowed=ACCESS_HISTORY_PARAMS).for_patient(f"Patient/{pid}")
        n = count if query.count is None else min(query.count, count)
        page = await asyncio.to_thread(run_query, self._source, query, n)
        record = self._record(ctx, "operation", entity, f"Patient/{pid}", urlencode(query.criteria),
                              len(page.entries))
        await self._write(record)
        return query, page

    async def _trace(self, ctx: RequestContext, interaction: str, entity: str,
                     entries: list[tuple[int, dict[str, Any]]], query: str | None) -> None:
        patients = sorted({p for _, r in entries for p in patients_of(r)})
        count = len(entries) if interaction == "search" else None
        await self._write(self._record(ctx, interaction, entity, ",".join(patients) or None, query, count))

    def _record(self, ctx: RequestContext, interaction: str, entity: str, patient: str | None,
                query: str | None, result_count: int | None) -> AuditRecord:
        return AuditRecord(
            ts_ms=self._clock.now_ms(), interaction=interaction, outcome=outcome_for(200), status=200,
            request_id=ctx.request_id, client_id=ctx.principal.client_id if ctx.principal else None,
            source_ip=ctx.source_ip, entity=entity, patient=patient, query=query, result_count=result_count,
        )
