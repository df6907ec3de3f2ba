"""Mutable health facts the readiness check and the metrics read."""

from __future__ import annotations

from dataclasses import dataclass

from fhirvault.ports import WriteTx


@dataclass
class HealthState:
    # Set by the audit verifier: None until the start-up verification finished,
    # then True/False for the latest run.
    audit_verified: bool | None = None
    audit_failure: str | None = None  # first discrepancy found, for operators


def database_probe(tx: WriteTx) -> None:
    """The readiness check's write job: one statement on the writer session. A job that sends
    nothing would succeed without the database (the PostgreSQL writer sends BEGIN with a job's
    first statement), so /readyz could stay 200 while the database is down."""
    tx.get_meta("schema_version")
