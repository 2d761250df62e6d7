"""Server-rendered SVG plots for the admin: no script, no CDN, no inline
styles (presentation attributes only), so a strict Content-Security-Policy
allows them."""
from __future__ import annotations

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

from evals.models import EvalRun
from evals.selectors import Comparison

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 40
NOW_COLOUR, BEFORE_COLOUR, LINE_COLOUR, THRESHOLD_COLOUR = "#2563eb", "#9ca3af", "#2563eb", "#dc2626"


def _y(value: float) -> float:
    return TOP + (1 - max(0.0, min(1.0, value))) * (HEIGHT - TOP - BOTTOM)


def _frame(label: str, body: list[str]) -> SafeString:
    axis = [f'<line x1="{LEFT}" y1="{_y(v):.1f}" x2="{WIDTH - RIGHT}" y2="{_y(v):.1f}" stroke="#e5e7eb"/>'
            f'<text x="{LEFT - 6}" y="{_y(v) + 4:.1f}" text-anchor="end" font-size="11" fill="#6b7280">{v:.0%}</text>'
            for v in (0, 0.25, 0.5, 0.75, 1)]
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        + "".join(axis) + "".join(body) + "</svg>"
    )


def comparison_bars(comparison: Comparison) -> SafeString:
    """Each row of the comparison as a pair of bars: this run, the previous run."""
    rows = comparison.rows
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(rows))
    bar = min(28.0, slot / 3)
    body = []
    for i, row in enumerate(rows):
        x = LEFT + i * slot + slot / 2
        for value, offset, colour, which in ((row.before, -bar, BEFORE_COLOUR, "previous"),
                                              (row.now, 0, NOW_COLOUR, "this run")):
            if value is None:
                continue
            body.append(format_html(
                '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{} ({}): {}</title></rect>',
                f"{x + offset:.1f}", f"{_y(value):.1f}", f"{bar:.1f}", f"{_y(0) - _y(value):.1f}", colour,
                row.name, which, f"{value:.2f}",
            ))
        body.append(format_html('<text x="{}" y="{}" text-anchor="middle" font-size="11" fill="#374151">{}</text>',
                                f"{x:.1f}", HEIGHT - BOTTOM + 16, row.name[:18]))
    body.append(_legend())
    return _frame(f"{comparison.run.suite}: this run against the previous one", body)


def _legend() -> str:
    y = HEIGHT - 8
    return (f'<rect x="{LEFT}" y="{y - 9}" width="10" height="10" fill="{NOW_COLOUR}"/>'
            f'<text x="{LEFT + 14}" y="{y}" font-size="11" fill="#374151">this run</text>'
            f'<rect x="{LEFT + 80}" y="{y - 9}" width="10" height="10" fill="{BEFORE_COLOUR}"/>'
            f'<text x="{LEFT + 94}" y="{y}" font-size="11" fill="#374151">previous run</text>')


def history_line(runs: list[EvalRun], threshold: float) -> SafeString:
    """The suite's score over its last runs, oldest left, with the threshold."""
    step = (WIDTH - LEFT - RIGHT) / max(1, len(runs) - 1) if len(runs) > 1 else 0
    points = [(LEFT + i * step if len(runs) > 1 else (WIDTH + LEFT - RIGHT) / 2, _y(r.score or 0))
              for i, r in enumerate(runs)]
    body = [f'<line x1="{LEFT}" y1="{_y(threshold):.1f}" x2="{WIDTH - RIGHT}" y2="{_y(threshold):.1f}" '
            f'stroke="{THRESHOLD_COLOUR}" stroke-dasharray="4 3"><title>threshold {threshold:.0%}</title></line>']
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{LINE_COLOUR}" stroke-width="2"/>')
    for (x, y), run in zip(points, runs):
        body.append(format_html(
            '<circle cx="{}" cy="{}" r="4" fill="{}"><title>run #{} · {} · {}</title></circle>'
            '<text x="{}" y="{}" text-anchor="middle" font-size="10" fill="#6b7280">#{}</text>',
            f"{x:.1f}", f"{y:.1f}", LINE_COLOUR, run.pk, run.served_by or run.model or "default",
            f"{run.score or 0:.0%}", f"{x:.1f}", HEIGHT - BOTTOM + 16, run.pk,
        ))
    return _frame(f"{runs[-1].suite if runs else ''}: score of the last {len(runs)} runs", body)
