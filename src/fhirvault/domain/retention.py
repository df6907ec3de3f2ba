"""Retention rules and the erasure decision (pure: no I/O, no clock of its own).

A patient's record is kept until the latest date any rule gives for it; an erasure before that date
is refused with the rule and the date. Defaults follow French law (see docs/data-lifecycle.md):

* health records: 20 years after the last stay or consultation (Code de la santé publique,
  art. R1112-7), and for a patient who was a minor then, at least until their 28th birthday;
* a legal hold (litigation, investigation) blocks erasure and purge until it is released.

"Last activity" is the newest ``lastUpdated`` of any version in the patient's compartment: it is
never earlier than the last stay it records, so the rule never erases too early (it may keep longer
when an old stay is amended later, which is what the law asks for the amended record anyway).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

_DAY_MS = 86_400_000
YEAR_MS = 365 * _DAY_MS + _DAY_MS // 4  # a Julian year: what "N years" means for the audit floor
HEALTH_RECORD = "fr-csp-r1112-7"  # the default rule's name, as refusals quote it
MINOR_RULE = "fr-csp-r1112-7-minor"
LEGAL_HOLD = "legal-hold"
AUDIT_FLOOR_YEARS = 6  # access traces are never pruned younger than this (docs/data-lifecycle.md)


@dataclass(frozen=True, slots=True)
class RetentionRules:
    """``[retention]`` in fhirvault.toml."""

    health_record_years: int = 20
    minor_until_age: int = 28
    # Per resource type, years after the type's newest version (e.g. {"AuditEvent": 6}); a patient is
    # kept until the latest of every rule that applies to something in their compartment.
    years_by_type: Mapping[str, int] = field(default_factory=dict)
    audit_years: int = AUDIT_FLOOR_YEARS
    auto_erase: bool = False  # the retention job erases what expired (False: it only reports)
    job_interval_hours: int = 24


@dataclass(frozen=True, slots=True)
class Retention:
    """Until when a patient's record must be kept, and by which rule (the latest one wins)."""

    until_ms: int
    rule: str
    basis: str


@dataclass(frozen=True, slots=True)
class ErasureDecision:
    allowed: bool
    rule: str | None = None  # the rule that refused it
    until_ms: int | None = None  # … until this date (None: a legal hold, until released)
    detail: str = ""


def add_years(ms: int, years: int) -> int:
    """``ms`` plus whole calendar years (29 February → 28 February in a common year)."""
    d = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    try:
        moved = d.replace(year=d.year + years)
    except ValueError:
        moved = d.replace(year=d.year + years, day=28)
    return int(moved.timestamp() * 1000)


def birthday_ms(birth_date: str | None, age: int) -> int | None:
    """Midnight UTC of the ``age``-th birthday for a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD).

    A partial date is read at its latest possible day, so the rule never ends too early."""
    if not birth_date or not isinstance(birth_date, str):
        return None
    parts = birth_date[:10].split("-")
    try:
        year = int(parts[0]) + age
        month = int(parts[1]) if len(parts) > 1 else 12
        day = int(parts[2]) if len(parts) > 2 else 31 if month == 12 else 28
        return int(dt.datetime(year, month, min(day, 28) if month == 2 else day, tzinfo=dt.UTC).timestamp() * 1000)
    except (ValueError, IndexError):
        return None


def retention_for(rules: RetentionRules, last_activity_ms: int, birth_date: str | None,
                  newest_by_type: Mapping[str, int] | None = None) -> Retention:
    """The date until which a record must be kept, and the rule that sets it."""
    best = Retention(add_years(last_activity_ms, rules.health_record_years), HEALTH_RECORD,
                     f"{rules.health_record_years} years after the last stay or consultation"
                     " (Code de la santé publique, art. R1112-7)")
    minor = birthday_ms(birth_date, rules.minor_until_age)
    if minor is not None and minor > best.until_ms:
        best = Retention(minor, MINOR_RULE, f"a minor's record is kept at least until their"
                                            f" {rules.minor_until_age}th birthday (art. R1112-7)")
    for rtype, newest in (newest_by_type or {}).items():
        years = rules.years_by_type.get(rtype)
        if years is not None and (until := add_years(newest, years)) > best.until_ms:
            best = Retention(until, f"retention.years_by_type.{rtype}", f"{years} years after the last {rtype}")
    return best


def erasure_decision(now_ms: int, retention: Retention | None, *, legal_hold: bool,
                     override_retention: bool = False) -> ErasureDecision:
    """May the record be erased now? A legal hold always refuses; a running retention period refuses
    unless the data protection officer overrides it (an art. 17 request the law allows early, e.g. data
    unlawfully processed: the override is recorded with its reason)."""
    if legal_hold:
        return ErasureDecision(False, LEGAL_HOLD, None, "the patient's record is under a legal hold")
    if retention is not None and retention.until_ms > now_ms and not override_retention:
        return ErasureDecision(False, retention.rule, retention.until_ms,
                               f"retention period running: {retention.basis}")
    return ErasureDecision(True)


def audit_prunable_before(now_ms: int, audit_years: int) -> int:
    """Audit entries older than this may be pruned; never less than the floor."""
    return now_ms - max(audit_years, AUDIT_FLOOR_YEARS) * YEAR_MS
