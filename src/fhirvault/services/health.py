"""Mutable health facts the readiness check and the metrics read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HealthState:
    # Set by the audit verifier: None until the start-up verification finished,
    # then True/False for the latest run.
    audit_verified: bool | None = None
    audit_failure: str | None = None  # first discrepancy found, for operators
