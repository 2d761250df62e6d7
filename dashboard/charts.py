"""Server-rendered SVG charts: no JavaScript, no inline style (CSP-safe).

Colours come from classes (`s0`…`s7`) styled in static/css/dashboard.css.
Three shapes cover the dashboard: lines over time, stacked bars over
categories, horizontal bars for rankings and gauges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28
PALETTE = 8


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (x, y); x: epoch seconds for time charts


def nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 × a power of ten, at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k" if value < 1_000_000 else f"{value / 1_000_000:g}M"
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.3g}"


def _frame(title: str, body: list[str], legend: list[str], css: str, height: int = HEIGHT) -> SafeString:
    label = escape(title)
    items = "".join(
        f'<span class="key"><svg width="10" height="10" aria-hidden="true"><rect class="swatch s{i % PALETTE}" '
        f'width="10" height="10"/></svg>{escape(name)}</span>' for i, name in enumerate(legend)
    )
    svg = (f'<svg class="chart {css}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{label}" '
           f'preserveAspectRatio="xMidYMid meet">{"".join(body)}</svg>')
    return mark_safe(f'<figure class="chart-box"><figcaption>{label}</figcaption>{svg}'
                     f'<div class="legend">{items}</div></figure>')


def _y_axis(top: float, unit: str) -> list[str]:
    parts, plot_h = [], HEIGHT - TOP - BOTTOM
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}{unit}</text>')
    return parts


def _empty(title: str) -> SafeString:
    body = [f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">No data in this range</text>']
    return _frame(title, body, [], "empty-chart")


def line_chart(title: str, series: list[Series], *, x_range: tuple[float, float], unit: str = "") -> SafeString:
    """Lines over time; x in epoch seconds within `x_range`."""
    series = [s for s in series if s.points]
    if not series:
        return _empty(title)
    x0, x1 = x_range
    top = nice_max(max(y for s in series for _, y in s.points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(x: float, y: float) -> str:
        return f"{LEFT + plot_w * (x - x0) / max(x1 - x0, 1):.1f},{TOP + plot_h - plot_h * y / top:.1f}"

    body = _y_axis(top, unit)
    fmt = "%H:%M" if x1 - x0 <= 2 * 86400 else "%m-%d"
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        label = timezone.localtime(datetime.fromtimestamp(x, UTC)).strftime(fmt)
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        body.append(f'<text class="tick" x="{LEFT + plot_w * i / 4:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">{label}</text>')
    for i, s in enumerate(series):
        d = "M" + " L".join(xy(x, y) for x, y in sorted(s.points))
        body.append(f'<path class="series s{i % PALETTE}" d="{d}"><title>{escape(s.name)}</title></path>')
        if len(s.points) == 1:
            body.append(f'<circle class="dot s{i % PALETTE}" r="3" cx="{xy(*s.points[0]).split(",")[0]}" '
                        f'cy="{xy(*s.points[0]).split(",")[1]}"/>')
    return _frame(title, body, [s.name for s in series], "line-chart")


def bar_chart(title: str, categories: list[str], series: list[Series], *, unit: str = "") -> SafeString:
    """Stacked bars: one per category; `series[i].points` are (category index, value)."""
    if not categories or not any(y for s in series for _, y in s.points):
        return _empty(title)
    totals = [0.0] * len(categories)
    for s in series:
        for x, y in s.points:
            totals[int(x)] += y
    top = nice_max(max(totals))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(categories)
    body = _y_axis(top, unit)
    base = [0.0] * len(categories)
    for i, s in enumerate(series):
        for x, y in s.points:
            if y <= 0:
                continue
            k = int(x)
            h, y_top = plot_h * y / top, TOP + plot_h - plot_h * (base[k] + y) / top
            base[k] += y
            left = LEFT + slot * k + slot * 0.15
            body.append(f'<path class="bar s{i % PALETTE}" d="M{left:.1f},{y_top + h:.1f} v{-h:.1f} h{slot * 0.7:.1f} '
                        f'v{h:.1f} Z"><title>{escape(s.name)} · {escape(categories[k])}: {_fmt(y)}{unit}</title></path>')
    every = max(1, math.ceil(len(categories) / 8))
    for k, name in enumerate(categories):
        if k % every == 0:
            body.append(f'<text class="tick" x="{LEFT + slot * (k + 0.5):.1f}" y="{HEIGHT - 8}" '
                        f'text-anchor="middle">{escape(name)}</text>')
    return _frame(title, body, [s.name for s in series], "bar-chart")


def hbar_chart(title: str, items: list[tuple[str, float]], *, unit: str = "", top: float | None = None) -> SafeString:
    """Horizontal bars, one per (label, value), largest scale `top` (default: the largest value)."""
    if not items:
        return _empty(title)
    top = top or nice_max(max(v for _, v in items))
    row = min((HEIGHT - TOP - 8) / len(items), 28)
    height = int(TOP + row * len(items) + 8)
    label_w, plot_w = 150, WIDTH - 150 - RIGHT - 70
    body = []
    for k, (label, value) in enumerate(items):
        y = TOP + row * k
        w = max(plot_w * min(value / top, 1.0), 1.0)
        body.append(f'<text class="tick" x="{label_w - 6}" y="{y + row * 0.6:.1f}" text-anchor="end">{escape(label[:24])}</text>')
        body.append(f'<path class="bar s{k % PALETTE}" d="M{label_w},{y + row * 0.15:.1f} h{w:.1f} v{row * 0.7:.1f} '
                    f'h{-w:.1f} Z"><title>{escape(label)}: {_fmt(value)}{unit}</title></path>')
        body.append(f'<text class="value" x="{label_w + w + 6:.1f}" y="{y + row * 0.6:.1f}">{_fmt(value)}{unit}</text>')
    return _frame(title, body, [], "hbar-chart", height=height)
