"""AuditQuery: parameters, prefixes, exact matching, paging; any source pre-filter is optional."""

from __future__ import annotations

from typing import Any

import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.services import audit_query
from fhirvault.services.audit_query import (
    ACCESS_HISTORY_PARAMS,
    AuditHint,
    AuditQuery,
    parse_audit_event_id,
    patients_of,
    read_entry,
    run_query,
)

DAY = 86_400_000
T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z


def rec(ts: int, interaction: str = "read", *, outcome: str = "0", client: str = "app-1", user: str | None = None,
        entity: str | None = None, patient: str | None = None) -> dict[str, Any]:
    action = {"create": "C", "read": "R", "update": "U", "delete": "D"}.get(interaction, "E")
    out: dict[str, Any] = {"ts_ms": ts, "interaction": interaction, "outcome": outcome, "status": 200,
                           "request_id": "r", "client_id": client, "action": action, "category": "rest"}
    if user:
        out["user"] = user
    if entity:
        out["entity"] = entity
    if patient:
        out["patient"] = patient
    return out


class ListSource:
    """An in-memory AuditSource; ``honour_hints`` drops what cannot match, like an index would (loosely)."""

    def __init__(self, records: list[dict[str, Any]], *, honour_hints: bool = False) -> None:
        self.rows = list(enumerate(records, start=1))
        self.honour = honour_hints
        self.calls = 0

    def entries(self, after_seq: int, limit: int, *, before_seq: int | None = None, descending: bool = False,
                hint: AuditHint | None = None) -> list[tuple[int, dict[str, Any]]]:
        self.calls += 1
        rows = [(s, r) for s, r in self.rows if s > after_seq and (before_seq is None or s < before_seq)]
        if self.honour and hint is not None:
            if hint.since_ms is not None:
                rows = [(s, r) for s, r in rows if r["ts_ms"] >= hint.since_ms]
            if hint.until_ms is not None:
                rows = [(s, r) for s, r in rows if r["ts_ms"] < hint.until_ms]
            if hint.agents:  # an index on agents would return a superset: any of the first group
                rows = [(s, r) for s, r in rows if {r.get("client_id"), r.get("user")} & hint.agents[0]]
        if descending:
            rows.reverse()
        return rows[:limit]


TRAIL = [
    rec(T0, "create", entity="Patient/p1/_history/1", patient="Patient/p1"),                 # 1
    rec(T0 + 1000, "read", entity="Patient/p1/_history/1", patient="Patient/p1", user="u1"),  # 2
    rec(T0 + DAY, "search", entity="Observation", patient="Patient/p1,Patient/p2"),        # 3
    rec(T0 + DAY, "read", outcome="4", client="app-2", entity="Patient/p2"),               # 4  refused, no patient field
    rec(T0 + 2 * DAY, "update", entity="Observation/o1/_history/2", patient="Patient/p2"),  # 5
    rec(T0 + 3 * DAY, "delete", entity="Observation/o1/_history/3", patient="Patient/p2"),  # 6
    rec(T0 + 3 * DAY, "token", client="app-2"),                                             # 7
]


def seqs(params: list[tuple[str, str]], *, count: int = 100, honour: bool = False) -> list[int]:
    query = AuditQuery.parse(params, base_url="http://srv/fhir")
    page = run_query(ListSource(TRAIL, honour_hints=honour), query, count)
    return [s for s, _ in page.entries]


@pytest.mark.parametrize("honour", [False, True])
@pytest.mark.parametrize(("params", "expected"), [
    ([], [7, 6, 5, 4, 3, 2, 1]),
    ([("patient", "Patient/p1")], [3, 2, 1]),
    ([("patient", "p2")], [6, 5, 4, 3]),
    ([("patient", "http://srv/fhir/Patient/p2")], [6, 5, 4, 3]),
    ([("patient", "p1,p2")], [6, 5, 4, 3, 2, 1]),
    ([("patient", "p1"), ("patient", "p2")], [3]),
    ([("agent", "app-2")], [7, 4]),
    ([("agent", "u1")], [2]),
    ([("agent", "urn:fhirvault:client|app-1"), ("agent", "u1")], [2]),
    ([("action", "C,D")], [6, 1]),
    ([("action", "http://hl7.org/fhir/audit-event-action|U")], [5]),
    ([("outcome", "4")], [4]),
    ([("outcome", "0"), ("action", "R")], [2]),
    ([("entity", "Observation/o1")], [6, 5]),
    ([("entity", "Observation/o1/_history/2")], [5]),
    ([("entity", "o1")], [6, 5]),
    ([("entity", "Patient/p2")], [4]),
    ([("subtype", "search-type")], [3]),
    ([("subtype", "token,delete")], [7, 6]),
    ([("date", "2026-11-18")], [2, 1]),
    ([("date", "eq2026-11-19")], [4, 3]),
    ([("date", "ne2026-11-19")], [7, 6, 5, 2, 1]),
    ([("date", "gt2026-11-19")], [7, 6, 5]),
    ([("date", "sa2026-11-19")], [7, 6, 5]),
    ([("date", "ge2026-11-19")], [7, 6, 5, 4, 3]),
    ([("date", "lt2026-11-19")], [2, 1]),
    ([("date", "eb2026-11-19")], [2, 1]),
    ([("date", "le2026-11-19")], [4, 3, 2, 1]),
    ([("date", "ge2026-11-19"), ("date", "lt2026-11-21")], [5, 4, 3]),
    ([("date", "2026-11-18T11:06:40Z")], [1]),
    ([("date", "gt2026-11-18T11:06:40Z"), ("date", "lt2026-11-19")], [2]),
    ([("date", "2026-11-18T12:06:41+01:00")], [2]),
    ([("date", "2026-11")], [7, 6, 5, 4, 3, 2, 1]),
    ([("date", "2025")], []),
    ([("date", "2026-11-18,2026-11-21")], [7, 6, 2, 1]),
])
def test_parameters(params: list[tuple[str, str]], expected: list[int], honour: bool) -> None:
    assert seqs(params, honour=honour) == expected


def test_oldest_first_and_cursor_paging_both_ways() -> None:
    for sort, order in (("-date", [7, 6, 5, 4, 3, 2, 1]), ("date", [1, 2, 3, 4, 5, 6, 7])):
        seen: list[int] = []
        params: list[tuple[str, str]] = [("_sort", sort), ("_count", "3")]
        pages = 0
        while True:
            query = AuditQuery.parse(params)
            page = run_query(ListSource(TRAIL), query, query.count or 0)
            seen.extend(s for s, _ in page.entries)
            pages += 1
            if page.next_cursor is None:
                break
            params = [("_sort", sort), ("_count", "3"), ("_cursor", page.next_cursor)]
        assert seen == order and pages == 3


def test_total_only_when_the_first_page_saw_everything() -> None:
    assert run_query(ListSource(TRAIL), AuditQuery.parse([]), 10).total == 7
    assert run_query(ListSource(TRAIL), AuditQuery.parse([]), 3).total is None
    assert run_query(ListSource(TRAIL), AuditQuery.parse([("_cursor", "b5")]), 10).total is None


def test_scans_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_query, "CHUNK", 2)
    source = ListSource(TRAIL)
    page = run_query(source, AuditQuery.parse([("action", "C")]), 10)
    assert [s for s, _ in page.entries] == [1] and source.calls == 4
    source = ListSource(TRAIL)
    page = run_query(source, AuditQuery.parse([]), 2)
    assert [s for s, _ in page.entries] == [7, 6] and page.next_cursor == "b6"
    assert source.calls == 2  # stops once the page and one more are found


def test_a_loose_pre_filter_is_rechecked_exactly() -> None:
    # agent=app-2&agent=u1: the index narrows on the first group only; the second must still apply
    assert seqs([("agent", "app-2"), ("agent", "u1")], honour=True) == []


def test_hint() -> None:
    q = AuditQuery.parse([("date", "ge2026-11-19"), ("date", "lt2026-11-21"), ("patient", "p1"), ("agent", "a")])
    hint = q.hint()
    assert hint.since_ms == T0 - (T0 % DAY) + DAY and hint.until_ms == T0 - (T0 % DAY) + 3 * DAY
    assert hint.patients == (frozenset({"Patient/p1"}),) and hint.agents == (frozenset({"a"}),)
    assert AuditQuery.parse([("date", "ne2026-11-19")]).hint().since_ms is None
    assert AuditQuery.parse([("date", "2026,lt2020")]).hint().since_ms is None  # an OR spans both


@pytest.mark.parametrize(("params", "name"), [
    ([("foo", "1")], "foo"),
    ([("patient:missing", "true")], "patient:missing"),
    ([("patient", "")], "patient"),
    ([("patient", "Patient/a/b")], "patient"),
    ([("patient", "p1,")], "patient"),
    ([("patient", "http://elsewhere/fhir/Patient/p1")], "patient"),
    ([("date", "yesterday")], "date"),
    ([("date", "xx2026")], "date"),
    ([("date", "ap2026")], "date"),
    ([("date", "2026-13")], "date"),
    ([("action", "X")], "action"),
    ([("outcome", "3")], "outcome"),
    ([("_count", "-1")], "_count"),
    ([("_count", "ten")], "_count"),
    ([("_sort", "agent")], "_sort"),
    ([("_cursor", "zz")], "_cursor"),
    ([("_cursor", "a5")], "_cursor"),  # an oldest-first cursor on a newest-first search
    ([("_sort", "date"), ("_cursor", "b5")], "_cursor"),
])
def test_malformed_is_400_naming_the_parameter(params: list[tuple[str, str]], name: str) -> None:
    with pytest.raises(OperationOutcomeError) as info:
        AuditQuery.parse(params)
    assert info.value.status == 400
    assert info.value.issues[0].expression == (name,)


def test_access_history_parameters_are_restricted() -> None:
    AuditQuery.parse([("date", "2026"), ("_count", "5")], allowed=ACCESS_HISTORY_PARAMS)
    with pytest.raises(OperationOutcomeError):
        AuditQuery.parse([("agent", "x")], allowed=ACCESS_HISTORY_PARAMS)
    q = AuditQuery.parse([("action", "R")], allowed=ACCESS_HISTORY_PARAMS).for_patient("Patient/p2")
    assert [s for s, _ in run_query(ListSource(TRAIL), q, 10).entries] == [4]


def test_format_parameters_are_ignored_and_criteria_kept() -> None:
    q = AuditQuery.parse([("_format", "json"), ("patient", "p1"), ("_pretty", "true"), ("_count", "2")])
    assert q.criteria == (("patient", "p1"),) and q.count == 2


def test_read_entry_and_ids() -> None:
    source = ListSource(TRAIL)
    assert read_entry(source, 3) == TRAIL[2]
    assert read_entry(source, 99) is None
    assert parse_audit_event_id("audit-12") == 12
    for bad in ("audit-", "audit-012", "audit-0", "12", "audit-1x", "audit-\u0661"):
        assert parse_audit_event_id(bad) is None


def test_patients_of() -> None:
    assert patients_of({"patient": "Patient/a,Patient/b"}) == ["Patient/a", "Patient/b"]
    assert patients_of({"entity": "Patient/a/$everything"}) == ["Patient/a"]
    assert patients_of({"entity": "Patient/a/_history/2", "patient": "Patient/a"}) == ["Patient/a"]
    assert patients_of({"entity": "Patient"}) == []
