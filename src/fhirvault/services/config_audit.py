"""Configuration changes leave an audit record: compared at each server start with the last one seen."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import orjson

from fhirvault.config import Settings
from fhirvault.ports import WriteTx

_META = "config-last-seen"


def _flat(settings: Settings) -> dict[str, Any]:
    """Every setting as plain JSON values; config-file tables as a digest (they may name secret files)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            value = hashlib.sha256(repr(value).encode()).hexdigest()[:16]
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def changed_settings(container: Any) -> list[str]:
    """Record a ``config-change`` system event if the settings differ from the last start; return the names."""
    current = _flat(container.settings)
    raw = container.store.get_meta(_META)
    previous: dict[str, Any] = orjson.loads(raw) if raw else {}
    changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
    if not changed:
        return []
    detail = "first start" if not previous else "changed: " + ", ".join(changed)
    encoded = orjson.dumps(current)

    def remember(tx: WriteTx) -> None:
        tx.set_meta(_META, encoded)

    container.store.write_sync("config.seen", remember)
    container.audit.record_system_event(container.store, container.clock, "config-change", detail)
    return changed


_OVERRIDES_META = "residency-overrides-seen"


def record_residency_overrides(container: Any) -> list[str]:
    """Audit (``config-change``) the destinations outside the EEA accepted by a justification, when they change."""
    from fhirvault.services.residency import overrides

    lines = sorted(f"{d.setting}: {d.host or 'this machine'} in {d.country}, accepted: {d.override}"
                   for d in overrides(container.settings))
    encoded = orjson.dumps(lines)
    if (container.store.get_meta(_OVERRIDES_META) or b"[]") == encoded:
        return []

    def remember(tx: WriteTx) -> None:
        tx.set_meta(_OVERRIDES_META, encoded)

    container.store.write_sync("config.residency", remember)
    detail = ("destinations outside the EEA accepted: " + "; ".join(lines)) if lines else \
        "no destination outside the EEA any more"
    container.audit.record_system_event(container.store, container.clock, "config-change", detail)
    return lines
