"""The ASGI application: /fhir (FHIR REST), /oauth2 (token), discovery, health checks, /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fhirvault.backup.scheduler import BackupScheduler
from fhirvault.container import Container, capability_bytes
from fhirvault.domain import errors
from fhirvault.domain.r4 import resource_types
from fhirvault.fhir.bulk import BulkRoutes
from fhirvault.fhir.bulk_import_api import ImportApi
from fhirvault.fhir.router import FhirRouter
from fhirvault.ports import StoreUnavailable
from fhirvault.services.audit_monitor import AuditMonitor
from fhirvault.services.audit_verify import VerifyReport
from fhirvault.services.bulk_export import URL_SECRET, BulkExportService
from fhirvault.services.bulk_import import BulkImporter
from fhirvault.services.config_audit import changed_settings, record_residency_overrides
from fhirvault.services.detection import AUDIT_VERIFICATION, DetectionEngine
from fhirvault.services.federation import OidcProvider
from fhirvault.services.health import database_probe
from fhirvault.services.metrics import tenant_key_created
from fhirvault.services.residency import OutboundGuard, allowed_hosts, install_guard
from fhirvault.services.retention import RetentionScheduler, retention_singleton
from fhirvault.services.singletons import LeaderOnly
from fhirvault.services.subscriptions import ROLE as SUBSCRIPTIONS_ROLE
from fhirvault.services.subscriptions import SubscriptionDispatcher
from fhirvault.services.terminology import TerminologyService
from fhirvault.web import admin as admin_web
from fhirvault.web import registers as registers_web
from fhirvault.web.asgi import ASGIApp, Receive, Scope, Send
from fhirvault.web.console.routes import Console
from fhirvault.web.fhir_endpoint import FhirEndpoint
from fhirvault.web.firewall import Firewall
from fhirvault.web.login import IdentityWeb
from fhirvault.web.metrics_endpoint import MetricsEndpoint
from fhirvault.web.middleware import RequestContextMiddleware
from fhirvault.web.oauth import OAuthEndpoints
from fhirvault.web.openapi import openapi_route

log = logging.getLogger("fhirvault.app")
FHIR_PREFIX = "/fhir"


class _PerBaseUrl:
    """Documents that embed the public URL, built once per base URL seen (bounded)."""

    def __init__(self, container: Container) -> None:
        self._c = container
        self._capability: dict[str, bytes] = {}

    def capability(self, base_url: str, token_url: str) -> bytes:
        doc = self._capability.get(base_url)
        if doc is None:
            subs = self._c.settings.subscriptions
            doc = capability_bytes(base_url, token_url, self._c.clock, subscriptions=subs is None or subs.enabled)
            if len(self._capability) < 16:
                self._capability[base_url] = doc
        return doc


class _Dispatcher:
    """/fhir goes straight to the FHIR endpoint (its hot path skips Starlette's routing)."""

    def __init__(self, fhir: ASGIApp, other: ASGIApp) -> None:
        self._fhir = fhir
        self._other = other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/"):
                await self._fhir(scope, receive, send)
                return
        await self._other(scope, receive, send)


def _leads(container: Container, role: str) -> bool:
    """Whether this worker runs the cluster-wide singleton ``role`` (always, with one process)."""
    return container.leadership is None or container.leadership.lead(role)


async def _alert_housekeeping(container: Container, detection: DetectionEngine,
                              backups: LeaderOnly[BackupScheduler] | None,
                              retention: LeaderOnly[RetentionScheduler] | None = None,
                              subscriptions: LeaderOnly[SubscriptionDispatcher] | None = None) -> None:
    """Every few seconds: the clock-jump check, backup age and replication lag, the open-alert gauges;
    the backup scheduler (with its drills and replication) runs in the worker holding its role."""
    while True:
        try:
            if _leads(container, "clock-check"):  # one alert per clock jump, not one per worker
                detection.check_clock()
            if retention is not None:  # the retention job, in the worker holding its role
                await asyncio.to_thread(retention.follow)
            if subscriptions is not None:
                await asyncio.to_thread(subscriptions.follow)
            running = await asyncio.to_thread(backups.follow) if backups is not None else None
            if running is not None:
                running.update_metrics()
            if container.alerts is not None:
                by_severity: dict[str, int] = {}
                for (_rule, severity), n in container.alerts.open_counts().items():
                    by_severity[severity] = by_severity.get(severity, 0) + n
                container.metrics.alerts_open_now(by_severity)
        except Exception:
            log.exception("alert housekeeping failed")
        await asyncio.sleep(5)


async def _bulk_housekeeping(container: Container, bulk: BulkExportService) -> None:
    """Every minute (and at start): delete expired export outputs, fail exports whose process died."""
    while True:
        try:
            if _leads(container, "bulk-retention"):
                await asyncio.to_thread(bulk.sweep)
        except Exception:
            log.exception("bulk export housekeeping failed")
        await asyncio.sleep(60)


OUTBOUND_REFUSED = "outbound_refused"


def _compliance_wiring(container: Container,
                       detection: DetectionEngine) -> tuple[OutboundGuard, Callable[[], None] | None]:
    """The outbound allow-list (refusals alerted; installed while the app runs) and the patients'
    break-the-glass notifications."""

    def refused(host: str, what: str) -> None:
        detection.system_alert(OUTBOUND_REFUSED, "high", f"outbound connection to {host} refused: not a configured"
                               f" destination ({what})", f"outbound:{host}")

    guard = OutboundGuard(allowed_hosts(container.settings), refused)
    notify = container.settings.patient_notifications
    if notify is not None:
        from fhirvault.services.patient_notify import PatientNotifier

        notifier = PatientNotifier(container, notify)
        container.repository.break_glass.on_started.append(notifier.grant_started)
        return guard, notifier.close
    return guard, None


def create_app(container: Container) -> ASGIApp:
    settings = container.settings
    repo = container.repository
    metrics = container.metrics
    metrics.watch_health(container.health)
    metrics.watch_key_ages(lambda: tenant_key_created(container.store, settings.tenant))
    detection = container.enable_alerting()
    outbound, stop_notifier = _compliance_wiring(container, detection)
    providers = [OidcProvider(p) for p in settings.identity_providers]  # discovery/JWKS caches live on these
    identity = IdentityWeb.build(container, detection.throttled, providers or None)  # users, login, SMART authorization
    oauth = OAuthEndpoints(container.auth, repo, settings.public_base_url, metrics, throttled=detection.throttled,
                           server=identity.server)
    console = Console(container, identity.server, identity.users, detection, detection.throttled)
    docs = _PerBaseUrl(container)
    types = frozenset(resource_types())

    def documents_for(base_url: str) -> tuple[bytes, bytes]:
        token_url = base_url[: -len(FHIR_PREFIX)] + "/oauth2/token"
        return docs.capability(base_url, token_url), orjson.dumps(oauth.smart_configuration_for(token_url))

    bulk = BulkExportService(repo, container.store, container.keys, container.audit, container.clock,
                             container.secrets.get(URL_SECRET), settings.data_dir, tenant=settings.tenant,
                             retention_hours=settings.bulk_retention_hours, link_minutes=settings.bulk_link_minutes,
                             threads=settings.bulk_threads)
    container.bulk_export = bulk
    router = FhirRouter(repo, types, documents_for, default_count=settings.default_page_size,
                        max_count=settings.max_page_size, max_bundle_entries=settings.max_bundle_entries,
                        audit_reader=container.audit_reader, bulk=BulkRoutes(bulk),
                        terminology=TerminologyService(container.store, container.clock),
                        bulk_import=ImportApi(BulkImporter(repo), settings.data_dir / "import", bulk.jobs, bulk.files,
                                              bulk.runner, container.clock.now_ms, settings.tenant))
    fhir = FhirEndpoint(router, container.auth, repo, prefix=FHIR_PREFIX, max_body=settings.max_body_bytes,
                        public_base_url=settings.public_base_url, metrics=metrics)

    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def keys_loaded() -> bool:
        try:
            return container.keys.kek_version >= 1
        except ValueError:  # no tenant key version loaded
            return False

    async def readyz(request: Request) -> Response:
        """Ready = database writable, tenant key loaded, audit log verified since start."""
        checks: dict[str, str] = {}
        try:
            started = time.monotonic()
            try:
                await container.store.write("health.ready", database_probe)
            except StoreUnavailable:
                if time.monotonic() - started > 1:  # it already waited for the database: down
                    raise
                await container.store.write("health.ready", database_probe)  # only the session had died
            checks["database"] = "ok"
        except StoreUnavailable:  # restarting, failing over, or only a standby reachable: not ready
            log.warning("readiness check: database unavailable")
            checks["database"] = "failed"
        except Exception:
            log.exception("readiness check: database not writable")
            checks["database"] = "failed"
        checks["keys"] = "ok" if keys_loaded() else "failed"
        verified = container.health.audit_verified
        checks["audit"] = "ok" if verified is True else "pending" if verified is None else "failed"
        failed = [name for name, state in checks.items() if state != "ok"]
        if failed:
            return JSONResponse({"status": "unavailable", "failed": failed, "checks": checks}, 503,
                                {"Cache-Control": "no-store"})
        return JSONResponse({"status": "ready", "checks": checks}, headers={"Cache-Control": "no-store"})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        error = errors.not_found("Unknown URL.") if status == 404 else errors.method_not_allowed("Method not allowed.")
        return Response(orjson.dumps(error.outcome()), status, media_type="application/fhir+json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        monitor = AuditMonitor(container)
        def audit_failed(report: VerifyReport) -> None:
            detection.system_alert(AUDIT_VERIFICATION, "critical", "audit log verification failed (first bad "
                                   f"entry {report.first_bad_seq}): {report.problems[0]}", "audit-log")

        monitor.on_failure.append(audit_failed)
        # With several workers (PostgreSQL) the cluster singletons run in the worker holding their role.
        if _leads(container, "config-audit"):
            changed_settings(container)  # a config-change audit record when the settings differ from the last start
            record_residency_overrides(container)  # non-EEA destinations accepted, with their justification
        install_guard(outbound)  # outbound connections: the configured destinations only (services/residency.py)
        monitor.start()  # checkpoints + verification at start-up (readiness waits for it) and on schedule
        backup_settings = settings.backup
        # Scheduled backups, drills and continuous replication when configured, in one worker of the
        # cluster; another takes them over within seconds when it dies or loses its database session.
        backups = LeaderOnly(container.leadership, "backups",
                             lambda: BackupScheduler(container, detection, backup_settings)) \
            if backup_settings else None
        if backups is not None:
            backups.follow()
        # Subscription notifications: matched and sent by one worker of the cluster (docs/subscriptions.md).
        service = container.subscriptions
        subscriptions = LeaderOnly(container.leadership, SUBSCRIPTIONS_ROLE,
                                   lambda: SubscriptionDispatcher(service, container.leadership)) \
            if service is not None and service.settings.enabled else None
        if subscriptions is not None:
            await asyncio.to_thread(subscriptions.follow)
        retention = retention_singleton(container)
        housekeeping = asyncio.create_task(
            _alert_housekeeping(container, detection, backups, retention, subscriptions))
        bulk_retention = asyncio.create_task(_bulk_housekeeping(container, bulk))
        console.sampler.start()  # the console's charts: one sample a minute
        yield
        console.sampler.stop()
        housekeeping.cancel()
        bulk_retention.cancel()
        bulk.close()
        retention.stop()
        if subscriptions is not None:
            await asyncio.to_thread(subscriptions.stop)
        if backups is not None:
            backups.stop()
        monitor.stop()
        if stop_notifier is not None:
            stop_notifier()  # the notices already queued go out first (bounded wait)
        container.close()
        install_guard(None)

    other = Starlette(
        routes=[
            Route("/oauth2/token", oauth.token, methods=["POST"], name="token"),
            Route("/oauth2/jwks", oauth.jwks, methods=["GET"]),
            Route("/.well-known/smart-configuration", oauth.smart_configuration, methods=["GET"]),
            *identity.routes(oauth),
            Route("/livez", livez, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *admin_web.routes(container),
            *console.routes(),
            *registers_web.routes(container),
            Route("/metrics", MetricsEndpoint(metrics, container.auth, repo).scrape, methods=["GET"]),
            openapi_route("/openapi.json", lambda: other.routes, FHIR_PREFIX, lambda url: documents_for(url)[0],
                          fhir.base_url),
        ],
        exception_handlers={404: http_error, 405: http_error},
        lifespan=lifespan,
    )
    guarded = Firewall(_Dispatcher(fhir, other), settings, auth=container.auth, store=container.store, repo=repo,
                       metrics=metrics, detection=detection)
    return RequestContextMiddleware(guarded, hsts=settings.tls_cert is not None, metrics=metrics)


__all__ = ["create_app"]
