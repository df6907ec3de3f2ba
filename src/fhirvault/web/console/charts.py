"""Server-rendered SVG line charts (no script): a title, a described value range, axes, one line.

Colours and fonts come from console.css classes (the CSP allows no inline style); the SVG is
inline in the page, so it needs no image request.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime

from markupsafe import Markup

from fhirvault.services.metric_samples import Sample

WIDTH, HEIGHT = 640, 180
MAX_POINTS = 480  # more than the plot's pixels: a week of minutes is averaged down to this
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


def _fmt(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%d/%m %H:%M")


def line_chart(chart_id: str, title: str, points: Sequence[tuple[int, float]], since_ms: int, until_ms: int,
               *, no_data: str, described: str) -> Markup:
    """``described``: the accessible description, with {low}, {high} and {n} filled in here."""
    e = html.escape
    points = downsample(points, MAX_POINTS)
    if not points:
        return Markup(f'<p class="nodata" id="{e(chart_id)}">{e(title)}: {e(no_data)}</p>')  # noqa: S704 (escaped)
    values = [v for _, v in points]
    low, high = min(0.0, min(values)), max(values)
    span_y = (high - low) or 1.0
    span_x = max(1, until_ms - since_ms)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(ts: int, v: float) -> tuple[float, float]:
        x = LEFT + plot_w * min(1.0, max(0.0, (ts - since_ms) / span_x))
        y = TOP + plot_h * (1 - (v - low) / span_y)
        return round(x, 1), round(y, 1)

    coords = [xy(ts, v) for ts, v in points]
    line = " ".join(f"{x},{y}" for x, y in coords)
    dots = "".join(f'<circle class="dot" cx="{x}" cy="{y}" r="2.5"/>' for x, y in coords[-200:])
    desc = described.format(low=_fmt(min(values)), high=_fmt(max(values)), n=len(values))
    base_y = TOP + plot_h
    svg = (
        f'<figure class="chart"><svg id="{e(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{e(chart_id)}-t {e(chart_id)}-d" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{e(chart_id)}-t">{e(title)}</title><desc id="{e(chart_id)}-d">{e(desc)}</desc>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base_y}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{base_y}" x2="{WIDTH - RIGHT}" y2="{base_y}"/>'
        f'<text class="label" x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end">{e(_fmt(high))}</text>'
        f'<text class="label" x="{LEFT - 4}" y="{base_y}" text-anchor="end">{e(_fmt(low))}</text>'
        f'<text class="label" x="{LEFT}" y="{HEIGHT - 8}">{e(_time(since_ms))}</text>'
        f'<text class="label" x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">{e(_time(until_ms))} UTC</text>'
        f'<polyline class="line" points="{line}"/>{dots}</svg>'
        f'<figcaption>{e(title)} — {e(desc)}</figcaption></figure>'
    )
    return Markup(svg)  # noqa: S704 (every interpolated value is escaped above)


def downsample(points: Sequence[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """At most ``limit`` points: consecutive runs averaged (time and value), so a spike still shows."""
    if len(points) <= limit:
        return list(points)
    size = -(-len(points) // limit)  # ceiling
    out = []
    for start in range(0, len(points), size):
        run = points[start:start + size]
        out.append((sum(t for t, _ in run) // len(run), sum(v for _, v in run) / len(run)))
    return out


def rates(samples: Sequence[Sample], field: str, per_s: float = 60.0) -> list[tuple[int, float]]:
    """A cumulative counter as a rate per ``per_s`` seconds between consecutive samples (a restart,
    where the counter went down, starts again from that sample)."""
    out: list[tuple[int, float]] = []
    for prev, cur in itertools.pairwise(samples):
        a, b = prev.values.get(field), cur.values.get(field)
        seconds = (cur.ts_ms - prev.ts_ms) / 1000
        if a is None or b is None or seconds <= 0 or b < a:
            continue
        out.append((cur.ts_ms, (b - a) * per_s / seconds))
    return out


def mean_latency_ms(samples: Sequence[Sample]) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for prev, cur in itertools.pairwise(samples):
        s0, s1 = prev.values.get("latency_sum"), cur.values.get("latency_sum")
        c0, c1 = prev.values.get("latency_count"), cur.values.get("latency_count")
        if None in (s0, s1, c0, c1):
            continue
        assert s0 is not None and s1 is not None and c0 is not None and c1 is not None
        if c1 > c0 and s1 >= s0:
            out.append((cur.ts_ms, (s1 - s0) / (c1 - c0) * 1000))
    return out


def gauge(samples: Sequence[Sample], field: str) -> list[tuple[int, float]]:
    return [(s.ts_ms, v) for s in samples if (v := s.values.get(field)) is not None]
