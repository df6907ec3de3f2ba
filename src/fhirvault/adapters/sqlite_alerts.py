"""AlertStore on its own SQLite file, and an in-memory AlertStore for tests.

Alerts carry no PHI (actor ids, source addresses, counts, rule names), so
they are stored in clear, apart from the encrypted resource store: alerting
keeps working when the main store is the thing in trouble, and the file can
be read by an operator without keys. WAL and ``synchronous=FULL`` make an
acknowledged operator action survive a crash. The file is created 0600.
"""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from fhirvault.adapters.files import create_private
from fhirvault.services.alert_settings import SEVERITY_RANK
from fhirvault.services.alerts import CLOSED, Alert

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    severity_rank INTEGER NOT NULL,
    summary TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    state TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    labels BLOB NOT NULL,
    notified_ms INTEGER NOT NULL,
    updated_by TEXT,
    note TEXT
);
CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts(state, last_ms);
CREATE INDEX IF NOT EXISTS alerts_by_last ON alerts(last_ms);
"""
_COLUMNS = "id, rule, severity, summary, dedup_key, state, first_ms, last_ms, count, labels, notified_ms, updated_by, note"
_SELECT = f"SELECT {_COLUMNS} FROM alerts"  # noqa: S608 (constant)
_UPSERT = (
    f"INSERT OR REPLACE INTO alerts ({_COLUMNS}, severity_rank) "  # noqa: S608 (constant)
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(alert: Alert) -> tuple[Any, ...]:
    return (alert.id, alert.rule, alert.severity, alert.summary, alert.dedup_key, alert.state, alert.first_ms,
            alert.last_ms, alert.count, orjson.dumps(alert.labels), alert.notified_ms, alert.updated_by,
            alert.note, SEVERITY_RANK[alert.severity])


def _alert(row: tuple[Any, ...]) -> Alert:
    labels = orjson.loads(row[9])
    return Alert(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                 {str(k): str(v) for k, v in labels.items()}, row[10], row[11], row[12])


class SqliteAlertStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        create_private(path)
        self._lock = threading.Lock()  # one connection, shared by the writer thread and API callers
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def save_many(self, alerts: Iterable[Alert]) -> None:
        rows = [_row(a) for a in alerts]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_UPSERT, rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def get(self, alert_id: str) -> Alert | None:
        with self._lock:
            row = self._conn.execute(f"{_SELECT} WHERE id = ?", (alert_id,)).fetchone()
        return _alert(row) if row else None

    def list(self, *, state: str | None = None, rule: str | None = None, min_severity: str | None = None,
             since_ms: int | None = None, limit: int = 100) -> builtins.list[Alert]:
        where: list[str] = []
        args: list[Any] = []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if rule is not None:
            where.append("rule = ?")
            args.append(rule)
        if min_severity is not None:
            where.append("severity_rank >= ?")
            args.append(SEVERITY_RANK[min_severity])
        if since_ms is not None:
            where.append("last_ms >= ?")
            args.append(since_ms)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY last_ms DESC, id LIMIT ?"
        args.append(max(0, limit))
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [_alert(r) for r in rows]

    def active(self) -> builtins.list[Alert]:
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE state != ?", (CLOSED,)).fetchall()
        return [_alert(r) for r in rows]

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()


class MemoryAlertStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alerts: dict[str, Alert] = {}

    def save_many(self, alerts: Iterable[Alert]) -> None:
        with self._lock:
            for alert in alerts:
                self._alerts[alert.id] = alert

    def get(self, alert_id: str) -> Alert | None:
        with self._lock:
            return self._alerts.get(alert_id)

    def list(self, *, state: str | None = None, rule: str | None = None, min_severity: str | None = None,
             since_ms: int | None = None, limit: int = 100) -> builtins.list[Alert]:
        floor = SEVERITY_RANK[min_severity] if min_severity is not None else 0
        with self._lock:
            found = [a for a in self._alerts.values()
                     if (state is None or a.state == state) and (rule is None or a.rule == rule)
                     and SEVERITY_RANK[a.severity] >= floor and (since_ms is None or a.last_ms >= since_ms)]
        found.sort(key=lambda a: (-a.last_ms, a.id))
        return found[:max(0, limit)]

    def active(self) -> builtins.list[Alert]:
        with self._lock:
            return [a for a in self._alerts.values() if a.state != CLOSED]

    def close(self) -> None:
        pass

