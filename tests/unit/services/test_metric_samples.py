"""The console's time series: samples read from the Prometheus registry, kept in an hourly ring in meta."""

from __future__ import annotations

from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.services.metric_samples import HOUR_MS, Sample, Sampler, SampleStore, read_sample
from fhirvault.services.metrics import Metrics

T0 = 1_800_000_000_000


def test_a_sample_reads_counters_and_gauges() -> None:
    metrics = Metrics(process=False, now=lambda: T0 / 1000)
    metrics.observe_request("read", "GET", 200, 0.010)
    metrics.observe_request("read", "GET", 403, 0.030)
    metrics.observe_request("search", "GET", 429, 0.020)
    metrics.alerts_open_now({"high": 2, "low": 1})
    metrics.backup_succeeded("local", duration_seconds=1, size_bytes=10, at=T0 / 1000 - 90)
    sample = read_sample(metrics, T0)
    v = sample.values
    assert v["requests"] == 3 and v["refusals"] == 2 and v["latency_count"] == 3
    assert abs((v["latency_sum"] or 0) - 0.060) < 1e-9
    assert v["alerts_open"] == 3 and v["backup_age_s"] == 90
    assert v["replication_lag_s"] is None and v["drill_rpo_s"] is None and v["audit_verified"] is None
    metrics.audit_verification(True)
    metrics.dr_drill_succeeded(rpo_seconds=4.5, rto_seconds=12.0)
    v = read_sample(metrics, T0).values
    assert v["audit_verified"] == 1.0 and v["drill_rpo_s"] == 4.5 and v["drill_rto_s"] == 12.0


def test_the_ring_keeps_days_of_hours_and_overwrites_the_oldest() -> None:
    store = SampleStore(MemoryStore(), days=1)  # 24 hourly slots
    for hour in range(30):
        store.add(Sample(T0 + hour * HOUR_MS, {"requests": float(hour)}))
        store.add(Sample(T0 + hour * HOUR_MS + 60_000, {"requests": float(hour) + 0.5}))
    last = T0 + 29 * HOUR_MS + 60_000
    everything = store.since(T0, last)
    hours = sorted({int(s.values["requests"] or 0) for s in everything})
    assert hours == list(range(6, 30))  # hours 0-5 were overwritten by 24-29
    assert [s.ts_ms for s in everything] == sorted(s.ts_ms for s in everything)
    recent = store.since(last - HOUR_MS, last)
    assert [s.values["requests"] for s in recent] == [28.5, 29.0, 29.5]


def test_the_sampler_only_samples_where_it_leads() -> None:
    metrics, mem = Metrics(process=False), MemoryStore()
    store = SampleStore(mem)

    class Clock:
        def now_ms(self) -> int:
            return T0

    leading = {"now": False}
    sampler = Sampler(metrics, store, Clock(), leads=lambda: leading["now"])
    assert sampler.sample_once() is None and store.since(T0 - HOUR_MS, T0) == []
    leading["now"] = True
    assert sampler.sample_once() is not None and len(store.since(T0 - HOUR_MS, T0)) == 1
