"""The [subscriptions] table and the retry back-off."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fhirvault.config import SettingsError, load_settings
from fhirvault.services.subscription_settings import (
    SubscriptionSettings,
    parse_subscription_settings,
)
from fhirvault.services.subscriptions import backoff_seconds


def test_defaults_are_https_only_and_public_addresses_only() -> None:
    s = SubscriptionSettings()
    assert s.enabled and not s.allow_http and s.allowed_networks == ()


def test_the_table_is_read_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "fhirvault.toml"
    config.write_text('[subscriptions]\nallow_http = true\nallowed_networks = ["10.20.0.0/16"]\nmax_attempts = 4\n')
    settings = load_settings({"data_dir": tmp_path}, environ={}, config_file=config)
    assert settings.subscriptions == SubscriptionSettings(
        allow_http=True, allowed_networks=(ipaddress.ip_network("10.20.0.0/16"),), max_attempts=4)


@pytest.mark.parametrize("raw", [{"allow_http": "yes"}, {"max_attempts": 0}, {"max_attempts": 2.5},
                                 {"allowed_networks": ["nope"]}, {"timeout_seconds": 1000}, {"retries": 3}])
def test_bad_values_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(SettingsError, match="subscriptions"):
        parse_subscription_settings(raw, "test")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    s = SubscriptionSettings(retry_initial_seconds=2, retry_max_seconds=30)
    assert [backoff_seconds(n, s, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert backoff_seconds(3, s, rng=lambda: 0.0) == 4  # jitter takes at most half of the step
