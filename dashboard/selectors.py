"""Reads for the staff dashboard: rollups folded into chart series.

A range of H hours is drawn with at most MAX_POINTS points per line: minutes
are merged into buckets, counts summed and latency percentiles averaged,
weighted by the requests that generated (an approximation: percentiles do
not add up exactly).
"""
from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from chatapp import runtime
from dashboard.charts import Series
from dashboard.models import MinuteRollup
from feedback.selectors import ratio_by_day
from gateway.selectors import top_users_by_tokens

RANGES_HOURS = (1, 6, 24, 24 * 7, 24 * 30)
MAX_POINTS = 240
MIN_DAILY_DAYS = 14  # daily charts show at least two weeks, whatever the range
LATENCY_FIELDS = ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")
OUTCOMES = (("errors", "errors"), ("aborted", "stopped / interrupted"), ("blocked", "blocked / filtered"))


def _bucket_s(hours: int) -> int:
    return 60 * max(1, math.ceil(hours * 60 / MAX_POINTS))


def time_series(*, start: datetime, hours: int) -> dict:
    """Latency per model, cache hit rate and outcomes, bucketed over the range."""
    size = _bucket_s(hours)
    origin = start.timestamp()
    latency: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    totals: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in MinuteRollup.objects.filter(minute__gte=start).iterator(chunk_size=2000):
        t = origin + (r.minute.timestamp() - origin) // size * size
        generated = r.requests - r.cache_hits
        for name in LATENCY_FIELDS:
            value = getattr(r, name)
            if value is not None and generated > 0:
                acc = latency[(r.model, name)][t]
                acc[0] += value * generated
                acc[1] += generated
        for name in ("requests", "cache_hits", *(f for f, _ in OUTCOMES)):
            totals[t][name] += getattr(r, name)

    def lines(kind: str) -> list[Series]:
        out = []
        for (model, name), buckets in sorted(latency.items()):
            if name.startswith(kind):
                label = f"{model or '—'} {name.split('_')[1]}"
                out.append(Series(label, [(t, s / n) for t, (s, n) in sorted(buckets.items()) if n]))
        return out

    return {
        "ttft": lines("ttft"),
        "itl": lines("itl"),
        "cache_rate": [Series("cache hit rate", [(t, 100 * v["cache_hits"] / v["requests"])
                                                 for t, v in sorted(totals.items()) if v["requests"]])],
        "outcomes": [Series(label, [(t, v[name]) for t, v in sorted(totals.items())]) for name, label in OUTCOMES],
        "x_range": (origin, timezone.now().timestamp()),
    }


def tokens_per_day(*, since: datetime) -> tuple[list[str], list[Series]]:
    rows = list(MinuteRollup.objects.filter(minute__gte=since).order_by().annotate(day=TruncDate("minute"))
                .values("day", "model").annotate(tokens=Sum("prompt_tokens") + Sum("completion_tokens")))
    days = sorted({r["day"] for r in rows})
    index = {d: i for i, d in enumerate(days)}
    by_model: dict[str, Series] = {}
    for r in rows:
        by_model.setdefault(r["model"], Series(r["model"] or "—")).points.append((index[r["day"]], r["tokens"] or 0))
    return [d.strftime("%m-%d") for d in days], [by_model[m] for m in sorted(by_model)]


def money(*, since: datetime) -> dict:
    """Spend per model, and what each saving kind kept off the bill."""
    rows = list(MinuteRollup.objects.filter(minute__gte=since).order_by().values("model")
                .annotate(cost=Sum("cost"), cache=Sum("saved_cache"), prefix=Sum("saved_prefix"),
                          routing=Sum("saved_routing")).order_by("-cost"))
    saved = defaultdict(Decimal)
    for r in rows:
        for kind in ("cache", "prefix", "routing"):
            saved[kind] += r[kind] or 0
    return {
        "spend": [(r["model"] or "—", float(r["cost"] or 0)) for r in rows],
        "saved": [("exact / semantic cache", float(saved["cache"])), ("prefix cache", float(saved["prefix"])),
                  ("routing", float(saved["routing"]))],
    }


def feedback_per_day(*, since: datetime) -> tuple[list[str], list[Series], float | None]:
    rows = ratio_by_day(since=since)
    up, down = sum(r["up"] for r in rows), sum(r["down"] for r in rows)
    days = [r["day"].strftime("%m-%d") for r in rows]
    series = [Series("up", [(i, r["up"]) for i, r in enumerate(rows)]),
              Series("down", [(i, r["down"]) for i, r in enumerate(rows)])]
    return days, series, (100 * up / (up + down) if up + down else None)


def top_users(*, since: datetime, limit: int = 10) -> list[tuple[str, float]]:
    return [(r["user__username"], r["tokens"] or 0) for r in top_users_by_tokens(since=since, limit=limit)]


def engines_live() -> list[dict]:
    """Each pool of this process right now: queue and KV-cache usage (chatapp.runtime's health)."""
    pools = []
    for name, report in runtime.engines_health().items():
        stats = report.get("stats") or {}
        pools.append({
            "name": name, "status": report["status"], "detail": report.get("detail", ""),
            "running": stats.get("running"), "waiting": stats.get("waiting"),
            "max_num_seqs": stats.get("max_num_seqs"), "kv_cache_usage": stats.get("kv_cache_usage"),
            "prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate"),
        })
    return pools


def daily_since(*, start: datetime) -> datetime:
    floor = timezone.now() - timedelta(days=MIN_DAILY_DAYS)
    return min(start, floor).replace(hour=0, minute=0, second=0, microsecond=0)
