"""Retention rules and the erasure decision (domain/retention.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from fhirvault.config import SettingsError
from fhirvault.domain.retention import (
    HEALTH_RECORD,
    LEGAL_HOLD,
    MINOR_RULE,
    YEAR_MS,
    RetentionRules,
    add_years,
    audit_prunable_before,
    birthday_ms,
    erasure_decision,
    retention_for,
)
from fhirvault.services.retention import parse_retention_settings


def ms(y: int, m: int = 1, d: int = 1) -> int:
    return int(dt.datetime(y, m, d, tzinfo=dt.UTC).timestamp() * 1000)


def test_adult_record_is_kept_twenty_years_after_the_last_stay() -> None:
    kept = retention_for(RetentionRules(), ms(2026, 3, 1), "1970-05-12")
    assert (kept.until_ms, kept.rule) == (ms(2046, 3, 1), HEALTH_RECORD)


def test_minor_record_is_kept_until_the_28th_birthday_when_that_is_later() -> None:
    kept = retention_for(RetentionRules(), ms(2026, 3, 1), "2020-05-12")
    assert (kept.until_ms, kept.rule) == (ms(2048, 5, 12), MINOR_RULE)
    # A patient whose 28th birthday comes before the 20 years: the 20 years win.
    assert retention_for(RetentionRules(), ms(2026, 3, 1), "2005-01-01").rule == HEALTH_RECORD


def test_partial_birth_dates_are_read_at_their_latest_day() -> None:
    assert birthday_ms("2020", 28) == ms(2048, 12, 31)
    assert birthday_ms("2020-02", 28) == ms(2048, 2, 28)
    assert birthday_ms("garbage", 28) is None and birthday_ms(None, 28) is None


def test_29_february_moves_to_28_february() -> None:
    assert add_years(ms(2024, 2, 29), 1) == ms(2025, 2, 28)


def test_a_type_rule_can_keep_longer() -> None:
    rules = RetentionRules(years_by_type={"DocumentReference": 30})
    kept = retention_for(rules, ms(2026), None, {"DocumentReference": ms(2020), "Observation": ms(2026)})
    assert (kept.until_ms, kept.rule) == (ms(2050), "retention.years_by_type.DocumentReference")


def test_erasure_decision_names_the_rule_and_date() -> None:
    kept = retention_for(RetentionRules(), ms(2026), None)
    refused = erasure_decision(ms(2030), kept, legal_hold=False)
    assert not refused.allowed and refused.rule == HEALTH_RECORD and refused.until_ms == ms(2046)
    assert erasure_decision(ms(2046, 1, 2), kept, legal_hold=False).allowed
    assert erasure_decision(ms(2030), kept, legal_hold=False, override_retention=True).allowed
    held = erasure_decision(ms(2090), kept, legal_hold=True, override_retention=True)
    assert not held.allowed and held.rule == LEGAL_HOLD and held.until_ms is None


def test_audit_pruning_never_goes_below_the_floor() -> None:
    now = ms(2030)
    assert audit_prunable_before(now, 10) == now - 10 * YEAR_MS
    assert audit_prunable_before(now, 1) == now - 6 * YEAR_MS


def test_settings_parse_and_refuse_bad_values() -> None:
    rules = parse_retention_settings({"health-record-years": 25, "auto_erase": True,
                                      "years_by_type": {"Observation": 10}}, "test")
    assert rules.health_record_years == 25 and rules.auto_erase and rules.years_by_type == {"Observation": 10}
    with pytest.raises(SettingsError, match="floor"):
        parse_retention_settings({"audit_years": 2}, "test")
    with pytest.raises(SettingsError, match=r"unknown setting retention\.typo"):
        parse_retention_settings({"typo": 1}, "test")
    with pytest.raises(SettingsError, match="true or false"):
        parse_retention_settings({"auto_erase": "yes"}, "test")
