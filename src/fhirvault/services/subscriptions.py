"""FHIR R4 Subscriptions, rest-hook channel: accept, match after commit, deliver durably, re-authorise.

Request path (any worker): a Subscription written through the REST API is checked (``prepare``):
rest-hook only, criteria parsed by the search parser, the owner allowed to search the criteria's type;
the server sets ``status`` (``requested``, or ``off`` if the client asked for it) and records the owner
(client, scopes, user, patient context) in an extension, replacing anything a client put there.

Write path (any worker): every committed resource write also adds one routing row (type, id, version)
to the ``subscription_changes`` outbox, in the write's own transaction, while the tenant has a
subscription that is requested or active. No matching, no decryption, no network on the write path.

Delivery (one worker of the cluster: ``LeaderOnly`` role ``subscriptions``): ``SubscriptionDispatcher``
reads the outbox, matches each write against the active subscriptions with the search matcher
(``domain/search/match.py``, chains resolved as the owner sees them), queues the notifications in
``subscription_deliveries`` and removes the outbox rows in one transaction; then sends what is due.
Before each send the owner is re-authorised: their client (and user) must still exist and be
enabled with the scopes recorded, and the resource must be readable by them under today's policy.
A notification the owner may not read is withheld (audited); a revoked owner turns the subscription to
``error``. Failures are retried with exponential back-off and jitter; after ``max_attempts`` the
subscription goes to ``error`` with the reason in ``Subscription.error``. Queues survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fhirvault.domain import errors
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.instants import parse_fhir_datetime
from fhirvault.domain.scopes import Grants, narrow, parse_scopes
from fhirvault.domain.search.match import matches
from fhirvault.domain.search.query import AnyCriterion, Criterion, parse_search
from fhirvault.domain.subscription import (
    EMPTY,
    FHIR_JSON,
    Owner,
    SubscriptionSpec,
    parse_subscription,
    with_owner,
)
from fhirvault.ports import Clock, DeliveryRow, Leadership, ResourceStore, StoredVersion, WriteTx
from fhirvault.services.access import Access
from fhirvault.services.audit import AuditRecord, AuditTrail, outcome_for
from fhirvault.services.auth import Principal
from fhirvault.services.coherence import publish
from fhirvault.services.repository import ConcurrentChange, Repository, RequestContext
from fhirvault.services.subscription_settings import SubscriptionSettings
from fhirvault.services.subscriptions_http import EndpointRefused, Sent, Session, endpoint_problem

log = logging.getLogger("fhirvault.subscriptions")

SUBSCRIPTIONS = "subscriptions"  # coherence kind: a Subscription changed (key "*")
ROLE = "subscriptions"  # the cluster singleton that matches and delivers
NOTIFY, HEARTBEAT = "notify", "heartbeat"
_WANTED_STATUSES = "requested,active"
_BATCH = 256
_DUE_BATCH = 128  # notifications taken per round; their outcomes commit in one transaction
_PARALLEL = 8  # subscriptions sent to at the same time (each one's notifications stay in order)
_MAX_SUBSCRIPTIONS = 10_000
_FOREVER_S = 2**62
_OWNER_CHECK_MS = 5_000  # how often active subscriptions' owners are re-checked without a notification


@dataclass(slots=True)
class _Live:
    spec: SubscriptionSpec
    version: int
    resource: dict[str, Any]
    criteria: tuple[AnyCriterion, ...]
    last_sent_ms: int
    # Blind-index tags of the plain criteria (AND of ORs): a resource lacking every tag of one group cannot
    # match, so most subscriptions are ruled out by set lookups before the exact matcher runs.
    groups: tuple[frozenset[bytes], ...] = ()


class SubscriptionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "fhirvault_subscription_notifications", "Subscription notifications by outcome (delivered, failed: "
            "will retry, gave_up: max attempts reached, withheld: the owner may not read it, dropped)",
            ["outcome"], registry=registry)
        self.latency = Histogram("fhirvault_subscription_delivery_seconds", "Time to POST one notification",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
        self.queue = Gauge("fhirvault_subscription_queue", "Subscription work waiting (changes: writes not matched"
                           " yet, deliveries: notifications not sent yet)", ["queue"], registry=registry)
        self.active = Gauge("fhirvault_subscriptions_active", "Active subscriptions", registry=registry)


class SubscriptionService:
    def __init__(self, repository: Repository, store: ResourceStore, audit: AuditTrail, clock: Clock,
                 settings: SubscriptionSettings, metrics: SubscriptionMetrics) -> None:
        self.repository = repository
        self.store = store
        self.audit = audit
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self._wanted: bool | None = None  # cached: does the tenant have a requested or active subscription?
        self._lock = threading.Lock()

    def install(self) -> None:
        self.repository.preparers["Subscription"] = self.prepare
        self.repository.write_hooks.append(self.on_write)

    # -- request path ------------------------------------------------------------------------
    async def prepare(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """A Subscription being created or changed by a client (create, update, patch, bundles)."""
        if not self.settings.enabled:
            raise errors.unprocessable([Issue("error", "not-supported", "Subscriptions are disabled on this server.")])
        p = ctx.principal
        if p is None:
            raise errors.forbidden("A subscription needs an authenticated owner.")
        spec = parse_subscription(body, allow_http=self.settings.allow_http,
                                  min_heartbeat_s=self.settings.min_heartbeat_seconds)
        parsed = parse_search(spec.criteria_type, list(spec.criteria_params), strict=True,
                              now_ms=self.clock.now_ms())
        # The owner must be allowed to search what they subscribe to (chained and _has types too);
        # what each notification carries is decided again, resource by resource, when it is sent.
        await self.repository.authorize(ctx, spec.criteria_type, "s", "search", "Subscription")
        for criterion in parsed.criteria:
            for rtype in _types_of(criterion):
                await self.repository.authorize(ctx, rtype, "s", "search", "Subscription")
        body["status"] = "off" if body.get("status") == "off" else "requested"
        body.pop("error", None)
        with_owner(body, Owner(p.client_id, p.scope, p.user, p.patient))

    # -- write path (inside every resource write's transaction) -----------------------------
    def on_write(self, tx: WriteTx, rtype: str, rid: str, version: int) -> None:
        tenant = self.repository.tenant
        if not self.settings.enabled:
            return  # nobody would read the outbox
        if rtype == "Subscription":
            publish(tx, SUBSCRIPTIONS, {"*"}, self.forget)
            tx.add_change(tenant, rtype, rid, version, self.clock.now_ms())  # the dispatcher reloads, activates
        elif self._has_subscriptions():
            tx.add_change(tenant, rtype, rid, version, self.clock.now_ms())

    def forget(self, _keys: frozenset[str] | None = None) -> None:
        """A Subscription changed (here, or in another process: services/coherence.py)."""
        self._wanted = None

    def _has_subscriptions(self) -> bool:
        wanted = self._wanted
        if wanted is None:
            wanted = bool(self.repository.internal_find("Subscription", [("status", _WANTED_STATUSES)], limit=1))
            self._wanted = wanted
        return wanted


def _types_of(criterion: AnyCriterion) -> list[str]:
    """The other resource types a chained or _has criterion searches."""
    target = getattr(criterion, "target_type", None) or getattr(criterion, "source_type", None)
    inner = getattr(criterion, "inner", None)
    if target is None or inner is None:
        return []
    return [str(target), *_types_of(inner)]


def backoff_seconds(attempts: int, settings: SubscriptionSettings, rng: Callable[[], float] = random.random) -> float:
    """Exponential back-off after ``attempts`` failures, with jitter (between half and all of the step)."""
    step = min(settings.retry_max_seconds, settings.retry_initial_seconds * 2 ** max(0, attempts - 1))
    return float(step * (0.5 + 0.5 * rng()))


class SubscriptionDispatcher:
    """The cluster singleton: match the outbox, send due notifications, heartbeats, status changes."""

    def __init__(self, service: SubscriptionService, leadership: Leadership | None) -> None:
        self.s = service
        self._leadership = leadership
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[str, _Live] = {}
        self._loaded = False
        self._owners_checked_ms = 0
        self._owners: dict[Owner, tuple[Principal | None, str | None]] = {}
        self._finished: list[tuple[DeliveryRow, bool, AuditRecord, str]] = []
        self._statuses: dict[str, tuple[str, str | None]] = {}
        self.rounds = 0

    # -- lifecycle (services/singletons.py Startable) ---------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fhirvault-subscriptions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = await self.round()
            except Exception:
                log.exception("subscription round failed")
            if not busy:  # a full batch: more is waiting, go on at once
                await asyncio.to_thread(self._stop.wait, self.s.settings.poll_seconds)

    # -- one round ---------------------------------------------------------------------------
    async def round(self) -> bool:
        """One pass over the work; True when a batch was full (more is waiting)."""
        self._owners = {}  # owners are judged afresh every round
        if not self._loaded:
            await self._reload()
        matched = await self._match()
        now = self.s.clock.now_ms()
        await self._lifecycle(now)
        await self._heartbeats(now)
        sent = await self._send_due(now)
        changes, deliveries = await asyncio.to_thread(self.s.store.subscription_backlog)
        m = self.s.metrics
        m.queue.labels("changes").set(changes)
        m.queue.labels("deliveries").set(deliveries)
        m.active.set(sum(1 for live in self._live.values() if live.spec.status == "active"))
        self.rounds += 1
        return matched >= _BATCH or sent >= _DUE_BATCH

    async def _reload(self) -> None:
        found = await asyncio.to_thread(self.s.repository.internal_find, "Subscription", [], _MAX_SUBSCRIPTIONS)
        now = self.s.clock.now_ms()
        engine = self.s.repository.engine()
        live: dict[str, _Live] = {}
        for resource in found:
            try:
                spec = parse_subscription(resource, allow_http=True, min_heartbeat_s=1)
                criteria = parse_search(spec.criteria_type, list(spec.criteria_params), strict=True, now_ms=now).criteria
            except OperationOutcomeError:
                continue  # stored before a rule it breaks: it cannot be honoured (set to error below? keep quiet)
            before = self._live.get(spec.id)
            version = int((resource.get("meta") or {}).get("versionId") or 0)
            plain = [c for c in criteria if isinstance(c, Criterion)]
            groups = tuple(frozenset(g) for g in engine.tag_groups(spec.criteria_type, plain))
            live[spec.id] = _Live(spec, version, resource, criteria, before.last_sent_ms if before else now, groups)
        self._live = live
        self._loaded = True

    async def _match(self) -> int:
        s = self.s
        changes = await asyncio.to_thread(s.store.subscription_changes, _BATCH)
        if not changes:
            return 0
        if any(c.type == "Subscription" for c in changes):
            await self._reload()
        now = s.clock.now_ms()
        queued: list[DeliveryRow] = []
        # Each owner's access as it is now, once per batch (the matcher resolves chains as they see them).
        owners = await asyncio.to_thread(lambda: {sub_id: self._owner_principal(live)[0]
                                                  for sub_id, live in self._live.items()
                                                  if live.spec.status == "active"})
        for change in changes:
            if change.type == "Subscription" or change.tenant != s.repository.tenant:
                continue
            for sub_id in await asyncio.to_thread(self._matching, change.type, change.rid, change.version, owners):
                queued.append(DeliveryRow(0, change.tenant, sub_id, NOTIFY, change.type, change.rid, change.version,
                                          0, now, now))
        ids = [c.id for c in changes]
        role = ROLE
        leadership = self._leadership

        def job(tx: WriteTx) -> None:
            if leadership is not None:
                leadership.fence(tx, role)  # a former leader must not queue the same notifications twice
            tx.remove_changes(ids)
            for row in queued:
                tx.put_delivery(row)

        await s.store.write("subscriptions.match", job)
        return len(changes)

    def _matching(self, rtype: str, rid: str, version: int, owners: dict[str, Principal | None]) -> list[str]:
        """The active subscriptions whose criteria this version (a deletion: the version before) matches."""
        candidates = [live for live in self._live.values()
                      if live.spec.status == "active" and live.spec.criteria_type == rtype]
        if not candidates:
            return []
        found = self._content(rtype, rid, version)
        if found is None:
            return []
        _v, resource = found
        out = []
        engine = self.s.repository.engine()
        tags = frozenset(self.s.repository.index.resource_tags(rtype, resource))
        for live in candidates:
            if not all(group & tags for group in live.groups):
                continue
            principal = owners.get(live.spec.id)
            visible = self.s.repository.guard.for_principal(principal, "search") if principal else None
            if visible is None:
                continue
            try:
                resolved = engine.resolve(rtype, live.criteria, visible)
            except OperationOutcomeError:
                resolved = None  # a chain too costly to resolve: treated as no match
            if resolved is not None and all(matches(c, rtype, resource) for c in resolved):
                out.append(live.spec.id)
        return out

    def _content(self, rtype: str, rid: str, version: int) -> tuple[StoredVersion, dict[str, Any]] | None:
        """The version and its content; for a deletion, the content it removed."""
        store, tenant = self.s.store, self.s.repository.tenant
        v = store.read_version(tenant, rtype, rid, version)
        if v is None:
            return None
        shown = v
        if v.deleted:
            before = store.read_version(tenant, rtype, rid, version - 1) if version > 1 else None
            if before is None or before.deleted:
                return None
            shown = before
        return v, orjson.loads(self.s.repository.open_version(shown))

    # -- owner -------------------------------------------------------------------------------
    def _owner_principal(self, live: _Live) -> tuple[Principal | None, str | None]:
        """The owner as they are now (read once per round), or (None, why the subscription can no longer deliver)."""
        owner = live.spec.owner
        if owner is None:
            return None, "the subscription has no recorded owner"
        found = self._owners.get(owner)
        if found is None:
            found = self._owners[owner] = self._owner_now(owner)
        return found

    def _owner_now(self, owner: Owner) -> tuple[Principal | None, str | None]:
        store = self.s.store
        client = store.client(owner.client_id)
        if client is None or client.disabled:
            return None, "the owner's client was disabled or removed"
        recorded = parse_scopes(owner.scope, strict=False)
        if set(narrow(recorded, parse_scopes(client.scopes, strict=False))) != set(recorded):
            return None, "the owner's client no longer has the scopes the subscription was created with"
        role = fhir_user = organization = None
        clearances: frozenset[str] = frozenset()
        if owner.user is not None:
            user = store.user(owner.user)
            if user is None or user.disabled:
                return None, "the owner's user account was disabled or removed"
            role, fhir_user, organization = user.role, user.fhir_user, user.organization
            clearances = frozenset(user.clearances.split())
        return Principal(client_id=owner.client_id, tenant=self.s.repository.tenant, scope=owner.scope,
                         grants=Grants(tuple(recorded)), expires_at=_FOREVER_S, token_id=f"subscription-owner:{owner.client_id}",
                         user=owner.user, role=role, fhir_user=fhir_user, patient=owner.patient,
                         organization=organization, clearances=clearances), None

    @staticmethod
    def _may_read(access: Access, v: StoredVersion, resource: dict[str, Any]) -> bool:
        if not access.type_level(v.type, "r").allowed:
            return False
        return access.simple or access.version(v, resource, "r").allowed

    # -- status ------------------------------------------------------------------------------
    async def _set_status(self, sub_id: str, status: str, error: str | None) -> None:
        s = self.s
        current = await asyncio.to_thread(s.store.read_current, s.repository.tenant, "Subscription", sub_id)
        if current is None or current.deleted:
            return
        body = orjson.loads(s.repository.open_version(current))
        if body.get("status") == status and body.get("error") == error:
            return
        body["status"] = status
        if error is None:
            body.pop("error", None)
        else:
            body["error"] = error
        try:
            await s.repository.server_update("Subscription", sub_id, body, current.version,
                                             f"subscription status set to {status} by the server")
        except ConcurrentChange:
            return  # changed by its owner meanwhile: judged again from the new version
        log.info("subscription status changed", extra={"subscription": sub_id, "status": status})
        live = self._live.get(sub_id)
        if live is not None:
            live.spec = replace(live.spec, status=status)

    async def _lifecycle(self, now: int) -> None:
        """requested → active once the endpoint passes the policy (else error); active → off at ``end``;
        active → error when the owner lost their access (checked every few seconds)."""
        settings = self.s.settings
        check_owners = now - self._owners_checked_ms >= _OWNER_CHECK_MS
        if check_owners:
            self._owners_checked_ms = now
        for live in list(self._live.values()):
            spec = live.spec
            if check_owners and spec.status == "active":
                problem = (await asyncio.to_thread(self._owner_principal, live))[1]
                if problem is not None:
                    await self._set_status(spec.id, "error", problem)
                    continue
            if spec.status in ("requested", "active") and spec.end is not None:
                end_ms = _instant_ms(spec.end)
                if end_ms is not None and end_ms <= now:
                    await self._set_status(spec.id, "off", None)
                    continue
            if spec.status != "requested":
                continue
            problem = await asyncio.to_thread(endpoint_problem, spec.endpoint, allow_http=settings.allow_http,
                                              allowed=settings.allowed_networks)
            if problem is None:
                problem = self._owner_principal(live)[1]
            await self._set_status(spec.id, "error" if problem else "active", problem)

    async def _heartbeats(self, now: int) -> None:
        due = [live for live in self._live.values() if live.spec.status == "active" and live.spec.heartbeat_s
               and now - live.last_sent_ms >= live.spec.heartbeat_s * 1000]
        if not due:
            return
        tenant = self.s.repository.tenant
        rows = [DeliveryRow(0, tenant, live.spec.id, HEARTBEAT, "", "", 0, 0, now, now) for live in due]
        for live in due:
            live.last_sent_ms = now

        def job(tx: WriteTx) -> None:
            for row in rows:
                tx.put_delivery(row)

        await self.s.store.write("subscriptions.heartbeat", job)

    # -- delivery ----------------------------------------------------------------------------
    async def _send_due(self, now: int) -> int:
        """Send what is due: each subscription's notifications in order, up to ``_PARALLEL`` subscriptions at
        a time; their outcomes (queue changes and audit entries) commit together afterwards."""
        due = await asyncio.to_thread(self.s.store.due_deliveries, now, _DUE_BATCH)
        if not due:
            return 0
        by_subscription: dict[str, list[DeliveryRow]] = {}
        for row in due:
            by_subscription.setdefault(row.subscription_id, []).append(row)
        gate = asyncio.Semaphore(_PARALLEL)

        async def one_subscription(rows: list[DeliveryRow]) -> None:
            session: list[Session] = []  # opened by the first notification that is sent
            async with gate:
                try:
                    for row in rows:
                        if self._stop.is_set() or not await self._deliver(row, session):
                            return
                finally:
                    for one in session:
                        one.close()

        await asyncio.gather(*(one_subscription(rows) for rows in by_subscription.values()))
        await self._flush()
        return len(due)

    async def _flush(self) -> None:
        s = self.s
        finished, self._finished = self._finished, []
        statuses, self._statuses = self._statuses, {}
        if finished:
            def job(tx: WriteTx) -> None:
                for row, keep, record, _outcome in finished:
                    if keep:
                        tx.put_delivery(row)
                    else:
                        tx.remove_delivery(row.id)
                    s.audit.record(tx, record)

            await s.store.write("subscriptions.delivery", job)
            for row, _keep, _record, outcome in finished:
                s.metrics.notifications.labels(outcome).inc()
                log.info("subscription notification", extra={"subscription": row.subscription_id, "kind": row.kind,
                                                              "outcome": outcome, "attempt": row.attempts})
        for sub_id, (status, error) in statuses.items():
            await self._set_status(sub_id, status, error)

    def _later(self, live: _Live, status: str, error: str | None) -> None:
        """Change the status once this batch's outcomes are committed; stop sending for it now."""
        self._statuses[live.spec.id] = (status, error)
        live.spec = replace(live.spec, status=status)

    async def _deliver(self, row: DeliveryRow, session: list[Session]) -> bool:
        """Send one notification (or drop it); False when the endpoint failed: the subscription's other
        notifications wait for the next round instead of each waiting for a timeout now."""
        s = self.s
        live = self._live.get(row.subscription_id)
        if live is None or live.spec.status != "active":
            self._finish(row, None, "dropped", "not delivered: the subscription is not active")
            return True
        principal, problem = self._owner_principal(live)
        if principal is None:
            self._finish(row, live, "dropped", f"not delivered: {problem}")
            self._later(live, "error", problem)
            return True
        body: bytes | None = None
        v: StoredVersion | None = None
        if row.kind == NOTIFY:
            found = await asyncio.to_thread(self._content, row.type, row.rid, row.version)
            if found is None:
                self._finish(row, live, "dropped", "not delivered: the version is gone")
                return True
            v, resource = found
            access = s.repository.guard.for_principal(principal, "read")
            if not await asyncio.to_thread(self._readable, access, v, resource, row):
                self._finish(row, live, "withheld", "not delivered: the owner may not read this resource")
                return True
            if live.spec.content != EMPTY and not v.deleted:
                body = orjson.dumps(resource)
        headers = [*live.spec.headers]
        if body is not None:
            headers.append(("Content-Type", FHIR_JSON + "; charset=utf-8"))
        try:
            if not session:
                session.append(Session(live.spec.endpoint, allow_http=s.settings.allow_http,
                                       allowed=s.settings.allowed_networks, timeout=s.settings.timeout_seconds))
            sent = await asyncio.to_thread(session[0].post, headers, body)
        except EndpointRefused as exc:
            sent = Sent(None, str(exc), 0.0)
            row = replace(row, attempts=s.settings.max_attempts - 1)  # a policy refusal does not heal by retrying
        s.metrics.latency.observe(sent.seconds)
        if sent.ok:
            live.last_sent_ms = s.clock.now_ms()
            self._finish(row, live, "delivered", "delivered", status=sent.status or 200, v=v)
            return True
        attempts = row.attempts + 1
        if attempts >= s.settings.max_attempts:
            reason = f"notification failed {attempts} times; last: {sent.error}"
            self._finish(row, live, "gave_up", reason, status=sent.status or 502, v=v)
            self._later(live, "error", reason)
            return True
        due = s.clock.now_ms() + int(backoff_seconds(attempts, s.settings) * 1000)
        self._finish(replace(row, attempts=attempts, due_ms=due), live, "failed",
                           f"failed (attempt {attempts} of {s.settings.max_attempts}): {sent.error}",
                           status=sent.status or 502, v=v, keep=True)
        return False

    def _readable(self, access: Access, v: StoredVersion, resource: dict[str, Any], row: DeliveryRow) -> bool:
        shown = v
        if v.deleted:  # judged on what was deleted, filed under the same compartment
            before = self.s.store.read_version(self.s.repository.tenant, row.type, row.rid, row.version - 1)
            if before is None:
                return False
            shown = before
        return self._may_read(access, shown, resource)

    def _finish(self, row: DeliveryRow, live: _Live | None, outcome: str, detail: str, *, status: int = 200,
                v: StoredVersion | None = None, keep: bool = False) -> None:
        """Remove (or re-queue) the notification and record its audit entry (committed by ``_flush``)."""
        s = self.s
        owner = live.spec.owner if live is not None else None
        entity = f"{row.type}/{row.rid}/_history/{row.version}" if row.kind == NOTIFY else f"Subscription/{row.subscription_id}"
        patient = s.repository.guard.patient_of_key(v.key_id) if v is not None and v.key_id else None
        record = AuditRecord(
            ts_ms=s.clock.now_ms(), interaction="subscription-notify",
            outcome=outcome_for(status if outcome != "withheld" else 403), status=status if outcome != "withheld" else 403,
            request_id=f"subscription:{row.subscription_id}", client_id=owner.client_id if owner else None,
            entity=entity, patient=f"Patient/{patient}" if patient else None,
            detail=f"{row.kind} {outcome}: {detail}", user=owner.user if owner else None, category="system")

        self._finished.append((row, keep, record, outcome))


def _instant_ms(value: str) -> int | None:
    with contextlib.suppress(ValueError, TypeError):
        return parse_fhir_datetime(value)
    return None


__all__ = ["HEARTBEAT", "NOTIFY", "ROLE", "SUBSCRIPTIONS", "SubscriptionDispatcher", "SubscriptionMetrics",
           "SubscriptionService", "backoff_seconds"]
