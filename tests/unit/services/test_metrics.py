from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.ports import TenantKeyRow
from fhirvault.services.health import HealthState
from fhirvault.services.metrics import Metrics, tenant_key_created


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_registries_are_independent_and_include_process_stats() -> None:
    a, b = Metrics(), Metrics()  # a second instance must not clash with the first
    a.observe_request("read", "GET", 200, 0.003)
    assert value(a, "fhirvault_http_requests_total", interaction="read", method="GET", status="200") == 1
    assert value(b, "fhirvault_http_requests_total", interaction="read", method="GET", status="200") is None
    names = {k[0] for k in samples(a)}
    assert "process_resident_memory_bytes" in names and "python_gc_collections_total" in names
    assert value(a, "fhirvault_build_info", version="0.1.0") == 1


def test_request_latency_histogram_and_bounded_labels() -> None:
    m = Metrics(process=False)
    m.observe_request("search", "GET", 200, 0.0004)
    m.observe_request("search", "GET", 200, 0.02)
    m.observe_request("Patient/123", "BREW", 418, 7.0)  # unknown interaction and method: folded
    assert value(m, "fhirvault_http_request_duration_seconds_bucket", interaction="search", le="0.001") == 1
    assert value(m, "fhirvault_http_request_duration_seconds_bucket", interaction="search", le="0.025") == 2
    assert value(m, "fhirvault_http_request_duration_seconds_count", interaction="search") == 2
    assert value(m, "fhirvault_http_requests_total", interaction="other", method="other", status="418") == 1
    text = generate_latest(m.registry).decode()
    assert "BREW" not in text and "Patient/123" not in text


def test_auth_failures_alerts_and_free_form_labels_are_capped() -> None:
    m = Metrics(process=False)
    m.auth_failure("invalid_token")
    m.auth_failure("invalid_token")
    m.auth_failure("something-else")
    assert value(m, "fhirvault_auth_failures_total", kind="invalid_token") == 2
    assert value(m, "fhirvault_auth_failures_total", kind="other") == 1
    for i in range(100):
        m.alert_fired(f"rule-{i}", "high")
    m.alert_fired("rule-0", "bogus")
    fired = {k: v for k, v in samples(m).items() if k[0] == "fhirvault_alerts_fired_total"}
    assert len(fired) == 64 + 1 + 1  # 64 named rules, "other" for the rest, rule-0 with severity "other"
    assert value(m, "fhirvault_alerts_fired_total", rule="other", severity="high") == 36
    m.alerts_open_now({"critical": 2})
    assert value(m, "fhirvault_alerts_open", severity="critical") == 2
    assert value(m, "fhirvault_alerts_open", severity="low") == 0


def test_audit_metrics_and_scrape_time_ages() -> None:
    now = [1_000_000.0]
    m = Metrics(now=lambda: now[0], process=False)
    assert value(m, "fhirvault_audit_verified") == -1  # before the first verification
    assert math.isnan(value(m, "fhirvault_audit_checkpoint_age_seconds") or 0.0)
    m.audit_recorded(3, lag_seconds=0.004)
    m.audit_verification(True, tree_size=42)
    m.audit_checkpoint()
    now[0] += 90
    assert value(m, "fhirvault_audit_records_total") == 3
    assert value(m, "fhirvault_audit_append_lag_seconds_bucket", le="0.005") == 1
    assert value(m, "fhirvault_audit_verified") == 1
    assert value(m, "fhirvault_audit_tree_size") == 42
    assert value(m, "fhirvault_audit_last_verification_timestamp_seconds") == 1_000_000
    assert value(m, "fhirvault_audit_checkpoint_age_seconds") == 90  # grows between checkpoints
    m.audit_verification(False)
    assert value(m, "fhirvault_audit_verified") == 0


def test_audit_verified_follows_the_health_state() -> None:
    m = Metrics(process=False)
    health = HealthState()
    m.watch_health(health)
    assert value(m, "fhirvault_audit_verified") == -1
    health.audit_verified = False
    assert value(m, "fhirvault_audit_verified") == 0
    health.audit_verified = True
    assert value(m, "fhirvault_audit_verified") == 1


def test_backup_and_drill_gauges() -> None:
    m = Metrics(now=lambda: 5000.0, process=False)
    m.backup_succeeded("s3-offsite", duration_seconds=12.5, size_bytes=1 << 20)
    m.backup_failed("s3-offsite")
    m.replication_lag_is("replica", 3.0)
    m.dr_drill_succeeded(rpo_seconds=60, rto_seconds=300, at=4000.0)
    assert value(m, "fhirvault_backup_last_success_timestamp_seconds", target="s3-offsite") == 5000
    assert value(m, "fhirvault_backup_duration_seconds", target="s3-offsite") == 12.5
    assert value(m, "fhirvault_backup_size_bytes", target="s3-offsite") == 1 << 20
    assert value(m, "fhirvault_backup_failures_total", target="s3-offsite") == 1
    assert value(m, "fhirvault_replication_lag_seconds", target="replica") == 3
    assert value(m, "fhirvault_dr_drill_last_success_timestamp_seconds") == 4000
    assert value(m, "fhirvault_dr_drill_rpo_seconds") == 60
    assert value(m, "fhirvault_dr_drill_rto_seconds") == 300


@dataclass(frozen=True)
class _RowWithCreated:
    tenant: str
    version: int
    created_ms: int


class _Store:
    def __init__(self, rows: list[object]) -> None:
        self.rows = rows

    def tenant_keys(self, tenant: str) -> list[object]:
        return self.rows


def test_key_age_is_computed_at_scrape_time() -> None:
    now = [2_000_000.0]
    m = Metrics(now=lambda: now[0], process=False)
    store = _Store([_RowWithCreated("t", 1, 1_000_000_000), _RowWithCreated("t", 2, 1_900_000_000)])
    m.watch_key_ages(lambda: tenant_key_created(store, "t"))  # type: ignore[arg-type]
    assert value(m, "fhirvault_key_age_seconds", level="tenant") == 100_000  # the newest version counts
    now[0] += 60
    assert value(m, "fhirvault_key_age_seconds", level="tenant") == 100_060


def test_key_age_source_failures_do_not_break_the_scrape(tmp_path: Path) -> None:
    m = Metrics(process=False)

    def broken() -> dict[str, float]:
        raise RuntimeError("store closed")

    m.watch_key_ages(broken)
    m.audit_recorded()
    assert value(m, "fhirvault_audit_records_total") == 1
    assert not any(k[0] == "fhirvault_key_age_seconds" for k in samples(m))


def test_tenant_key_created_without_created_ms_reports_nothing() -> None:
    # TenantKeyRow does not carry created_ms (yet): no gauge rather than a wrong one.
    store = MemoryStore()
    store.write_sync("k", lambda tx: tx.insert_tenant_key(TenantKeyRow("t", 1, b"w", "r1"), 1_000))
    assert tenant_key_created(store, "t") == {} or tenant_key_created(store, "t") == {"tenant": 1.0}
    assert tenant_key_created(store, "other") == {}
