"""Which backups a retention policy keeps (pure: backups and the time in, ids out)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from fhirvault.backup.settings import RetentionSettings

_DAY_MS = 86_400_000


def keep(backups: Iterable[tuple[str, int]], now_ms: int, policy: RetentionSettings,
         protected: Iterable[str] = ()) -> set[str]:
    """Ids to keep among ``(backup id, created_ms)``.

    Every backup younger than ``keep_all_days``; the newest of each UTC day for
    ``daily_days``; the newest of each month for ``monthly_months``; the newest
    backup overall and every id in ``protected`` (e.g. the last verified one), always.
    """
    items = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)  # newest first
    kept = set(protected) & {b for b, _ in items}
    if items:
        kept.add(items[0][0])
    seen_days: set[str] = set()
    seen_months: set[str] = set()
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    for backup_id, created in items:
        age_ms = now_ms - created
        if age_ms < policy.keep_all_days * _DAY_MS:
            kept.add(backup_id)
        when = datetime.fromtimestamp(created / 1000, UTC)
        day = when.strftime("%Y-%m-%d")
        if age_ms < policy.daily_days * _DAY_MS and day not in seen_days:
            seen_days.add(day)
            kept.add(backup_id)
        month = when.strftime("%Y-%m")
        months_ago = (now.year - when.year) * 12 + now.month - when.month
        if months_ago < policy.monthly_months and month not in seen_months:
            seen_months.add(month)
            kept.add(backup_id)
    return kept
