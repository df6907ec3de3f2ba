"""Alerts: raised by detection, deduplicated, stored, and delivered to sinks.

``raise_alert`` runs on the event loop for every detection, so it only touches
memory: the active (not closed) alerts are cached by (rule, dedup_key), a
repeat bumps the count, and the store write and the deliveries happen on
background threads. One writer thread coalesces store writes (a flood of
repeats becomes one row update per batch). Each sink has its own thread and
bounded queue, so a sink that hangs or fails only delays itself; when its
queue is full the oldest waiting delivery is dropped and counted.

Alerts never carry PHI: rules put actor ids, roles, source addresses, counts
and rule names in them, never patient or resource ids.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from fhirvault.ports import Clock
from fhirvault.services.alert_settings import SEVERITIES, SEVERITY_RANK

log = logging.getLogger("fhirvault.alerts")

OPEN, ACKNOWLEDGED, CLOSED = "open", "acknowledged", "closed"
STATES = (OPEN, ACKNOWLEDGED, CLOSED)
FIRING, RESOLVED = "firing", "resolved"  # delivery events (Alertmanager vocabulary)


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    rule: str
    severity: str
    summary: str
    dedup_key: str
    state: str
    first_ms: int
    last_ms: int
    count: int
    labels: dict[str, str] = field(default_factory=dict)
    notified_ms: int = 0  # last time it was handed to the sinks
    updated_by: str | None = None  # who acknowledged or closed it
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class AlertStore(Protocol):
    def save_many(self, alerts: Iterable[Alert]) -> None:
        """Insert or replace these alerts (by id) in one durable transaction."""
        ...

    def get(self, alert_id: str) -> Alert | None: ...

    def list(self, *, state: str | None = None, rule: str | None = None, min_severity: str | None = None,
             since_ms: int | None = None, limit: int = 100) -> builtins.list[Alert]:
        """Newest (by last_ms) first."""
        ...

    def active(self) -> builtins.list[Alert]:
        """Every alert not closed."""
        ...

    def close(self) -> None: ...


class AlertSink(Protocol):
    name: str
    min_severity: str

    def send(self, alert: Alert, event: str) -> None:
        """Deliver ``alert`` (event: firing | resolved); raise on failure so it is retried."""
        ...

    def close(self) -> None: ...


@dataclass
class SinkStats:
    delivered: int = 0
    failed_attempts: int = 0
    dropped_queue_full: int = 0
    given_up: int = 0


class _SinkWorker:
    """One sink's thread: a bounded queue, retries with exponential backoff."""

    def __init__(self, sink: AlertSink, queue_size: int, attempts: int, initial: float, maximum: float) -> None:
        self.sink = sink
        self.stats = SinkStats()
        self._queue: collections.deque[tuple[Alert, str]] = collections.deque()
        self._size = queue_size
        self._attempts = attempts
        self._initial = initial
        self._max = maximum
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"alert-sink-{sink.name}", daemon=True)
        self._thread.start()

    def put(self, alert: Alert, event: str) -> None:
        with self._cond:
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self.stats.dropped_queue_full += 1
            self._queue.append((alert, event))
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        try:
            self.sink.close()
        except Exception as exc:  # a sink that fails to close must not stop the others
            log.warning("alert sink close failed", extra={"sink": self.sink.name, "error": type(exc).__name__})

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                alert, event = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(alert, event)
            finally:
                with self._cond:
                    self._busy = False

    def _deliver(self, alert: Alert, event: str) -> None:
        delay = self._initial
        for attempt in range(1, self._attempts + 1):
            try:
                self.sink.send(alert, event)
                self.stats.delivered += 1
                return
            except Exception as exc:
                self.stats.failed_attempts += 1
                log.warning("alert delivery failed", extra={
                    "sink": self.sink.name, "rule": alert.rule, "attempt": attempt, "error": type(exc).__name__})
            with self._cond:
                if self._stopping:
                    break  # on shutdown, one attempt per waiting alert
                self._cond.wait(delay)
            delay = min(delay * 2, self._max)
        self.stats.given_up += 1


class AlertService:
    def __init__(self, store: AlertStore, sinks: Iterable[AlertSink], clock: Clock, *,
                 renotify_seconds: int = 3600, queue_size: int = 1000, retry_attempts: int = 8,
                 retry_initial_seconds: float = 1.0, retry_max_seconds: float = 60.0,
                 max_active: int = 10_000) -> None:
        self._store = store
        self._clock = clock
        self._renotify_ms = renotify_seconds * 1000
        self._max_active = max_active
        self._lock = threading.Lock()  # guards the cache and the dirty set
        self._store_lock = threading.Lock()  # orders store writes: the last snapshot taken is the last written
        self._active: collections.OrderedDict[tuple[str, str], Alert] = collections.OrderedDict()
        for alert in sorted(store.active(), key=lambda a: a.last_ms)[-max_active:]:
            self._active[(alert.rule, alert.dedup_key)] = alert
        self._dirty: dict[str, Alert] = {}
        self._workers = [_SinkWorker(s, queue_size, retry_attempts, retry_initial_seconds, retry_max_seconds)
                         for s in sinks]
        self._on_fired: list[Callable[[Alert], None]] = []
        self.store_errors = 0
        self._writer_cond = threading.Condition(self._lock)
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="alert-writer", daemon=True)
        self._writer.start()

    # --- raising -----------------------------------------------------------

    def on_fired(self, callback: Callable[[Alert], None]) -> None:
        """Call ``callback(alert)`` on every raise, repeats included (``alert.count`` tells them apart)."""
        self._on_fired.append(callback)

    def raise_alert(self, rule: str, severity: str, summary: str, dedup_key: str,
                    labels: dict[str, str] | None = None) -> Alert:
        """Open an alert, or count a repeat of the one still open for (rule, dedup_key)."""
        if severity not in SEVERITY_RANK:
            raise ValueError(f"unknown severity {severity!r}")
        now = self._clock.now_ms()
        key = (rule, dedup_key)
        notify = False
        alert: Alert
        with self._lock:
            current = self._active.get(key)
            if current is None:
                alert = Alert(id=secrets.token_hex(12), rule=rule, severity=severity, summary=summary,
                              dedup_key=dedup_key, state=OPEN, first_ms=now, last_ms=now, count=1,
                              labels=dict(labels or {}), notified_ms=now)
                notify = True
                if len(self._active) >= self._max_active:
                    self._active.popitem(last=False)  # still stored; a repeat opens a new alert
            else:
                # Severity only escalates, and an escalation is news; a repeat does not re-page an
                # acknowledged alert.
                escalated = SEVERITY_RANK[severity] > SEVERITY_RANK[current.severity]
                if escalated:
                    current = dataclasses.replace(current, severity=severity)
                notify = current.state == OPEN and (escalated or now - current.notified_ms >= self._renotify_ms)
                alert = dataclasses.replace(current, summary=summary, last_ms=now, count=current.count + 1,
                                            labels={**current.labels, **(labels or {})},
                                            notified_ms=now if notify else current.notified_ms)
                self._active.move_to_end(key)
            self._active[key] = alert
            self._dirty[alert.id] = alert
            self._writer_cond.notify()
        if notify:
            self._deliver(alert, FIRING)
        for callback in self._on_fired:
            try:
                callback(alert)
            except Exception as exc:
                log.warning("alert callback failed", extra={"error": type(exc).__name__})
        return alert

    def _deliver(self, alert: Alert, event: str) -> None:
        rank = SEVERITY_RANK[alert.severity]
        for worker in self._workers:
            if rank >= SEVERITY_RANK[worker.sink.min_severity]:
                worker.put(alert, event)

    # --- operator actions ----------------------------------------------------

    def acknowledge(self, alert_id: str, actor: str, note: str | None = None) -> Alert | None:
        return self._transition(alert_id, ACKNOWLEDGED, actor, note)

    def close_alert(self, alert_id: str, actor: str, note: str | None = None) -> Alert | None:
        """Close it (sinks get a ``resolved`` event); the next detection opens a new alert."""
        return self._transition(alert_id, CLOSED, actor, note)

    def _transition(self, alert_id: str, state: str, actor: str, note: str | None) -> Alert | None:
        self.flush()  # the stored row is current before we read it
        with self._lock:
            cached = next((a for a in self._active.values() if a.id == alert_id), None)
        alert = cached or self._store.get(alert_id)
        if alert is None or alert.state == CLOSED:
            return None
        updated = dataclasses.replace(alert, state=state, updated_by=actor, note=note, last_ms=self._clock.now_ms())
        with self._lock:
            key = (alert.rule, alert.dedup_key)
            if state == CLOSED:
                if key in self._active and self._active[key].id == alert_id:
                    del self._active[key]
            elif key in self._active and self._active[key].id == alert_id:
                # keep counts added since our read
                updated = dataclasses.replace(self._active[key], state=state, updated_by=actor, note=note)
                self._active[key] = updated
            self._dirty[alert_id] = updated
        self.flush()  # operator actions are durable when they return
        if state == CLOSED:
            self._deliver(updated, RESOLVED)
        return updated

    # --- queries --------------------------------------------------------------

    def get(self, alert_id: str) -> Alert | None:
        self.flush()
        return self._store.get(alert_id)

    def list(self, *, state: str | None = None, rule: str | None = None, min_severity: str | None = None,
             since_ms: int | None = None, limit: int = 100) -> builtins.list[Alert]:
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        if min_severity is not None and min_severity not in SEVERITIES:
            raise ValueError(f"unknown severity {min_severity!r}")
        self.flush()
        return self._store.list(state=state, rule=rule, min_severity=min_severity, since_ms=since_ms, limit=limit)

    def open_counts(self) -> dict[tuple[str, str], int]:
        """Not-closed alerts by (rule, severity): what an ``alerts_open`` gauge exposes."""
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for alert in self._active.values():
                k = (alert.rule, alert.severity)
                counts[k] = counts.get(k, 0) + 1
        return counts

    def sink_stats(self) -> dict[str, SinkStats]:
        return {w.sink.name: w.stats for w in self._workers}

    # --- persistence and shutdown -------------------------------------------

    def flush(self) -> None:
        """Write every pending change to the store now (on the caller's thread)."""
        with self._store_lock:
            with self._lock:
                batch, self._dirty = list(self._dirty.values()), {}
            if not batch:
                return
            try:
                self._store.save_many(batch)
            except Exception as exc:
                self.store_errors += 1
                log.error("alert store write failed", extra={"error": type(exc).__name__})
                with self._lock:  # keep them for the next try, unless a newer snapshot arrived
                    for alert in batch:
                        self._dirty.setdefault(alert.id, alert)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._stopping:
                    self._writer_cond.wait()
                stopping = self._stopping
            self.flush()
            if stopping:
                return
            time.sleep(0.05)  # let a burst of repeats coalesce into one transaction

    def wait_delivered(self, timeout: float) -> bool:
        """Block until every sink queue is empty (or ``timeout``); True if drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w.idle() for w in self._workers):
                return True
            time.sleep(0.01)
        return all(w.idle() for w in self._workers)

    def close(self, timeout: float = 5.0) -> None:
        """Flush the store, give sinks up to ``timeout`` seconds to drain, then stop."""
        with self._lock:
            self._stopping = True
            self._writer_cond.notify_all()
        self._writer.join(timeout)
        self.flush()
        self.wait_delivered(timeout)
        for worker in self._workers:
            worker.stop(0.5)
        self._store.close()
