"""A small time series of the server's health, sampled in-process for the operator console's charts.

Every ``interval`` seconds (a minute by default) one sample is read from the Prometheus registry
(services/metrics.py): cumulative request, refusal and latency counters, open alerts, backup age,
replication lag, the last drill's RPO/RTO and the audit verification state. Samples are kept
``days`` days in a ring of hourly documents in the store's ``meta`` table (``days * 24`` rows at
most, each overwritten when its hour comes round again): no table, no migration, both engines.

Only the process that leads the ``metric-samples`` role samples; counters are that process's own
(a multi-worker deployment charts one worker's traffic: Prometheus remains the place for totals).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson

from fhirvault.ports import Clock, ResourceStore, WriteTx
from fhirvault.services.metrics import Metrics

log = logging.getLogger("fhirvault.samples")
_PREFIX = "metric-samples:"
HOUR_MS = 3_600_000
REFUSED = frozenset({"401", "403", "429"})
# Fields of a sample (None when unknown: no backup configured, no drill run yet…).
FIELDS = ("requests", "refusals", "latency_sum", "latency_count", "alerts_open", "backup_age_s",
          "replication_lag_s", "drill_rpo_s", "drill_rto_s", "audit_verified")


@dataclass(frozen=True, slots=True)
class Sample:
    ts_ms: int
    values: dict[str, float | None]


def _total(metric_families: Iterable[object], suffix: str = "_total",
           keep: Callable[[dict[str, str]], bool] = lambda _labels: True) -> float:
    total = 0.0
    for family in metric_families:
        for s in family.samples:  # type: ignore[attr-defined]
            if s.name.endswith(suffix) and keep(s.labels):
                total += s.value
    return total


def _gauges(metric: object) -> list[float]:
    return [s.value for family in metric.collect() for s in family.samples]  # type: ignore[attr-defined]


def read_sample(metrics: Metrics, now_ms: int) -> Sample:
    """One sample of the registry as it is now."""
    now_s = now_ms / 1000
    requests = _total(metrics.http_requests.collect())
    refusals = _total(metrics.http_requests.collect(), keep=lambda labels: labels.get("status") in REFUSED)
    latency_sum = _total(metrics.http_duration.collect(), "_sum")
    latency_count = _total(metrics.http_duration.collect(), "_count")
    alerts_open = sum(_gauges(metrics.alerts_open))
    backups = [v for v in _gauges(metrics.backup_last_success) if v > 0]
    lags = _gauges(metrics.replication_lag)
    drilled = any(v > 0 for v in _gauges(metrics.dr_drill_last_success))
    verified = metrics.audit_verified_source()
    values: dict[str, float | None] = {
        "requests": requests, "refusals": refusals, "latency_sum": latency_sum, "latency_count": latency_count,
        "alerts_open": alerts_open,
        "backup_age_s": max(0.0, now_s - max(backups)) if backups else None,
        "replication_lag_s": max(lags) if lags else None,
        "drill_rpo_s": _gauges(metrics.dr_drill_rpo)[0] if drilled else None,
        "drill_rto_s": _gauges(metrics.dr_drill_rto)[0] if drilled else None,
        "audit_verified": None if verified is None else float(verified),
    }
    return Sample(now_ms, values)


class SampleStore:
    """The hourly ring of samples in ``meta``."""

    def __init__(self, store: ResourceStore, *, days: int = 7) -> None:
        self._store = store
        self.slots = max(1, days) * 24

    def _name(self, hour: int) -> str:
        return f"{_PREFIX}{hour % self.slots}"

    def add(self, sample: Sample) -> None:
        hour = sample.ts_ms // HOUR_MS
        name = self._name(hour)

        def job(tx: WriteTx) -> None:
            raw = tx.get_meta(name)
            doc = orjson.loads(raw) if raw else None
            points = doc["points"] if doc and doc.get("hour") == hour else []  # an old hour is overwritten
            points.append([sample.ts_ms, sample.values])
            tx.set_meta(name, orjson.dumps({"hour": hour, "points": points}))

        self._store.write_sync("metric-samples", job)

    def since(self, since_ms: int, until_ms: int) -> list[Sample]:
        """Samples with since_ms <= ts <= until_ms, oldest first."""
        first, last = since_ms // HOUR_MS, until_ms // HOUR_MS
        first = max(first, last - self.slots + 1)
        out: list[Sample] = []
        for hour in range(first, last + 1):
            raw = self._store.get_meta(self._name(hour))
            if not raw:
                continue
            doc = orjson.loads(raw)
            if doc.get("hour") != hour:
                continue
            out += [Sample(int(ts), {k: values.get(k) for k in FIELDS}) for ts, values in doc["points"]
                    if since_ms <= ts <= until_ms]
        return out


class Sampler:
    """A daemon thread adding one sample now and then every ``interval`` seconds (when ``leads()``)."""

    def __init__(self, metrics: Metrics, samples: SampleStore, clock: Clock, *, interval: float = 60.0,
                 leads: Callable[[], bool] = lambda: True) -> None:
        self._metrics = metrics
        self._samples = samples
        self._clock = clock
        self._interval = interval
        self._leads = leads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> Sample | None:
        if not self._leads():
            return None
        sample = read_sample(self._metrics, self._clock.now_ms())
        self._samples.add(sample)
        return sample

    def _run(self) -> None:
        while True:
            try:
                self.sample_once()
            except Exception:
                log.exception("metric sample failed")
            if self._stop.wait(self._interval):
                return

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fhirvault-metric-samples", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
