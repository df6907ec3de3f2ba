"""The break-the-glass block of both stores: put (insert and replace), get, filtered listing, rollback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirvault.ports import BreakGlassRow, ResourceStore
from tests.store_engines import open_test_store


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResourceStore]:
    yield from open_test_store(request.param, tmp_path)


def row(gid: str, user: str = "u1", created: int = 1, expires: int = 100, status: str = "open",
        tenant: str = "t") -> BreakGlassRow:
    return BreakGlassRow(gid, tenant, user, "p1", created, expires, status, "k1", b"sealed-" + gid.encode())


def test_put_get_list(store: ResourceStore) -> None:
    store.write_sync("t", lambda tx: tx.put_break_glass(row("a", created=1, expires=50)))
    store.write_sync("t", lambda tx: tx.put_break_glass(row("b", user="u2", created=2, expires=200)))
    store.write_sync("t", lambda tx: tx.put_break_glass(row("c", created=3, expires=300, tenant="other")))
    assert store.break_glass("t", "a") == row("a", created=1, expires=50)
    assert store.break_glass("other", "a") is None
    assert [r.grant_id for r in store.break_glass_rows("t")] == ["b", "a"]  # newest first
    assert [r.grant_id for r in store.break_glass_rows("t", user_id="u1")] == ["a"]
    assert [r.grant_id for r in store.break_glass_rows("t", expires_after_ms=60)] == ["b"]
    store.write_sync("t", lambda tx: tx.put_break_glass(row("a", created=1, expires=50, status="closed")))
    assert [r.grant_id for r in store.break_glass_rows("t", status="open")] == ["b"]
    assert store.break_glass("t", "a") is not None and store.break_glass("t", "a").status == "closed"  # type: ignore[union-attr]


def test_rolled_back_with_its_job(store: ResourceStore) -> None:
    def job(tx: object) -> None:
        tx.put_break_glass(row("x"))  # type: ignore[attr-defined]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.write_sync("t", job)  # type: ignore[arg-type]
    assert store.break_glass("t", "x") is None
