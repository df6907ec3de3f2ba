"""The console's pure parts: message catalogues, language choice, CSRF and pending-login signing, charts."""

from __future__ import annotations

import re
import string
from importlib import resources

import pytest

from fhirvault.services.metric_samples import Sample
from fhirvault.web.console import charts
from fhirvault.web.console.i18n import EN, FR, negotiate, translator
from fhirvault.web.console.session import Signer


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_both_catalogues_have_every_key_with_the_same_placeholders() -> None:
    assert set(EN) == set(FR)
    for key in EN:
        assert _fields(EN[key]) == _fields(FR[key]), key


def test_every_key_the_templates_and_routes_use_is_in_the_catalogue() -> None:
    package = resources.files("fhirvault.web.console")
    sources = [p.read_text() for p in package.joinpath("templates").iterdir() if p.name.endswith(".html")]
    sources.append(package.joinpath("routes.py").read_text())
    used = {k for text in sources for k in re.findall(r'\bt\(\s*"([a-z_]+(?:\.[a-z_]+)?)"\s*[,)]', text)}
    used |= {k for text in sources for k in re.findall(r'"((?:nav|health|secret|dpo|charts)\.(?!html)[a-z_]+)"', text)}
    used.discard("health.ready")  # the readiness probe's store job name, not a message
    assert len(used) > 50, sorted(used)
    assert used <= set(EN), sorted(used - set(EN))


@pytest.mark.parametrize(("cookie", "header", "lang"), [
    (None, None, "en"), (None, "fr-FR,fr;q=0.9,en;q=0.8", "fr"), (None, "de-DE, en;q=0.5, fr;q=0.7", "fr"),
    ("en", "fr", "en"), ("xx", "fr-CA", "fr"), (None, "de", "en"), (None, "fr;q=abc, en", "en"),
])
def test_language_negotiation(cookie: str | None, header: str | None, lang: str) -> None:
    assert negotiate(cookie, header) == lang


def test_translation_falls_back_to_english_and_fills_values() -> None:
    assert translator("fr")("signed_in_as", user="a", role="b") == "Connecté en tant que a (b)"
    assert translator("de")("logout") == "Sign out"


def test_csrf_tokens_are_bound_to_the_session_and_the_key() -> None:
    signer = Signer(b"k" * 32)
    token = signer.csrf_for("session-a")
    assert signer.csrf_ok("session-a", token)
    assert not signer.csrf_ok("session-b", token)
    assert not signer.csrf_ok("session-a", None) and not signer.csrf_ok("session-a", "")
    assert not Signer(b"x" * 32).csrf_ok("session-a", token)


def test_the_pending_second_factor_cookie_is_signed_and_expires() -> None:
    signer = Signer(b"k" * 32)
    cookie = signer.pending("u-123", now=1000.0)
    assert signer.pending_user(cookie, now=1100.0) == "u-123"
    assert signer.pending_user(cookie, now=1000.0 + 301) is None
    forged = cookie.replace("u-123", "u-999")
    assert signer.pending_user(forged, now=1100.0) is None
    assert signer.pending_user("a.b.c", now=1100.0) is None


def _samples(*points: tuple[int, float, float, float]) -> list[Sample]:
    return [Sample(ts, {"requests": r, "latency_sum": s, "latency_count": c}) for ts, r, s, c in points]


def test_counter_rates_and_latency_skip_restarts() -> None:
    samples = _samples((0, 100, 1.0, 100), (60_000, 160, 2.2, 160), (120_000, 10, 0.1, 10), (180_000, 70, 0.7, 70))
    assert charts.rates(samples, "requests") == [(60_000, 60.0), (180_000, 60.0)]
    latency = charts.mean_latency_ms(samples)
    assert [ts for ts, _ in latency] == [60_000, 180_000]
    assert abs(latency[0][1] - 20.0) < 1e-9 and abs(latency[1][1] - 10.0) < 1e-9


def test_a_chart_is_escaped_accessible_svg() -> None:
    svg = str(charts.line_chart("c1", "<script>x</script>", [(0, 1.0), (60_000, 3.0)], 0, 60_000,
                                no_data="none", described="from {low} to {high}, {n} points"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert 'role="img"' in svg and 'aria-labelledby="c1-t c1-d"' in svg and "from 1 to 3, 2 points" in svg
    assert svg.count("<circle") == 2 and "<polyline" in svg
    empty = str(charts.line_chart("c2", "T", [], 0, 1, no_data="nothing yet", described=""))
    assert "nothing yet" in empty and "<svg" not in empty


def test_a_long_series_is_averaged_down_to_what_a_chart_can_show() -> None:
    points = [(i * 60_000, float(i % 10)) for i in range(10_080)]
    small = charts.downsample(points, 480)
    assert len(small) <= 480 and small[0][0] < small[-1][0]
    assert abs(sum(v for _, v in small) / len(small) - 4.5) < 0.1
    assert charts.downsample(points[:5], 480) == points[:5]
    svg = str(charts.line_chart("c", "T", points, 0, points[-1][0], no_data="-", described="{n}"))
    assert svg.count(",") <= 2 * 480 + 10  # the polyline's coordinates, not 10,080 of them
