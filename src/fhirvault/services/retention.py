"""The retention job: find records past their retention period, erase what is allowed, report the rest.

Runs in the server as a cluster singleton (role ``retention``, one process of the cluster), every
``[retention] job_interval_hours``, and from the CLI (``fhirvault retention run [--dry-run]``). It
erases only with ``[retention] auto_erase = true``; by default it reports (metrics, audit entry,
CLI output) what is due, so a person decides. Legal holds are never erased. The audit log's
retention is reported only (see docs/data-lifecycle.md: pruning a Merkle log is not implemented).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client import Counter, Gauge

from fhirvault.config import SettingsError
from fhirvault.domain.instants import instant
from fhirvault.domain.retention import (
    AUDIT_FLOOR_YEARS,
    RetentionRules,
    audit_prunable_before,
    retention_for,
)
from fhirvault.ports import AuditQuery, Clock, ResourceStore
from fhirvault.services.audit import AuditRecord, AuditTrail
from fhirvault.services.erasure import HOLD, ErasureRefused, ErasureResult, Lifecycle
from fhirvault.services.metrics import Metrics
from fhirvault.services.singletons import LeaderOnly

log = logging.getLogger("fhirvault.retention")
ROLE = "retention"
_INTS = {"health_record_years": (1, 200), "minor_until_age": (18, 120), "audit_years": (AUDIT_FLOOR_YEARS, 100),
         "job_interval_hours": (1, 24 * 31)}


def parse_retention_settings(raw: Any, origin: str) -> RetentionRules:
    """``[retention]``: health_record_years, minor_until_age, audit_years (never below the floor),
    auto_erase, job_interval_hours, and a ``[retention.years_by_type]`` table."""
    if not isinstance(raw, Mapping):
        raise SettingsError(f"retention: expected a table (from {origin})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        where = f"retention.{key} (from {origin})"
        if name in _INTS:
            lo, hi = _INTS[name]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                floor = " (the floor for access traces)" if name == "audit_years" else ""
                raise SettingsError(f"{where}: expected an integer from {lo}{floor} to {hi}")
            values[name] = value
        elif name == "auto_erase":
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: expected true or false")
            values[name] = value
        elif name == "years_by_type":
            if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 200
                    for k, v in value.items()):
                raise SettingsError(f"{where}: expected a table of resource type = years (1 to 200)")
            values[name] = dict(value)
        else:
            raise SettingsError(f"unknown setting retention.{key} (from {origin})")
    return RetentionRules(**values)


@dataclass
class RetentionReport:
    started_ms: int
    dry_run: bool
    patients: int = 0
    due: int = 0  # past retention, not erased (dry run, or auto_erase off)
    erased: int = 0
    held: int = 0  # past retention but under a legal hold
    refused: int = 0  # erasure refused meanwhile (a hold set during the run)
    resources: int = 0
    versions: int = 0
    audit_prunable: int = 0  # audit entries older than the audit retention (reported, not pruned)
    audit_cutoff_ms: int = 0
    patients_due: list[str] = field(default_factory=list)

    def summary(self) -> str:
        mode = "dry run" if self.dry_run else "run"
        return (f"retention {mode}: {self.patients} patients checked, {self.due} past retention left in place, "
                f"{self.erased} erased ({self.resources} resources, {self.versions} versions), {self.held} under a "
                f"legal hold, {self.refused} refused; {self.audit_prunable} audit entries older than "
                f"{instant(self.audit_cutoff_ms)} (audit pruning not implemented: kept)")


class RetentionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.patients = Counter("fhirvault_retention_patients", "Patients past retention by outcome of the retention"
                                " job (erased, held, refused, due)", ["outcome"], registry=r)
        self.last_run = Gauge("fhirvault_retention_last_run_timestamp_seconds", "When the retention job last"
                              " completed (Unix time)", registry=r)
        self.audit_prunable = Gauge("fhirvault_retention_audit_prunable_entries", "Audit entries older than the"
                                    " audit retention (reported; kept)", registry=r)

    def record(self, report: RetentionReport) -> None:
        for outcome in ("erased", "held", "refused", "due"):
            self.patients.labels(outcome).inc(getattr(report, outcome))
        self.last_run.set(time.time())
        self.audit_prunable.set(report.audit_prunable)


class RetentionJob:
    def __init__(self, store: ResourceStore, lifecycle: Lifecycle, audit: AuditTrail, clock: Clock,
                 rules: RetentionRules, metrics: RetentionMetrics | None = None) -> None:
        self._store = store
        self._lc = lifecycle
        self._audit = audit
        self._clock = clock
        self.rules = rules
        self._metrics = metrics

    def run(self, *, dry_run: bool = False) -> RetentionReport:
        now = self._clock.now_ms()
        report = RetentionReport(now, dry_run)
        tenant = self._lc.tenant
        activity = self._store.key_activity(tenant)
        for key_id, compartment in sorted(self._lc.census().items()):
            if not compartment.startswith("patient/") or key_id not in activity:
                continue
            pid = compartment[len("patient/"):]
            report.patients += 1
            _versions, newest = activity[key_id]
            by_type: dict[str, int] | None = None
            if self.rules.years_by_type:
                by_type = {}
                for rtype, _id, _n, last in self._store.key_usage(tenant, key_id):
                    by_type[rtype] = max(by_type.get(rtype, 0), last)
            kept = retention_for(self.rules, newest, self._lc.birth_date(pid), by_type)
            if kept.until_ms > now:
                continue
            if self._lc.flags(pid) & HOLD:
                report.held += 1
                continue
            if dry_run or not self.rules.auto_erase:
                report.due += 1
                report.patients_due.append(pid)
                continue
            try:
                result = self._lc.erase_sync(pid, partial(self._record, now, kept.rule))
            except ErasureRefused:
                report.refused += 1
                continue
            report.erased += 1
            report.resources += result.resources
            report.versions += result.versions
        report.audit_cutoff_ms = audit_prunable_before(now, self.rules.audit_years)
        report.audit_prunable = len(self._store.audit_find(AuditQuery(tenant, until_ms=report.audit_cutoff_ms,
                                                                      limit=100_000)))
        self._audit.record_system_event(self._store, self._clock, "retention-run", report.summary())
        if self._metrics is not None and not dry_run:
            self._metrics.record(report)
        log.info("retention job done", extra={"erased": report.erased, "held": report.held, "due": report.due,
                                              "refused": report.refused, "dry_run": dry_run})
        return report

    @staticmethod
    def _record(now: int, rule: str, r: ErasureResult) -> AuditRecord:
        pid = r.patient_id
        return AuditRecord(now, "gdpr-erase", "0", 200, "retention-job", entity=f"Patient/{pid}",
                           patient=f"Patient/{pid}", category="system",
                           detail=f"retention expired (rule {rule}): {r.resources} resources, {r.versions} versions")


class RetentionScheduler:
    """The job every ``job_interval_hours`` in a thread; run by ``LeaderOnly`` while this process holds
    the ``retention`` role (services/singletons.py)."""

    def __init__(self, job: RetentionJob, interval_s: float) -> None:
        self._job = job
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fhirvault-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        wait = min(self._interval, 300.0)  # first run soon after start: a server restarted daily still runs it
        while not self._stop.wait(wait):
            wait = self._interval
            try:
                self._job.run()
            except Exception:  # a failed run is retried at the next interval
                log.exception("retention job failed")


def retention_singleton(container: Any) -> LeaderOnly[RetentionScheduler]:
    """The server's retention job: one process of the cluster runs it (a ``Container``)."""
    lifecycle = container.lifecycle
    metrics = RetentionMetrics(container.metrics)

    def make() -> RetentionScheduler:
        job = RetentionJob(container.store, lifecycle, container.audit, container.clock, lifecycle.rules, metrics)
        return RetentionScheduler(job, lifecycle.rules.job_interval_hours * 3600.0)

    return LeaderOnly(container.leadership, ROLE, make)
