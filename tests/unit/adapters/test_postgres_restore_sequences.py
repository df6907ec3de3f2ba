"""A PostgreSQL restore inserts rows with their keys; afterwards new rows must not collide with them."""

from __future__ import annotations

import psycopg

from fhirvault.adapters.postgres_backup import _settle


def test_settle_moves_serial_and_identity_sequences_past_restored_rows(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for i in (1, 2, 3):  # as a restore writes them: explicit ids (the subscription queue is BIGSERIAL)
            conn.execute("INSERT INTO subscription_deliveries (id, tenant, subscription_id, kind, type, rid, version,"
                         " attempts, due_ms, created_ms) VALUES (%s, 't', 's', 'notify', 'Patient', 'p', 1, 0, 0, 0)",
                         (i,))
        _settle(conn)
        row = conn.execute("INSERT INTO subscription_deliveries (tenant, subscription_id, kind, type, rid, version,"
                           " attempts, due_ms, created_ms) VALUES ('t', 's', 'notify', 'Patient', 'p', 2, 0, 0, 0)"
                           " RETURNING id").fetchone()
    assert row is not None and row[0] == 4
