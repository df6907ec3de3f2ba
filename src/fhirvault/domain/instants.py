"""Time formats used on the wire: FHIR instants and HTTP dates, all UTC, millisecond precision."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from functools import lru_cache

_INSTANT = re.compile(
    r"^(?P<date>[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01]))?)?)"
    r"(T(?P<time>[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?)(?P<tz>Z|[+-][0-9]{2}:[0-9]{2}))?$"
)


def instant(ms: int) -> str:
    """FHIR ``instant``: 2026-11-29T01:27:10.123Z."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def http_date(ms: int) -> str:
    return _http_date_of_second(ms // 1000)


@lru_cache(maxsize=4096)
def _http_date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, tz=UTC), usegmt=True)


def parse_http_date(value: str) -> int | None:
    """Milliseconds for an HTTP date, or None when it does not parse (then the header is ignored)."""
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def parse_fhir_datetime(value: str) -> int | None:
    """Lower bound (ms) of a FHIR date/dateTime/instant as used by ``_since``; None if malformed.

    A value without a time zone is read as UTC (the server's time zone).
    """
    m = _INSTANT.match(value)
    if m is None:
        return None
    date = m.group("date")
    parts = date.split("-")
    try:
        year = int(parts[0])
        month = int(parts[1]) if len(parts) > 1 else 1
        day = int(parts[2]) if len(parts) > 2 else 1
        if m.group("time") is None:
            dt = datetime(year, month, day, tzinfo=UTC)
        else:
            iso = f"{year:04d}-{month:02d}-{day:02d}T{m.group('time')}"
            tz = m.group("tz")
            iso += "+00:00" if tz == "Z" else tz
            # Python parses at most 6 fractional digits.
            iso = re.sub(r"\.(\d{6})\d+", r".\1", iso)
            dt = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return int(dt.timestamp() * 1000)
