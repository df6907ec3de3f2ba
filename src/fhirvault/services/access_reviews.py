"""Access reviews: periodic recertification of the people and clients that may reach the data.

A *campaign* (name, due date) takes a snapshot of every user account and OAuth client of the
tenant: role or scopes, disabled or not, last use (the newest successful audit record naming
it). A reviewer then decides *keep* or *revoke* for each, with a reason; the console applies a
revoke (the account or client is disabled) and writes every decision to the audit trail.

Campaigns are small JSON documents in the store's ``meta`` table (both engines, backed up and
replicated with the rest); they hold account ids, names and roles, never patient data.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from fhirvault.ports import Clock, ResourceStore, WriteTx
from fhirvault.services.audit import AuditTrail

KEEP, REVOKE = "keep", "revoke"
DECISIONS = (KEEP, REVOKE)
USER, CLIENT = "user", "client"
OPEN, CLOSED = "open", "closed"
_PREFIX = "access-review:"
_INDEX = _PREFIX + "index"
MAX_CAMPAIGNS = 200  # the index keeps the newest; older campaigns stay in the audit trail
LAST_USE_SCAN = 100_000  # newest audit entries read to find last uses


class ReviewError(ValueError):
    """A refused review action; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class Item:
    kind: str  # user | client
    subject: str  # user id (u-…) or client id (fv-…)
    label: str  # username or client name
    access: str  # role, or scopes
    disabled: bool
    last_used_ms: int | None
    decision: str | None = None
    reason: str | None = None
    decided_by: str | None = None
    decided_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Campaign:
    campaign_id: str
    name: str
    created_ms: int
    due_ms: int
    created_by: str
    items: tuple[Item, ...] = field(default_factory=tuple)

    @property
    def pending(self) -> int:
        return sum(1 for i in self.items if i.decision is None)

    @property
    def status(self) -> str:
        return CLOSED if self.items and self.pending == 0 else OPEN

    def overdue(self, now_ms: int) -> bool:
        return self.status == OPEN and now_ms > self.due_ms

    def to_json(self) -> bytes:
        doc = asdict(self)
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes) -> Campaign:
        doc = orjson.loads(raw)
        items = tuple(Item(**i) for i in doc.pop("items"))
        return cls(**doc, items=items)


def last_uses(store: ResourceStore, audit: AuditTrail, tenant: str, scan: int = LAST_USE_SCAN) -> dict[str, int]:
    """``{"user:u-…" | "client:fv-…": newest ms}`` from the newest ``scan`` audit entries (successes only)."""
    found: dict[str, int] = {}
    after = max(0, store.audit_size() - scan)
    while True:
        chunk = store.audit_entries(tenant, after, 1000)
        if not chunk:
            return found
        for seq, ts, blob in chunk:
            after = seq
            try:
                record = audit.decrypt(seq, ts, blob)
            except Exception:  # noqa: S112 (verification reports a damaged entry; a review skips it)
                continue
            if int(record.get("status", 500)) >= 400:
                continue
            for kind, name in ((USER, "user"), (CLIENT, "client_id")):
                value = record.get(name)
                if isinstance(value, str):
                    found[f"{kind}:{value}"] = max(found.get(f"{kind}:{value}", 0), ts)


class AccessReviews:
    def __init__(self, store: ResourceStore, clock: Clock, *, tenant: str) -> None:
        self._store = store
        self._clock = clock
        self._tenant = tenant

    def _name(self, campaign_id: str) -> str:
        return f"{_PREFIX}{self._tenant}:{campaign_id}"

    def _index_name(self) -> str:
        return f"{_INDEX}:{self._tenant}"

    def campaigns(self) -> list[Campaign]:
        """Newest first."""
        raw = self._store.get_meta(self._index_name())
        ids: list[str] = orjson.loads(raw) if raw else []
        found = [c for i in reversed(ids) if (c := self.get(i)) is not None]
        return found

    def get(self, campaign_id: str) -> Campaign | None:
        if not campaign_id.isalnum() or len(campaign_id) > 40:
            return None
        raw = self._store.get_meta(self._name(campaign_id))
        return Campaign.from_json(raw) if raw else None

    def open_campaign(self, name: str, due_ms: int, actor: str, last_used: Mapping[str, int]) -> Campaign:
        name = name.strip()
        if not 1 <= len(name) <= 120:
            raise ReviewError("name: 1 to 120 characters")
        now = self._clock.now_ms()
        if due_ms <= now:
            raise ReviewError("the due date must be in the future")
        items = [Item(USER, u.user_id, u.username, u.role, u.disabled, last_used.get(f"{USER}:{u.user_id}"))
                 for u in sorted(self._store.users(self._tenant), key=lambda u: u.username)]
        items += [Item(CLIENT, c.client_id, c.name, c.scopes, c.disabled, last_used.get(f"{CLIENT}:{c.client_id}"))
                  for c in sorted(self._store.clients(self._tenant), key=lambda c: c.name)]
        campaign = Campaign(secrets.token_hex(8), name, now, due_ms, actor, tuple(items))

        def job(tx: WriteTx) -> None:
            raw = tx.get_meta(self._index_name())
            ids: list[str] = orjson.loads(raw) if raw else []
            ids = [*ids, campaign.campaign_id][-MAX_CAMPAIGNS:]
            tx.set_meta(self._name(campaign.campaign_id), campaign.to_json())
            tx.set_meta(self._index_name(), orjson.dumps(ids))

        self._store.write_sync("access-review.open", job)
        return campaign

    def decide(self, campaign_id: str, kind: str, subject: str, decision: str, reason: str,
               actor: str) -> tuple[Campaign, Item]:
        """Record one decision (once per item); the caller applies a revoke and audits it."""
        if decision not in DECISIONS:
            raise ReviewError("decision must be keep or revoke")
        now = self._clock.now_ms()

        def job(tx: WriteTx) -> tuple[Campaign, Item]:
            raw = tx.get_meta(self._name(campaign_id)) if campaign_id.isalnum() else None
            if raw is None:
                raise ReviewError("no such campaign")
            campaign = Campaign.from_json(raw)
            items = list(campaign.items)
            for n, item in enumerate(items):
                if item.kind == kind and item.subject == subject:
                    if item.decision is not None:
                        raise ReviewError("this access was already reviewed in this campaign")
                    items[n] = replace(item, decision=decision, reason=reason, decided_by=actor, decided_ms=now)
                    updated = replace(campaign, items=tuple(items))
                    tx.set_meta(self._name(campaign_id), updated.to_json())
                    return updated, items[n]
            raise ReviewError("this account or client is not part of the campaign")

        return self._store.write_sync("access-review.decide", job)


def campaign_summary(c: Campaign, now_ms: int) -> dict[str, Any]:
    return {"id": c.campaign_id, "name": c.name, "due": c.due_ms, "pending": c.pending, "total": len(c.items),
            "status": c.status, "overdue": c.overdue(now_ms)}
