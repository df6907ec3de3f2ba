"""The retention job on the engine under test, with a clock moved across the retention periods."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from fhirvault.domain.retention import RetentionRules
from fhirvault.domain.scopes import Grants, parse_scopes
from fhirvault.services.audit import AuditRecord
from fhirvault.services.auth import Principal
from fhirvault.services.erasure import HOLD
from fhirvault.services.repository import RequestContext
from fhirvault.services.retention import RetentionJob, RetentionMetrics
from tests.conftest import PATIENT, engine_settings, observation


def ms(y: int, m: int = 1, d: int = 1) -> int:
    return int(dt.datetime(y, m, d, tzinfo=dt.UTC).timestamp() * 1000)


@dataclass
class Clock:
    now: int

    def now_ms(self) -> int:
        return self.now


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Container, Clock]]:
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={})
    initialise(settings)
    clock = Clock(ms(2001, 6, 1))
    container = build(settings, clock)
    try:
        yield container, clock
    finally:
        container.close()


def _patient(c: Container, birth: str) -> str:
    p = Principal("t", c.settings.tenant, "system/*.cruds", Grants(tuple(parse_scopes("system/*.cruds"))), 2**40, "t")
    ctx = RequestContext(p, "t")

    async def go() -> str:
        r = await c.repository.create(ctx, "Patient", dict(PATIENT, birthDate=birth))
        await c.repository.create(ctx, "Observation", observation(r.id))
        return r.id

    return asyncio.run(go())


def test_the_job_reports_erases_and_respects_holds(env: tuple[Container, Clock]) -> None:
    c, clock = env
    adult = _patient(c, "1960-01-01")  # kept until 2021 (20 years after the 2001 stay)
    minor = _patient(c, "2000-01-01")  # kept until the 28th birthday: 2028
    held = _patient(c, "1950-01-01")
    lc = c.lifecycle
    assert lc is not None
    record = AuditRecord(0, "gdpr-legal-hold", "0", 200, "t", category="system")
    asyncio.run(lc.set_flag(held, HOLD, True, "litigation 2021-55 pending", "dpo", record))
    clock.now = ms(2025)
    job = RetentionJob(c.store, lc, c.audit, clock, lc.rules, RetentionMetrics(c.metrics))
    dry = job.run(dry_run=True)
    assert (dry.patients, dry.due, dry.held, dry.erased) == (3, 1, 1, 0) and dry.patients_due == [adult]
    assert c.store.read_current(c.settings.tenant, "Patient", adult) is not None
    reported = job.run()  # auto_erase is off by default: still only a report
    assert reported.due == 1 and reported.erased == 0
    job.rules = lc.rules = replace(lc.rules, auto_erase=True)
    done = job.run()
    assert (done.erased, done.held, done.resources, done.versions) == (1, 1, 2, 2)
    assert c.store.read_current(c.settings.tenant, "Patient", adult) is None
    assert c.store.read_current(c.settings.tenant, "Patient", minor) is not None
    clock.now = ms(2028, 1, 2)
    assert job.run().erased == 1  # the minor's record, after their 28th birthday
    text = generate_latest(c.metrics.registry).decode()
    assert 'fhirvault_retention_patients_total{outcome="erased"} 2.0' in text
    assert 'fhirvault_retention_patients_total{outcome="held"} 3.0' in text
    assert "fhirvault_retention_last_run_timestamp_seconds" in text
    assert RetentionRules().auto_erase is False
