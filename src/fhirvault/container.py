"""The one place where adapters are chosen from settings and wired into services."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from fhirvault.adapters.alert_sinks import build_sinks
from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_alerts import SqliteAlertStore
from fhirvault.adapters.sqlite_store import SqliteMigrator, SqliteStore
from fhirvault.adapters.witness import open_witness
from fhirvault.backup import erasure_ledger
from fhirvault.config import Settings
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import resource_types
from fhirvault.domain.validation import Validator
from fhirvault.ports import ChangeFeed, Clock, Leadership, ResourceStore, SchemaMigrator, WriteTx
from fhirvault.services.alert_settings import AlertSettings
from fhirvault.services.alerts import AlertService
from fhirvault.services.audit import AuditTrail
from fhirvault.services.audit_checkpoints import (
    SIGNING_SECRET,
    AuditCheckpointer,
    CheckpointSigner,
    origin_for,
)
from fhirvault.services.audit_query import AuditReader
from fhirvault.services.auth import AuthService
from fhirvault.services.coherence import BREAK_GLASS, RELATIONSHIPS, REVOCATIONS, Coherence
from fhirvault.services.detection import DetectionEngine
from fhirvault.services.erasure import DATA_KEYS, LIFECYCLE, Lifecycle, apply_ledger
from fhirvault.services.health import HealthState
from fhirvault.services.keys import AUDIT_COMPARTMENT, KeyError_, KeyRing
from fhirvault.services.metrics import Metrics
from fhirvault.services.repository import Repository
from fhirvault.services.search_index import SearchIndex
from fhirvault.services.secrets import ServiceSecrets
from fhirvault.services.subscription_settings import SubscriptionSettings
from fhirvault.services.subscriptions import SUBSCRIPTIONS, SubscriptionMetrics, SubscriptionService

if TYPE_CHECKING:
    from fhirvault.backup.ports import CatalogReader, ChangeFeedSource, RestoreSink, SnapshotSource
    from fhirvault.services.bulk_export import BulkExportService

INSTANCE_META = "instance-id"


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SoleProcess:
    """Leadership for a store only one process uses (the in-memory store): always the leader."""

    def lead(self, role: str) -> bool:
        return True

    def fence(self, tx: WriteTx, role: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Container:
    settings: Settings
    clock: Clock
    store: ResourceStore
    root: KeyFileProvider
    keys: KeyRing
    auth: AuthService
    audit: AuditTrail
    repository: Repository
    validator: Validator
    health: HealthState
    secrets: ServiceSecrets
    audit_signer: CheckpointSigner
    checkpointer: AuditCheckpointer
    metrics: Metrics
    audit_reader: AuditReader
    alerts: AlertService | None = None
    detection: DetectionEngine | None = None
    leadership: Leadership | None = None
    coherence: Coherence | None = None
    bulk_export: BulkExportService | None = None  # set by the server (web/app.py)
    lifecycle: Lifecycle | None = None
    subscriptions: SubscriptionService | None = None
    _checkpointing: bool = False

    def enable_alerting(self) -> DetectionEngine:
        """Real-time detection over the audit stream, alerts stored in alerts.sqlite3 and sent to the sinks.

        Only the server does this (it starts delivery threads); one-shot CLI commands do not."""
        if self.detection is not None:
            return self.detection
        a = self.settings.alerts or AlertSettings.default(self.settings.data_dir)
        alerts = AlertService(SqliteAlertStore(self.settings.data_dir / "alerts.sqlite3"), build_sinks(a.sinks),
                              self.clock, renotify_seconds=a.renotify_seconds, queue_size=a.queue_size,
                              retry_attempts=a.retry_attempts, retry_initial_seconds=a.retry_initial_seconds,
                              retry_max_seconds=a.retry_max_seconds)
        detection = DetectionEngine(a.detection, alerts, self.clock)
        metrics = self.metrics
        alerts.on_fired(lambda alert: metrics.alert_fired(alert.rule, alert.severity))
        self.audit.observers.append(detection.observe)
        self.alerts, self.detection = alerts, detection
        return detection

    def start_checkpoints(self) -> None:
        """Sign audit checkpoints in the background (the server does; one-shot CLI commands do not)."""
        if not self._checkpointing:
            self._checkpointing = True
            self.checkpointer.start()

    def close(self) -> None:
        if self._checkpointing:
            self._checkpointing = False
            self.checkpointer.stop()  # a final checkpoint, sent to the witnesses
        if self.alerts is not None:
            self.alerts.close(timeout=5.0)
        if self.leadership is not None:
            self.leadership.close()
        self.store.close()


def open_store(settings: Settings) -> ResourceStore:
    """SQLite files in the data directory, or the PostgreSQL database of ``database_url``."""
    if settings.database_url is not None:
        from fhirvault.adapters.postgres_store import PostgresStore  # psycopg only when it is used

        # Continuous replication reads versions above a watermark, so they must commit in seq order:
        # one writer session (config.py refuses it with several worker processes).
        replicating = settings.backup is not None and bool(settings.backup.replicate_to)
        return PostgresStore(settings.database_url, writers=1) if replicating else PostgresStore(settings.database_url)
    return SqliteStore(settings.database_path, settings.audit_database_path)


def _serving_lock_path(settings: Settings) -> Path:
    return settings.database_path.with_name(settings.database_path.name + ".serving.lock")


def hold_serving(settings: Settings) -> object | None:
    """Mark this process as serving the data directory until it exits (SQLite; see cli/live.py). Returns
    the hold (keep a reference), or None on PostgreSQL, whose server arbitrates concurrent sessions itself."""
    if settings.database_url is not None:
        return None
    from fhirvault.adapters.sqlite_locks import ServingLock

    return ServingLock(_serving_lock_path(settings))


def server_running(settings: Settings) -> bool:
    """Whether a ``fhirvault serve`` process serves this SQLite data directory now (False on PostgreSQL)."""
    if settings.database_url is not None:
        return False
    from fhirvault.adapters.sqlite_locks import ServingLock

    return ServingLock.serving(_serving_lock_path(settings))


def alert_store(settings: Settings) -> SqliteAlertStore:
    """The alerts of a data directory, for one-shot tools (the server's AlertService owns it while serving)."""
    return SqliteAlertStore(settings.data_dir / "alerts.sqlite3")


def schema_migrator(settings: Settings) -> SchemaMigrator:
    """The numbered schema migrations of the configured engine (opening a store also applies them)."""
    if settings.database_url is not None:
        from fhirvault.adapters.postgres_store import PostgresMigrator

        return PostgresMigrator(settings.database_url)
    return SqliteMigrator(settings.database_path, settings.audit_database_path)


def leadership_for(store: ResourceStore) -> Leadership:
    """Who runs the cluster singletons: several processes may share the database."""
    make: Callable[[], Leadership] | None = getattr(store, "leadership", None)  # PostgreSQL, SQLite
    return make() if make is not None else SoleProcess()


def change_feed_for(store: ResourceStore) -> ChangeFeed | None:
    """What other processes change in the database; None when this process is the only one (memory store)."""
    return store if hasattr(store, "changes_since") else None  # type: ignore[return-value]  # PostgreSQL, SQLite


def coherence_for(store: ResourceStore, auth: AuthService, repository: Repository) -> Coherence:
    """Every per-process cache of shared facts, invalidated by the other processes' writes."""
    coherence = Coherence(change_feed_for(store))
    coherence.on(REVOCATIONS, lambda _keys: auth.poll_revocations())
    coherence.on(RELATIONSHIPS, repository.relationships.invalidate_keys)
    glass = repository.break_glass

    def grants_changed(users: frozenset[str] | None) -> None:
        if users is None:
            glass.forget_all()
        else:
            for user in users:
                glass.forget(user)

    coherence.on(BREAK_GLASS, grants_changed)
    auth.before_check = coherence.sync
    return coherence


def instance_id(store: ResourceStore) -> str:
    instance = store.get_meta(INSTANCE_META)
    if instance is None:
        raise RuntimeError("this data directory was not initialised; run 'fhirvault init'")
    return instance.decode()


def issuer_for(store: ResourceStore) -> str:
    return "urn:fhirvault:" + instance_id(store)


def audit_signer_for(store: ResourceStore, secrets: ServiceSecrets) -> CheckpointSigner:
    return CheckpointSigner(origin_for(instance_id(store)), secrets.get(SIGNING_SECRET))


def build(settings: Settings, clock: Clock | None = None) -> Container:
    clock = clock or SystemClock()
    root = KeyFileProvider.load(settings.root_key_path)
    store = open_store(settings)
    try:
        keys = KeyRing(store, root, settings.tenant, clock)
        reapply_erasures(settings, store, clock)
        keys.load()
        audit = AuditTrail(settings.tenant, keys.for_compartment_sync(AUDIT_COMPARTMENT),
                           keys.index_subkey("audit-index"), hash_source_ips=settings.audit_hash_source_ips)
        auth = AuthService(store, root, clock, issuer=issuer_for(store), tenant=settings.tenant,
                           token_ttl_seconds=settings.token_ttl_seconds)
        validator = Validator.default()
        repository = Repository(store, keys, audit, validator, clock, SearchIndex(keys), tenant=settings.tenant,
                                allow_unknown_elements=settings.validation == "lenient",
                                break_glass_hours=settings.break_glass_hours, relationships=settings.access)
        secrets = ServiceSecrets(store, root)
        signer = audit_signer_for(store, secrets)
        audit_reader = AuditReader.over_store(store, audit, repository, clock, server_id=issuer_for(store),
                                              show_names=settings.access_history_show_names, push_patients=True)
        witnesses = [open_witness(spec) for spec in settings.audit_witness_specs]
        leadership = leadership_for(store)
        coherence = coherence_for(store, auth, repository)
        metrics = Metrics()
        # Every process adds committed writes to the subscription outbox; one delivers (web/app.py).
        subscriptions = SubscriptionService(repository, store, audit, clock,
                                            settings.subscriptions or SubscriptionSettings(),
                                            SubscriptionMetrics(metrics.registry))
        subscriptions.install()
        coherence.on(SUBSCRIPTIONS, subscriptions.forget)
        checkpointer = AuditCheckpointer(store, signer, clock, witnesses,
                                         checkpoint_interval_s=settings.audit_checkpoint_seconds,
                                         witness_interval_s=settings.audit_witness_seconds, leadership=leadership)
        lifecycle = Lifecycle(store, keys, audit, clock, tenant=settings.tenant, rules=settings.retention,
                              open_version=repository.open_version,
                              after_erasure=after_erasure(settings, store, secrets))
        repository.lifecycle = lifecycle
        coherence.on(DATA_KEYS, keys.forget_keys)
        coherence.on(LIFECYCLE, lifecycle.forget_restrictions)  # a restriction set by another process  # a key another process erased leaves this one's caches
    except BaseException:
        store.close()
        raise
    return Container(settings, clock, store, root, keys, auth, audit, repository, validator, HealthState(),
                     secrets, signer, checkpointer, metrics, audit_reader, leadership=leadership, coherence=coherence,
                     subscriptions=subscriptions, lifecycle=lifecycle)


class TenantPurged(KeyError_):
    """The erasure ledger says this tenant was purged: its data directory never serves again."""


def reapply_erasures(settings: Settings, store: ResourceStore, clock: Clock) -> None:
    """Before anything reads the database: destroy again every key the erasure ledger lists (a restored
    backup still holds them; backup/erasure_ledger.py)."""
    entries = erasure_ledger.read_file(settings.data_dir) | erasure_ledger.decode(
        store.get_meta(erasure_ledger.LEDGER_META))
    if not entries:
        return
    destroyed, purged = apply_ledger(store, settings.tenant, entries, clock.now_ms())
    if destroyed or purged:
        scrub_store(store)
        erasure_ledger.write_file(settings.data_dir, entries)
    if purged:
        when = erasure_ledger.purged(entries, settings.tenant)
        at = instant(when.erased_ms) if when else "?"
        raise TenantPurged(f"tenant '{settings.tenant}' was purged on {at} (erasure ledger): this data can no"
                           " longer be read; see its deletion certificate")


def scrub_store(store: ResourceStore) -> None:
    """After keys were destroyed: push freed pages out of the engine's logs where it can (SQLite: checkpoint
    and truncate the WAL; secure_delete already zeroes freed cells)."""
    scrub: Callable[[], None] | None = getattr(store, "scrub", None)
    if scrub is not None:
        scrub()


def after_erasure(settings: Settings, store: ResourceStore,
                  secrets: ServiceSecrets) -> Callable[[set[erasure_ledger.Entry]], None]:
    """What follows a committed erasure: the ledger's file and target copies, the scrub of the files."""

    def run(entries: set[erasure_ledger.Entry]) -> None:
        everything = entries | erasure_ledger.read_file(settings.data_dir)
        erasure_ledger.write_file(settings.data_dir, everything)
        scrub_store(store)
        publish_ledger(settings, secrets, everything)

    return run


def publish_ledger(settings: Settings, secrets: ServiceSecrets, entries: set[erasure_ledger.Entry]) -> list[str]:
    """Put the signed ledger on every configured backup target; returns the targets that failed."""
    backup = settings.backup
    if backup is None or not backup.targets:
        return []
    from fhirvault.backup.manifest import BackupKeys
    from fhirvault.backup.targets import open_target

    keys = BackupKeys(secrets.get("backup"), secrets.get("backup-signing"))
    failed: list[str] = []
    for name in backup.targets:
        try:
            erasure_ledger.publish(open_target(name, backup), entries, keys.signer, keys.public_key_hex)
        except Exception:
            failed.append(name)
    return failed


def capability_bytes(base_url: str, token_url: str, clock: Clock, *, subscriptions: bool = True) -> bytes:
    from fhirvault.fhir.capability import capability_statement

    doc = capability_statement(sorted(resource_types()), base_url=base_url, token_url=token_url,
                               published_ms_instant=instant(clock.now_ms()), subscriptions=subscriptions)
    return orjson.dumps(doc)


# -- backup ports (fhirvault.backup.ports): the engine behind backups, replication, restore and drills ---------
# A Path is a data directory as found on disk; Settings also say which engine holds its tables. The
# PostgreSQL adapters are imported only when used (psycopg).
def _data_dir(where: Settings | Path) -> Path:
    return where.data_dir if isinstance(where, Settings) else where


def _database_url(where: Settings | Path) -> str | None:
    return where.database_url if isinstance(where, Settings) else None


def snapshot_source(where: Settings | Path) -> SnapshotSource:
    if (url := _database_url(where)) is not None:
        from fhirvault.adapters.postgres_backup import PostgresSnapshotSource

        return PostgresSnapshotSource(url, _data_dir(where))
    from fhirvault.adapters.sqlite_backup import SqliteSnapshotSource

    return SqliteSnapshotSource(_data_dir(where))


def catalog_reader(where: Settings | Path) -> CatalogReader:
    if (url := _database_url(where)) is not None:
        from fhirvault.adapters.postgres_backup import PostgresSnapshotSource

        return PostgresSnapshotSource(url)
    from fhirvault.adapters.sqlite_backup import SqliteSnapshotSource

    return SqliteSnapshotSource(_data_dir(where))


def change_feed_source(where: Settings | Path) -> ChangeFeedSource:
    if (url := _database_url(where)) is not None:
        from fhirvault.adapters.postgres_backup import PostgresChangeFeed

        return PostgresChangeFeed(url)
    from fhirvault.adapters.sqlite_backup import SqliteChangeFeed

    return SqliteChangeFeed(_data_dir(where))


def delta_feed_source(where: Settings | Path) -> ChangeFeedSource | None:
    """The feed incremental backups are taken from (backup/chain.py), or None: deltas need commits ordered
    like their keys, which SQLite's single writer gives; PostgreSQL with several workers does not."""
    if _database_url(where) is not None:
        return None
    return change_feed_source(where)


def scratch_database(server_url: str, *, keep: bool = False) -> AbstractContextManager[str]:
    """A new, empty PostgreSQL database on the server of ``server_url`` for the drill, dropped afterwards."""
    from fhirvault.adapters.postgres_backup import scratch_database as scratch

    return scratch(server_url, keep=keep)


def restore_sink(data_dir: Path, database_url: str | None = None) -> RestoreSink:
    """The data directory a restore is rebuilding; with ``database_url``, the empty PostgreSQL database that
    receives its tables."""
    if database_url is not None:
        from fhirvault.adapters.postgres_backup import PostgresRestoreSink

        return PostgresRestoreSink(data_dir, database_url)
    from fhirvault.adapters.sqlite_backup import SqliteRestoreSink

    return SqliteRestoreSink(data_dir)
