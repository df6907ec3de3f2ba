"""Prometheus instruments for fhirvault, on a registry of their own.

Each ``Metrics`` owns its ``CollectorRegistry`` (not the process-global one), so
many apps can be built in one process (tests) without duplicate registrations.
Other layers call the small methods below; ``/metrics`` renders the registry.

Label values are bounded: interactions and methods come from fixed sets, status
is the integer code, and free-form names (alert rules, backup targets, key
levels) are capped per metric; beyond the cap they are reported as "other".
Never pass ids, paths, client ids or anything derived from patient data.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fhirvault import __version__
from fhirvault.ports import ResourceStore

# In the text format each counter's `_created` twin is one more series per label set: noise for
# Prometheus (it infers resets itself). Process-wide switch; nothing else here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Request latency: 1 ms to 5 s, roughly x2.5 per step (the SLO-relevant range).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Audit append lag: created → durable, usually one group commit (sub-ms to tens of ms).
AUDIT_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

INTERACTIONS = frozenset({
    "read", "vread", "search", "create", "update", "patch", "delete", "history", "capabilities",
    "transaction", "operation", "token", "login", "discovery", "metrics", "health", "other",
})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# client_auth: token endpoint refused the client; invalid_scope: it refused the scopes asked for;
# missing_token / invalid_token: a bearer token was absent or bad (401); forbidden: scopes refused (403).
AUTH_FAILURE_KINDS = frozenset({"client_auth", "invalid_scope", "missing_token", "invalid_token", "forbidden"})
# Firewall: the bucket that refused a request, the rule that refused one outright.
RATE_LIMIT_BUCKETS = frozenset({"source", "auth", "client", "user"})
FIREWALL_REASONS = frozenset({"host", "admin_source", "login_source", "client_source", "certificate"})
SEVERITIES = frozenset({"info", "low", "medium", "high", "critical"})  # as services/alert_settings.py
_MAX_NAMES = 64  # distinct free-form label values per metric (rules, targets, levels)



class _HealthView(Protocol):
    audit_verified: bool | None


class _Bounded:
    """Caps the distinct values a free-form label takes; extra values become "other"."""

    def __init__(self, cap: int = _MAX_NAMES) -> None:
        self._seen: set[str] = set()
        self._cap = cap
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(value)
                return value
        return "other"


class _ScrapeTime(Collector):
    """Values computed when scraped: ages grow between events, health is read live."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # no duplicate-name check against fixed descriptions; names are unique here

    def collect(self) -> Iterable[Metric]:
        m = self._m
        now = m.now()
        verified = m.audit_verified_source()
        g = GaugeMetricFamily("fhirvault_audit_verified",
                              "1 if the last audit log verification succeeded, 0 if it failed, -1 before the first run")
        g.add_metric([], -1.0 if verified is None else float(verified))
        yield g
        age = GaugeMetricFamily("fhirvault_audit_checkpoint_age_seconds",
                                "Seconds since the last signed audit checkpoint (NaN before the first)")
        age.add_metric([], math.nan if m.audit_checkpoint_at is None else max(0.0, now - m.audit_checkpoint_at))
        yield age
        keys = GaugeMetricFamily("fhirvault_key_age_seconds", "Age of the active key at each level",
                                 labels=["level"])
        try:
            created = m.key_created_source()
        except Exception:  # a closed store must not break the whole scrape
            created = {}
        for level, at in sorted(created.items()):
            keys.add_metric([m.key_level(level)], max(0.0, now - at))
        yield keys


class Metrics:
    def __init__(self, *, now: Callable[[], float] = time.time, process: bool = True) -> None:
        self.now = now
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Gauge("fhirvault_build_info", "fhirvault version", ["version"], registry=r).labels(__version__).set(1)

        # HTTP
        self.http_requests = Counter("fhirvault_http_requests", "HTTP requests by FHIR interaction, method and status",
                                     ["interaction", "method", "status"], registry=r)
        self.http_duration = Histogram("fhirvault_http_request_duration_seconds",
                                       "HTTP request latency by FHIR interaction", ["interaction"],
                                       buckets=REQUEST_BUCKETS, registry=r)
        self.auth_failures = Counter("fhirvault_auth_failures",
                                     "Authentication and authorisation failures by kind", ["kind"], registry=r)
        self.rate_limited_requests = Counter("fhirvault_rate_limited_requests",
                                             "Requests refused with 429 by the token bucket that was empty",
                                             ["bucket"], registry=r)
        self.firewall_refusals = Counter("fhirvault_firewall_refusals",
                                         "Requests refused by the firewall (Host header, source allow-lists)",
                                         ["reason"], registry=r)
        # Audit
        self.audit_records = Counter("fhirvault_audit_records", "Audit records appended", registry=r)
        self.audit_append_lag = Histogram("fhirvault_audit_append_lag_seconds",
                                          "Time from an audit record being created to being durable",
                                          buckets=AUDIT_LAG_BUCKETS, registry=r)
        self.audit_last_verification = Gauge("fhirvault_audit_last_verification_timestamp_seconds",
                                             "When the audit log was last verified (Unix time)", registry=r)
        self.audit_tree_size = Gauge("fhirvault_audit_tree_size", "Records covered by the last audit verification",
                                     registry=r)
        # Alerts
        self.alerts_fired = Counter("fhirvault_alerts_fired", "Alerts fired by rule and severity",
                                    ["rule", "severity"], registry=r)
        self.alerts_open = Gauge("fhirvault_alerts_open", "Alerts currently open by severity", ["severity"],
                                 registry=r)
        # Backup, replication, disaster-recovery drills
        self.backup_last_success = Gauge("fhirvault_backup_last_success_timestamp_seconds",
                                         "When the last backup to a target succeeded (Unix time)", ["target"],
                                         registry=r)
        self.backup_duration = Gauge("fhirvault_backup_duration_seconds", "Duration of the last successful backup",
                                     ["target"], registry=r)
        self.backup_size = Gauge("fhirvault_backup_size_bytes", "Size of the last successful backup", ["target"],
                                 registry=r)
        self.backup_failures = Counter("fhirvault_backup_failures", "Failed backups by target", ["target"],
                                       registry=r)
        self.replication_lag = Gauge("fhirvault_replication_lag_seconds", "How far a replica is behind",
                                     ["target"], registry=r)
        self.dr_drill_last_success = Gauge("fhirvault_dr_drill_last_success_timestamp_seconds",
                                           "When the last restore drill succeeded (Unix time)", registry=r)
        self.dr_drill_rpo = Gauge("fhirvault_dr_drill_rpo_seconds", "Data loss window measured by the last drill",
                                  registry=r)
        self.dr_drill_rto = Gauge("fhirvault_dr_drill_rto_seconds", "Restore time measured by the last drill",
                                  registry=r)

        self.audit_checkpoint_at: float | None = None
        self._verified: bool | None = None
        self.audit_verified_source: Callable[[], bool | None] = lambda: self._verified
        self.key_created_source: Callable[[], Mapping[str, float]] = dict
        self.key_level = _Bounded()
        self._rule = _Bounded()
        self._target = _Bounded()
        r.register(_ScrapeTime(self))
        # Hot path: resolved label children, keyed by their (bounded) label values.
        self._req_children: dict[tuple[str, str, int], Counter] = {}
        self._dur_children: dict[str, Histogram] = {}

    # -- wiring (done once by the app) ---------------------------------------------
    def watch_health(self, health: _HealthView) -> None:
        """Report ``fhirvault_audit_verified`` from the state the readiness check uses."""
        self.audit_verified_source = lambda: health.audit_verified

    def watch_key_ages(self, source: Callable[[], Mapping[str, float]]) -> None:
        """``source()`` → {level: creation time, Unix seconds}; called at each scrape."""
        self.key_created_source = source

    # -- HTTP (hot path) ---------------------------------------------------------------
    def observe_request(self, interaction: str, method: str, status: int, seconds: float) -> None:
        if interaction not in INTERACTIONS:
            interaction = "other"
        if method not in HTTP_METHODS:  # the method is client-chosen: never a label as sent
            method = "other"
        key = (interaction, method, status)
        counter = self._req_children.get(key)
        if counter is None:
            counter = self._req_children[key] = self.http_requests.labels(interaction, method, str(status))
        counter.inc()
        hist = self._dur_children.get(interaction)
        if hist is None:
            hist = self._dur_children[interaction] = self.http_duration.labels(interaction)
        hist.observe(seconds)

    def auth_failure(self, kind: str) -> None:
        self.auth_failures.labels(kind if kind in AUTH_FAILURE_KINDS else "other").inc()

    def rate_limited(self, bucket: str) -> None:
        self.rate_limited_requests.labels(bucket if bucket in RATE_LIMIT_BUCKETS else "other").inc()

    def firewall_refused(self, reason: str) -> None:
        self.firewall_refusals.labels(reason if reason in FIREWALL_REASONS else "other").inc()

    # -- audit -------------------------------------------------------------------------
    def audit_recorded(self, count: int = 1, lag_seconds: float | None = None) -> None:
        """``count`` records became durable; ``lag_seconds`` from creation to durable, if known."""
        self.audit_records.inc(count)
        if lag_seconds is not None:
            self.audit_append_lag.observe(lag_seconds)

    def audit_verification(self, ok: bool, *, tree_size: int | None = None, at: float | None = None) -> None:
        """A verification run finished (``fhirvault_audit_verified`` follows the watched health if any)."""
        self._verified = ok
        self.audit_last_verification.set(self.now() if at is None else at)
        if tree_size is not None:
            self.audit_tree_size.set(tree_size)

    def audit_checkpoint(self, at: float | None = None) -> None:
        self.audit_checkpoint_at = self.now() if at is None else at

    # -- alerts --------------------------------------------------------------------------
    def alert_fired(self, rule: str, severity: str) -> None:
        self.alerts_fired.labels(self._rule(rule), _severity(severity)).inc()

    def alerts_open_now(self, counts: Mapping[str, int]) -> None:
        """The number of open alerts per severity (severities missing from ``counts`` are 0)."""
        for sev in SEVERITIES:
            self.alerts_open.labels(sev).set(counts.get(sev, 0))

    # -- backup and disaster recovery ------------------------------------------------------
    def backup_succeeded(self, target: str, *, duration_seconds: float, size_bytes: int,
                         at: float | None = None) -> None:
        t = self._target(target)
        self.backup_last_success.labels(t).set(self.now() if at is None else at)
        self.backup_duration.labels(t).set(duration_seconds)
        self.backup_size.labels(t).set(size_bytes)

    def backup_failed(self, target: str) -> None:
        self.backup_failures.labels(self._target(target)).inc()

    def replication_lag_is(self, target: str, seconds: float) -> None:
        self.replication_lag.labels(self._target(target)).set(seconds)

    def dr_drill_succeeded(self, *, rpo_seconds: float, rto_seconds: float, at: float | None = None) -> None:
        self.dr_drill_last_success.set(self.now() if at is None else at)
        self.dr_drill_rpo.set(rpo_seconds)
        self.dr_drill_rto.set(rto_seconds)


def _severity(value: str) -> str:
    return value if value in SEVERITIES else "other"


def tenant_key_created(store: ResourceStore, tenant: str) -> dict[str, float]:
    """{"tenant": creation time of the active tenant key} from the store, when rows carry ``created_ms``."""
    rows = store.tenant_keys(tenant)
    if not rows:
        return {}
    created_ms = rows[-1].created_ms  # rows are ordered by version
    if created_ms <= 0:
        return {}
    return {"tenant": created_ms / 1000}


__all__ = ["INTERACTIONS", "Metrics", "tenant_key_created"]
