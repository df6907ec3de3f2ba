from __future__ import annotations

import pytest

from fhirvault.domain.instants import http_date, instant, parse_fhir_datetime, parse_http_date


def test_instant_and_http_date() -> None:
    assert instant(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert http_date(1_700_000_000_999) == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert parse_http_date("Tue, 14 Nov 2023 22:13:20 GMT") == 1_700_000_000_000
    assert parse_http_date("yesterday") is None


@pytest.mark.parametrize(
    ("text", "ms"),
    [("2023", 1_672_531_200_000), ("2023-11", 1_698_796_800_000), ("2023-11-14", 1_699_920_000_000),
     ("2023-11-14T22:13:20Z", 1_700_000_000_000), ("2023-11-14T23:13:20.5+01:00", 1_700_000_000_500),
     ("2023-11-14T22:13:20.123456789Z", 1_700_000_000_123)],
)
def test_fhir_datetimes(text: str, ms: int) -> None:
    assert parse_fhir_datetime(text) == ms


@pytest.mark.parametrize("bad", ["", "2023-13", "2023-02-30", "14/11/2023", "2023-11-14T25:00:00Z", "now"])
def test_bad_fhir_datetimes(bad: str) -> None:
    assert parse_fhir_datetime(bad) is None
