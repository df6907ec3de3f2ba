"""Inside the server: scheduled backups (create → verify → prune) and continuous replication.

Each run is recorded in the audit trail (``backup`` system events), feeds the
Prometheus gauges, and a failure — or a last success older than the bound —
raises an alert. Replication ships committed changes to ``replicate_to`` about
once a second; its lag is a gauge too.

Several server processes may share one database (PostgreSQL, ``serve --workers
N``): the backups, drills and replication are cluster singletons, run by the
process that holds the ``backups`` role of the Leadership port (an advisory
lock), which each round checks again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fhirvault.backup.engine import create_backup, prune, verify_backup
from fhirvault.backup.manifest import BackupKeys
from fhirvault.backup.replication import Replicator
from fhirvault.backup.settings import BackupSettings
from fhirvault.backup.targets import open_target, resolve
from fhirvault.container import change_feed_source, delta_feed_source, snapshot_source

if TYPE_CHECKING:
    from fhirvault.container import Container
    from fhirvault.services.detection import DetectionEngine

log = logging.getLogger("fhirvault.backup")

BACKUP_FAILED = "backup_failed"
BACKUP_STALE = "backup_stale"
DR_DRILL_FAILED = "dr_drill_failed"
ROLE = "backups"  # the Leadership role of the process that runs them


class BackupScheduler:
    def __init__(self, container: Container, detection: DetectionEngine, settings: BackupSettings) -> None:
        self._c = container
        self._detection = detection
        self._settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replicator: Replicator | None = None
        self.last_success: float | None = None  # wall clock
        self._started = time.time()
        self._leading = False

    def leads(self) -> bool:
        """Whether this process runs the cluster's backups (always, when it is the only process)."""
        leadership = self._c.leadership
        leading = leadership is None or leadership.lead(ROLE)
        if leading and not self._leading:
            self._started = time.time()  # a new leader's age bound counts from the takeover
        self._leading = leading
        return leading

    def scheduled_round(self, work: Callable[[], bool]) -> bool | None:
        """One round of the schedule: ``work`` (a backup or a drill) if this process leads, else None."""
        return work() if self.leads() else None

    @property
    def interval(self) -> int:
        return self._settings.schedule.interval_seconds

    def _target_name(self) -> str:
        return resolve("", self._settings).name

    # -- one scheduled run -------------------------------------------------------------
    def run_once(self) -> bool:
        c, metrics = self._c, self._c.metrics
        name = "?"
        started = time.monotonic()
        try:
            t = resolve("", self._settings)
            name = t.name
            target = open_target("", self._settings)
            result = create_backup(c.settings.data_dir, target, c.root, retain_days=t.object_lock_days,
                                   source=snapshot_source(c.settings), feed=delta_feed_source(c.settings))
            instance = c.store.get_meta("instance-id")
            verified = verify_backup(target, c.root, result.backup_id,
                                     instance_id=instance.decode() if instance else None)
            if not verified.ok:
                raise RuntimeError(f"backup {result.backup_id} did not verify")
            pruned = prune(target, c.root, instance.decode() if instance else "", self._settings.retention)
        except Exception as exc:
            metrics.backup_failed(name)
            summary = f"scheduled backup to {name} failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.error("scheduled backup failed", extra={"target": name, "error": type(exc).__name__})
            self._detection.system_alert(BACKUP_FAILED, "high", summary, f"backup:{name}")
            self._audit(f"backup to {name} failed: {type(exc).__name__}", status=500)
            return False
        seconds = time.monotonic() - started
        self.last_success = time.time()
        metrics.backup_succeeded(name, duration_seconds=seconds, size_bytes=result.size)
        self._audit(f"backup {result.backup_id} to {name}: {result.uploaded_chunks}/{result.chunks} chunks "
                    f"uploaded, verified; {len(pruned.deleted_manifests)} old backups pruned")
        return True

    def drill_once(self) -> bool:
        """Restore the latest backup into a scratch directory, serve it, compare, verify; report RPO/RTO."""
        from fhirvault.backup.drill import DrillReport, run_drill
        from fhirvault.backup.engine import default_replay

        c = self._c
        name = "?"
        report: DrillReport | None = None
        try:
            name = self._target_name()
            report, _files = run_drill(c.settings, open_target("", self._settings), replay=default_replay(),
                                       report_dir=c.settings.data_dir / "dr-drills",
                                       scratch_url=self._settings.drill_scratch_url)
            problem = "; ".join(report.problems[:2])
        except Exception as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        if report is not None and report.ok:
            c.metrics.dr_drill_succeeded(rpo_seconds=report.rpo_seconds, rto_seconds=report.rto_seconds)
            self._audit(f"disaster-recovery drill from {name} passed: RPO {report.rpo_seconds:.1f} s, "
                        f"RTO {report.rto_seconds:.1f} s", interaction="dr-drill")
            return True
        self._detection.system_alert(DR_DRILL_FAILED, "high", f"disaster-recovery drill from {name} failed: "
                                     f"{problem}", f"dr-drill:{name}")
        self._audit(f"disaster-recovery drill from {name} failed", status=500, interaction="dr-drill")
        return False

    def _audit(self, detail: str, status: int = 200, interaction: str = "backup") -> None:
        try:
            self._c.audit.record_system_event(self._c.store, self._c.clock, interaction, detail, status=status)
        except Exception:
            log.exception("could not audit a backup run")

    def check_age(self) -> None:
        """Alert when the last successful backup is older than its bound (default: twice the interval)."""
        if not self.interval or not self.leads():
            return
        bound = self._settings.schedule.max_age_seconds or 2 * self.interval
        since = self.last_success or self._started
        if time.time() - since > bound:
            self._detection.system_alert(BACKUP_STALE, "high", f"no successful backup for more than {bound} s",
                                         f"backup-age:{self._target_name()}")

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        # Replication runs in the leader from the start (on PostgreSQL config.py allows it with one worker only:
        # the feed needs seqs committed in order).
        if self._settings.replicate_to and self.leads():
            keys = BackupKeys(self._c.secrets.get("backup"), self._c.secrets.get("backup-signing"))
            target = open_target(self._settings.replicate_to, self._settings)
            self.replicator = Replicator(change_feed_source(self._c.settings), target, keys.seal_key)
            self.replicator.start()
        if self._settings.drill_interval_seconds:
            def drills() -> None:
                while not self._stop.wait(self._settings.drill_interval_seconds):
                    self.scheduled_round(self.drill_once)

            threading.Thread(target=drills, name="fhirvault-dr-drills", daemon=True).start()
        if not self.interval:
            return

        def run() -> None:
            while True:
                delay = self.interval + random.uniform(0, self._settings.schedule.jitter_seconds)  # noqa: S311
                if self._stop.wait(delay):
                    return
                self.scheduled_round(self.run_once)

        self._thread = threading.Thread(target=run, name="fhirvault-backups", daemon=True)
        self._thread.start()

    def update_metrics(self) -> None:
        self.check_age()
        if self.replicator is not None and self._settings.replicate_to:
            self._c.metrics.replication_lag_is(self._settings.replicate_to, self.replicator.lag_seconds())

    def stop(self) -> None:
        self._stop.set()
        if self.replicator is not None:
            self.replicator.stop()  # ships what is left, bounded
