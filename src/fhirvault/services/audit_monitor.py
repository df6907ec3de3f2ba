"""Inside the server: sign checkpoints, verify the whole audit log at start-up and on a schedule.

Readiness waits for the first verification (``HealthState.audit_verified``).
A failed verification is reported to every ``on_failure`` callback (the alerting
service raises a critical alert) and keeps the server not-ready, so a load
balancer stops sending it traffic until an operator looks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fhirvault.adapters.witness import open_witness
from fhirvault.services.audit_checkpoints import WitnessedCheckpoint
from fhirvault.services.audit_verify import VerifyReport, verify_log

if TYPE_CHECKING:
    from fhirvault.container import Container

log = logging.getLogger("fhirvault.audit")


class AuditMonitor:
    def __init__(self, container: Container) -> None:
        self._c = container
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_failure: list[Callable[[VerifyReport], None]] = []
        self.on_report: list[Callable[[VerifyReport], None]] = []
        self.last_report: VerifyReport | None = None

    def verify_now(self) -> VerifyReport:
        c = self._c
        held: list[tuple[str, list[WitnessedCheckpoint]]] = []
        problems: list[str] = []
        for spec in c.settings.audit_witness_specs:
            try:
                contents = open_witness(spec).read()
            except (OSError, ValueError) as exc:
                problems.append(f"witness {spec} unreadable: {exc}")
                continue
            if contents is not None:
                held.append((spec, contents))
        report = verify_log(c.store, c.audit, c.audit_signer, held)
        for p in problems:
            report.problem(p)
        self.last_report = report
        c.health.audit_verified = report.ok
        c.health.audit_failure = None if report.ok else report.problems[0]
        if report.ok:
            log.info("audit log verified", extra={"entries": report.entries, "seconds": round(report.seconds, 2)})
        else:
            log.critical("audit log verification FAILED", extra={"first_bad_seq": report.first_bad_seq})
        for cb in self.on_report:
            cb(report)
        if not report.ok:
            for cb in self.on_failure:
                try:
                    cb(report)
                except Exception:
                    log.exception("audit failure callback failed")
        return report

    def start(self) -> None:
        metrics = self._c.metrics
        self._c.checkpointer.on_entries.append(lambda n, lag: metrics.audit_recorded(n, lag_seconds=lag))
        self._c.checkpointer.on_checkpoint.append(lambda cp: metrics.audit_checkpoint(cp.ts_ms / 1000))
        self.on_report.append(lambda r: metrics.audit_verification(r.ok, tree_size=r.tree_size))
        self._c.start_checkpoints()
        interval = self._c.settings.audit_verify_hours * 3600

        leadership = self._c.leadership

        def run() -> None:
            first = True  # every worker verifies at start-up (its readiness waits for it); then one per cluster
            while True:
                try:
                    if first or leadership is None or leadership.lead("audit-verify"):
                        self.verify_now()
                    first = False
                except Exception:
                    log.exception("audit verification could not run")
                    self._c.health.audit_verified = False
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=run, name="fhirvault-audit-verify", daemon=True)
        self._thread.start()

    def wait_first(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._c.health.audit_verified is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._c.health.audit_verified is not None

    def stop(self) -> None:
        self._stop.set()
