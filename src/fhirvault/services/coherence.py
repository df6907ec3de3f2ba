"""Per-process caches kept correct when several server processes share one database.

Each worker process caches facts read from the database: revoked token ids, the
patients a practitioner reaches (relationships), consents, break-the-glass grants.
A write that changes one of them calls ``tx.invalidate(kind, key)``; the store
publishes those rows in the same transaction (``coherence_log``, numbered in commit
order; on PostgreSQL and on SQLite alike). ``Coherence.sync`` runs at the start of every authenticated request:
one indexed query (``seq > last seen``, joined to a one-row head), and when something
changed, the handler of each kind drops what it cached. So a change acknowledged to
a client applies on every worker from that worker's next request on.

The writing process also invalidates its own caches at once with ``on_commit``
callbacks; a store without a feed (the in-memory one of the tests) has only those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fhirvault.ports import ChangeFeed, WriteTx

REVOCATIONS = "revocations"  # revoked_jtis gained rows: read them now
RELATIONSHIPS = "relationships"  # keys: "ref:Practitioner/1", "patient:123" (consents), "*"
BREAK_GLASS = "break-glass"  # key: the user id whose grants changed

# Called with the keys published for its kind, or None: anything of that kind may have changed.
Handler = Callable[[frozenset[str] | None], None]


class Coherence:
    def __init__(self, feed: ChangeFeed | None) -> None:
        self._feed = feed
        self._handlers: dict[str, list[Handler]] = {}
        self._seen: int | None = None
        self._lock = threading.Lock()
        self.applied = 0  # syncs that found changes (tests, metrics)

    @property
    def shared(self) -> bool:
        """True when other processes may write the database this process caches."""
        return self._feed is not None

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def sync(self) -> None:
        """Apply what other processes changed since the last call (one query when nothing did)."""
        if self._feed is None:
            return
        with self._lock:
            head, rows = self._feed.changes_since(self._seen)
            if head == self._seen:
                return
            if rows is None:  # first call, or too far behind: everything may have changed
                for handlers in self._handlers.values():
                    for handler in handlers:
                        handler(None)
            else:
                by_kind: dict[str, set[str]] = {}
                for kind, key in rows:
                    by_kind.setdefault(kind, set()).add(key)
                for kind, keys in by_kind.items():
                    for handler in self._handlers.get(kind, ()):
                        handler(frozenset(keys))
            self._seen = head  # only once every handler ran: a failure retries at the next request
            self.applied += 1


def publish(tx: WriteTx, kind: str, keys: set[str] | frozenset[str], local: Callable[[], None]) -> None:
    """Invalidate at COMMIT: here with ``local`` (on_commit), in the other processes through the feed."""
    tx.on_commit(local)
    for key in sorted(keys):
        tx.invalidate(kind, key)


__all__ = ["BREAK_GLASS", "RELATIONSHIPS", "REVOCATIONS", "Coherence", "Handler", "publish"]
