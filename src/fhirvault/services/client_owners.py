"""Who answers for a backend client with clinical scopes, and what for (separation of duties, art. 30).

In production mode (``mode = "production"``) every backend client holding FHIR resource scopes must
have a named owner (a person or team) and a purpose: ``fhirvault client create`` refuses one without
them and the server refuses to start while such a client lacks them. They feed the record of
processing (recipients). Kept in the store's meta table (``client-owner:<client id>``), written in
the client's creation transaction or by ``fhirvault client set-owner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from fhirvault.ports import ResourceStore, WriteTx

_PREFIX = "client-owner:"
MIN_TEXT = 3


@dataclass(frozen=True, slots=True)
class ClientOwner:
    owner: str
    purpose: str


class OwnerError(ValueError):
    pass


def check_owner(owner: str | None, purpose: str | None) -> ClientOwner:
    if not owner or len(owner.strip()) < MIN_TEXT or not purpose or len(purpose.strip()) < MIN_TEXT:
        raise OwnerError("a client with clinical scopes needs --owner (the person or team answering for it) and"
                         " --purpose (what it is for) in production mode")
    return ClientOwner(owner.strip()[:200], purpose.strip()[:500])


def set_owner(tx: WriteTx, client_id: str, owner: ClientOwner) -> None:
    tx.set_meta(_PREFIX + client_id, orjson.dumps({"owner": owner.owner, "purpose": owner.purpose}))


def owner_of(store: ResourceStore, client_id: str) -> ClientOwner | None:
    raw = store.get_meta(_PREFIX + client_id)
    if raw is None:
        return None
    data = orjson.loads(raw)
    return ClientOwner(str(data.get("owner") or ""), str(data.get("purpose") or ""))


def clients_missing_owner(store: ResourceStore, tenant: str) -> list[str]:
    """Enabled backend (non-SMART-app) clients with clinical scopes and no owner or purpose."""
    from fhirvault.services.registers import has_clinical_scopes

    missing = []
    for c in store.clients(tenant):
        if c.disabled or store.app(c.client_id) is not None or not has_clinical_scopes(c.scopes):
            continue
        o = owner_of(store, c.client_id)
        if o is None or not o.owner or not o.purpose:
            missing.append(c.client_id)
    return missing


def production_problems(store: ResourceStore, tenant: str) -> list[str]:
    """Why production mode refuses to serve: clients with clinical scopes lacking an owner or a purpose."""
    missing = clients_missing_owner(store, tenant)
    if not missing:
        return []
    return [f"production mode: client(s) {', '.join(missing)} hold clinical scopes without a named owner and"
            " purpose; give them with 'fhirvault client set-owner --client-id ID --owner WHO --purpose WHAT',"
            " or disable them ('fhirvault client disable')"]
