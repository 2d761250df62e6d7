"""The staff dashboard: rollups drawn as server-rendered SVG. Anyone else gets 404."""
from __future__ import annotations

from datetime import timedelta
from functools import wraps

from django.conf import settings
from django.http import Http404, HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone

from dashboard import charts, selectors


def staff_only(view):
    """404, not 403 or a login redirect: the page does not exist for others."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not (request.user.is_authenticated and request.user.is_active and request.user.is_staff):
            raise Http404("No such page")
        return view(request, *args, **kwargs)

    return wrapper


def _charts(hours: int) -> dict:
    start = timezone.now() - timedelta(hours=hours)
    daily = selectors.daily_since(start=start)
    ts = selectors.time_series(start=start, hours=hours)
    days, tokens = selectors.tokens_per_day(since=daily)
    fb_days, fb_series, fb_ratio = selectors.feedback_per_day(since=daily)
    money = selectors.money(since=start)
    currency = f" {settings.COST_CURRENCY}"
    return {
        "ttft": charts.line_chart("Time to first token (ms), p50 / p95 per model", ts["ttft"], x_range=ts["x_range"]),
        "itl": charts.line_chart("Inter-token latency (ms), p50 / p95 per model", ts["itl"], x_range=ts["x_range"]),
        "tokens": charts.bar_chart("Tokens per day per model", days, tokens),
        "cache_rate": charts.line_chart("Cache hit rate (%)", ts["cache_rate"], x_range=ts["x_range"], unit="%"),
        "outcomes": charts.line_chart("Errors, stops and interrupts (requests)", ts["outcomes"], x_range=ts["x_range"]),
        "top_users": charts.hbar_chart("Top users by tokens", selectors.top_users(since=start)),
        "feedback": charts.bar_chart("Feedback per day", fb_days, fb_series),
        "spend": charts.hbar_chart(f"Spend per model ({settings.COST_CURRENCY})", money["spend"], unit=currency),
        "saved": charts.hbar_chart(f"Saved ({settings.COST_CURRENCY})", money["saved"], unit=currency),
        "feedback_ratio": fb_ratio,
    }


def _engines() -> dict:
    pools = selectors.engines_live()
    up = [p for p in pools if p["status"] == "ok" and p["running"] is not None]
    queue = [(f"{p['name']} {kind}", p[kind]) for p in up for kind in ("running", "waiting")]
    kv = [(p["name"], 100 * (p["kv_cache_usage"] or 0)) for p in up]
    return {
        "engines": pools,
        "queue_chart": charts.hbar_chart("Engine queue now (sequences)", queue) if queue else None,
        "kv_chart": charts.hbar_chart("KV-cache usage now (%)", kv, unit="%", top=100) if kv else None,
    }


@staff_only
def dashboard(request):
    try:
        hours = int(request.GET.get("hours", 24))
    except ValueError:
        hours = -1
    if hours not in selectors.RANGES_HOURS:
        allowed = ", ".join(map(str, selectors.RANGES_HOURS))
        return HttpResponseBadRequest(f"hours must be one of {allowed}", content_type="text/plain")
    context = {"hours": hours, "ranges": selectors.RANGES_HOURS, "retention_days": settings.ROLLUP_RETENTION_DAYS,
               **_engines(), **_charts(hours)}
    return render(request, "dashboard/dashboard.html", context)


@staff_only
def engines(request):
    """The live engine panel alone, polled by htmx every few seconds."""
    return render(request, "dashboard/_engines.html", _engines())
