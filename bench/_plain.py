#!/usr/bin/env python3
"""Bench only: ``fhirvault serve`` with encryption at rest and the audit trail turned off.

What encryption and audit cost is the difference between a normal server and
this one on the same load (bench/scale.py --compare-plain). Nothing in the
installed package can turn them off: there is no setting, environment variable
or command-line option for it (tests/unit/test_bench_switch.py checks that).
This file substitutes three components before the container is built, in this
process only:

* the key ring hands out data keys whose cipher is a pass-through (the tenant
  and root keys stay real; a plaintext blob starts with a 0 byte, which the
  real envelope never does, so a normal server refuses such a store instead of
  serving it);
* the audit trail records nothing;
* the store skips the transactions that would only have carried an audit
  record (reads, searches, refusals), as the trail has nothing to put in them.

Granian forks its workers from this process (the "fork" start method, Linux'
default up to Python 3.13), so they inherit the substitutions; with another
start method this refuses to run rather than measure a normal server.

    python bench/_plain.py serve --data-dir DIR [--port P] [--workers N] ...

A data directory written this way holds plaintext: use it for benchmarks only.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from fhirvault import container
from fhirvault.config import Settings
from fhirvault.ports import ResourceStore, WrappedKey, WriteTx
from fhirvault.services.audit import AuditRecord, AuditTrail
from fhirvault.services.crypto import Aead, DecryptionError
from fhirvault.services.keys import DataKey, KeyRing

T = TypeVar("T")
PLAIN = b"\x00"  # envelope byte of a pass-through blob (the real envelope is 1)
# Write transactions whose only job is the audit record of a read, search, history or refusal.
AUDIT_ONLY = frozenset({"audit.read", "audit.search", "audit.history", "audit.everything", "audit.event",
                        "audit.trail"})


class PassThroughAead(Aead):
    __slots__ = ()

    def __init__(self) -> None:  # no key
        pass

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return PLAIN + plaintext

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if blob[:1] != PLAIN:
            raise DecryptionError("not a pass-through blob (this store was written with encryption on)")
        return blob[1:]


_PLAIN_AEAD = PassThroughAead()


def _plain(key: DataKey) -> DataKey:
    return DataKey(key.key_id, _PLAIN_AEAD, key.compartment)


class PlainKeyRing(KeyRing):
    """Data keys are created and wrapped as usual; only the cipher they return is a pass-through."""

    def _unwrap(self, row: WrappedKey) -> DataKey:
        return _plain(super()._unwrap(row))

    def get_or_create_in_tx(self, tx: WriteTx, compartment: str) -> tuple[DataKey, bytes]:
        key, lookup = super().get_or_create_in_tx(tx, compartment)
        return _plain(key), lookup


class SilentAuditTrail(AuditTrail):
    def record(self, tx: WriteTx, event: AuditRecord) -> None:
        pass


class AuditFreeStore:
    """The real store, minus the transactions that would hold nothing but an audit record."""

    def __init__(self, inner: ResourceStore) -> None:
        self._inner = inner

    async def write(self, name: str, fn: Callable[[WriteTx], T]) -> T | None:
        if name in AUDIT_ONLY:
            return None
        return await self._inner.write(name, fn)

    def write_sync(self, name: str, fn: Callable[[WriteTx], T]) -> T | None:
        if name in AUDIT_ONLY:
            return None
        return self._inner.write_sync(name, fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Substitute the three components in ``fhirvault.container`` (this process and its forks)."""
    if multiprocessing.get_start_method() != "fork":
        raise SystemExit("bench/_plain.py needs the 'fork' start method (Granian workers inherit the switch)")
    real_open = container.open_store

    def open_store(settings: Settings) -> ResourceStore:
        return AuditFreeStore(real_open(settings))  # type: ignore[return-value]  # a delegating proxy

    container.open_store = open_store  # type: ignore[assignment]  # bench-only substitution
    container.KeyRing = PlainKeyRing  # type: ignore[misc]
    container.AuditTrail = SilentAuditTrail  # type: ignore[misc]


def main(argv: list[str]) -> int:
    from fhirvault.cli.main import main as fhirvault_main

    install()
    print("bench/_plain.py: ENCRYPTION AND AUDIT ARE OFF (benchmark only)", file=sys.stderr, flush=True)
    return int(fhirvault_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
