"""Retention policy: what survives a prune."""

from __future__ import annotations

from datetime import UTC, datetime

from fhirvault.backup.retention import keep
from fhirvault.backup.settings import RetentionSettings

DAY = 86_400_000


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_keep_all_then_dailies_then_monthlies() -> None:
    now = _ms("2026-11-29T12:00:00")
    backups = []
    # Four backups a day for 400 days.
    for d in range(400):
        for h in (0, 6, 12, 18):
            t = now - d * DAY - h * 3_600_000 - 1
            backups.append((f"b{t}", t))
    policy = RetentionSettings(keep_all_days=7, daily_days=35, monthly_months=12)
    kept = keep(backups, now, policy)
    recent = {b for b, t in backups if now - t < 7 * DAY}
    assert recent <= kept
    days = {datetime.fromtimestamp(t / 1000, UTC).date() for b, t in backups if b in kept and now - t >= 7 * DAY
            and now - t < 35 * DAY}
    per_day = [b for b, t in backups if b in kept and 7 * DAY <= now - t < 35 * DAY]
    assert len(per_day) <= len(days) + 1  # one per day (the boundary day may also hold keep-all ones)
    old = [t for b, t in backups if b in kept and now - t >= 35 * DAY]
    months = {datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m") for t in old}
    assert len(old) == len(months) and len(months) <= 12
    oldest = min(t for b, t in backups if b in kept)
    assert now - oldest < 366 * DAY


def test_newest_and_protected_always_kept() -> None:
    now = _ms("2026-11-29T12:00:00")
    backups = [("old", now - 900 * DAY), ("older", now - 1000 * DAY)]
    nothing = RetentionSettings(0, 0, 0)
    assert keep(backups, now, nothing) == {"old"}
    assert keep(backups, now, nothing, protected=["older"]) == {"old", "older"}
    assert keep([], now, nothing) == set()
