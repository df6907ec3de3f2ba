"""Registers: incidents with the 72-hour clock, data-subject requests with the one-month deadline."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from fhirvault.services.registers import (
    NotFound,
    RegisterError,
    RegisterService,
    add_months,
    record_of_processing,
)
from tests.conftest import engine_settings


class FixedClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={})
    initialise(settings)
    c = build(settings, FixedClock(_ms("2026-03-01T10:00:00")))
    try:
        yield c
    finally:
        c.close()


def test_one_month_is_a_calendar_month_clamped_to_the_month_end() -> None:
    assert add_months(_ms("2026-01-31T10:00:00"), 1) == _ms("2026-02-28T10:00:00")
    assert add_months(_ms("2026-03-15T08:30:00"), 1) == _ms("2026-04-15T08:30:00")
    assert add_months(_ms("2026-11-30T00:00:00"), 3) == _ms("2027-02-28T00:00:00")


def test_an_incident_runs_the_72_hour_clock_and_is_flagged_overdue(container: Container) -> None:
    svc = RegisterService(container)
    clock = container.clock
    assert isinstance(clock, FixedClock)
    inc = svc.open_incident(actor="dpo", reason="laptop stolen from ward 3", title="lost laptop",
                            detected="2026-02-27T09:00:00Z")
    doc = inc.to_json(clock.ms)
    assert doc["notificationDue"] == "2026-03-02T09:00:00Z" and doc["overdue"] is False
    assert doc["hoursLeft"] == 23.0
    clock.ms = _ms("2026-03-02T09:00:01")
    assert svc.incident(inc.id).overdue(clock.ms)
    notified = svc.update_incident(inc.id, actor="dpo", reason="CNIL notified online", status="notified",
                                   personal_data_breach=True, authority_reference="CNIL-2026-0042")
    assert not notified.overdue(clock.ms) and notified.notified_ms == clock.ms
    stored = svc.incident(inc.id)
    assert stored.status == "notified" and stored.authority_reference == "CNIL-2026-0042"
    assert [n.text for n in stored.notes] == ["laptop stolen from ward 3", "CNIL notified online"]
    with pytest.raises(RegisterError, match="reason"):
        svc.update_incident(inc.id, actor="dpo", reason="")


def test_a_request_is_due_in_one_month_extendable_once_by_two(container: Container) -> None:
    svc = RegisterService(container)
    now = container.clock.now_ms()
    req = svc.open_request(actor="dpo", type="access", subject="Jeanne Dupont", reason="letter of 31 January",
                           received="2026-01-31T10:00:00Z", patient="Patient/p1")
    assert req.to_json(now)["due"] == "2026-02-28T10:00:00Z"
    assert req.overdue(now)  # clock: 1 March
    ext = svc.update_request(req.id, actor="dpo", reason="complex: records on three sites", status="extended")
    assert ext.to_json(now)["due"] == "2026-04-28T10:00:00Z" and not ext.overdue(now)
    with pytest.raises(RegisterError, match="already extended"):
        svc.update_request(req.id, actor="dpo", reason="again please", status="extended")
    done = svc.update_request(req.id, actor="dpo", reason="copy sent", status="done", outcome="copy sent by post")
    assert done.status == "done" and done.outcome == "copy sent by post"
    assert [r.id for r in svc.requests("done")] == [req.id] and svc.requests("open") == []
    with pytest.raises(RegisterError, match="type"):
        svc.open_request(actor="dpo", type="deletion", subject="x y", reason="wrong type")


@pytest.mark.sqlite_only
def test_the_person_named_is_not_stored_in_clear(container: Container) -> None:
    svc = RegisterService(container)
    svc.open_request(actor="dpo", type="erasure", subject="Zébulon Quasimodo-Unique", reason="asked at the desk")
    container.store.close()
    raw = b"".join(p.read_bytes() for p in container.settings.data_dir.glob("fhirvault.sqlite3*"))
    assert b"Quasimodo" not in raw and "Zébulon".encode() not in raw


def test_unknown_entries_are_not_found(container: Container) -> None:
    svc = RegisterService(container)
    with pytest.raises(NotFound):
        svc.incident("inc-0000000000000000")
    with pytest.raises(NotFound):
        svc.request("../../etc")
    with pytest.raises(NotFound, match="no alert"):
        svc.open_incident(actor="dpo", reason="from an alert", alert_id="nope")


def test_the_record_of_processing_is_generated_from_the_instance(container: Container) -> None:
    record = record_of_processing(container)
    assert record["mode"] == "default"
    (admin,) = record["recipients"]
    assert admin["scope"] == "system/*.cruds" and admin["clinical"] is True and admin["owner"] is None
    assert any(m.startswith("encryption at rest") for m in record["security_measures"])
    assert next(d["setting"] for d in record["destinations"]) == "data_dir"
    assert record["transfers_outside_eea"] == []
