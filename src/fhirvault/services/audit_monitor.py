"""Inside the server: sign checkpoints, verify the audit log at start-up and on a schedule.

Readiness waits for the start-up pass (``HealthState.audit_verified``), which reads only
the entries after the last witnessed (or last fully verified) checkpoint
(``verify_recent``): seconds, not the 18 s per million entries of a full pass. The full
pass runs right after, in the background, and again every ``audit_verify_hours``; the
checkpoint it matched is recorded so the next start-up pass can begin there.
A failed verification, either kind, is reported to every ``on_failure`` callback (the
alerting service raises a critical alert) and makes the server not-ready, so a load
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
from fhirvault.services.audit_verify import VerifyReport, verify_log, verify_recent

if TYPE_CHECKING:
    from fhirvault.container import Container

log = logging.getLogger("fhirvault.audit")

# meta: the size of the last checkpoint a full pass matched (where the next start-up pass may begin).
# Not secret and not trusted for detection: moving it only changes what the start-up pass re-reads,
# the full pass after it still reads everything.
VERIFIED_META = "audit_fully_verified"


class _Stopped(Exception):
    pass


class AuditMonitor:
    def __init__(self, container: Container) -> None:
        self._c = container
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_failure: list[Callable[[VerifyReport], None]] = []
        self.on_report: list[Callable[[VerifyReport], None]] = []
        self.last_report: VerifyReport | None = None

    def _witnesses(self) -> tuple[list[tuple[str, list[WitnessedCheckpoint]]], list[str]]:
        held: list[tuple[str, list[WitnessedCheckpoint]]] = []
        problems: list[str] = []
        for spec in self._c.settings.audit_witness_specs:
            try:
                contents = open_witness(spec).read()
            except (OSError, ValueError) as exc:
                problems.append(f"witness {spec} unreadable: {exc}")
                continue
            if contents is not None:
                held.append((spec, contents))
        return held, problems

    def _verified_size(self) -> int:
        raw = self._c.store.get_meta(VERIFIED_META)
        try:
            return int(raw) if raw else 0
        except ValueError:
            return 0

    def _stopping(self, _seq: int) -> None:
        if self._stop.is_set():
            raise _Stopped

    def verify_now(self, *, full: bool = True) -> VerifyReport:
        """One pass: ``full`` reads every entry; otherwise only those after the last witnessed or fully
        verified checkpoint (the start-up pass)."""
        c = self._c
        held, problems = self._witnesses()
        if full:
            report = verify_log(c.store, c.audit, c.audit_signer, held, progress=self._stopping)
        else:
            report = verify_recent(c.store, c.audit, c.audit_signer, held, verified_size=self._verified_size())
        for p in problems:
            report.problem(p)
        self.last_report = report
        c.health.audit_verified = report.ok
        c.health.audit_failure = None if report.ok else report.problems[0]
        if report.ok:
            log.info("audit log verified" if full or not report.since else "audit log verified since a checkpoint",
                     extra={"entries": report.entries, "since": report.since, "seconds": round(report.seconds, 2)})
            if full and report.verified_checkpoint > self._verified_size():
                size = report.verified_checkpoint
                c.store.write_sync("audit.verified", lambda tx: tx.set_meta(VERIFIED_META, str(size).encode()))
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
            # Every worker checks what is recent before it reports ready; the full pass then runs in the
            # background (one per cluster), unless the start-up pass already failed and alerted.
            try:
                full = self.verify_now(full=False).ok
            except Exception:
                log.exception("audit verification could not run")
                self._c.health.audit_verified = False
                full = True
            while True:
                try:
                    if full and (leadership is None or leadership.lead("audit-verify")):
                        self.verify_now()
                except _Stopped:
                    return
                except Exception:
                    log.exception("audit verification could not run")
                    self._c.health.audit_verified = False
                full = True
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
