"""Reads for the settings pages: a user's usage and keys."""
from __future__ import annotations

from datetime import UTC, timedelta

from django.conf import settings
from django.db.models import Aggregate, Count, FloatField, Q, Sum
from django.db.models.functions import Trunc, TruncDate
from django.utils import timezone

from gateway import quotas, registry
from gateway.models import ApiKey, UsageRecord


def usage_summary(*, user) -> dict:
    limits = registry.limits(user.pk)
    used = quotas.current_usage_sync(user.pk)
    now = timezone.now()
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    totals = UsageRecord.objects.filter(user=user, created_at__gte=month_start).aggregate(
        month_tokens=Sum("charged_tokens"),
        month_requests=Count("id"),
        today_tokens=Sum("charged_tokens", filter=Q(created_at__gte=day_start)),
        today_requests=Count("id", filter=Q(created_at__gte=day_start)),
        cache_hits=Count("id", filter=~Q(cache_hit="")),
    )
    windows = [
        ("Requests this minute", used[0], limits.requests_per_minute),
        ("Tokens this minute", used[1], limits.tokens_per_minute),
        ("Tokens today", used[2], limits.tokens_per_day),
        ("Tokens this month", used[3], limits.tokens_per_month),
    ]
    return {
        "limits": limits,
        "windows": [
            {"label": label, "used": value, "limit": limit,
             "percent": min(100, round(100 * value / limit)) if limit else 0}
            for label, value, limit in windows
        ],
        "totals": {k: v or 0 for k, v in totals.items()},
        "recent": UsageRecord.objects.filter(user=user, created_at__gte=now - timedelta(days=31))[:50],
        **spend_of(user=user, since=now - timedelta(days=31)),
    }


def spend_of(*, user, since) -> dict:
    """A user's spend since a moment, by day (newest first) and by model (largest first)."""
    rows = UsageRecord.objects.filter(user=user, created_at__gte=since).order_by()
    by_day = (rows.annotate(day=TruncDate("created_at")).values("day")
              .annotate(cost=Sum("cost"), tokens=Sum("charged_tokens"), requests=Count("id")).order_by("-day"))
    by_model = (rows.exclude(backend="").values("backend")
                .annotate(cost=Sum("cost"), tokens=Sum("charged_tokens"), requests=Count("id"))
                .order_by("-cost", "backend"))
    return {
        "currency": settings.COST_CURRENCY,
        "spend_total": rows.aggregate(total=Sum("cost"))["total"] or 0,
        "spend_by_day": list(by_day),
        "spend_by_model": list(by_model),
    }


class Percentile(Aggregate):
    """PostgreSQL's percentile_cont (continuous, interpolated)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


def ledger_by_minute(*, since, until) -> list[dict]:
    """The ledger folded per minute and serving model, for the dashboard's
    rollups. Latency percentiles leave out cache hits: no model ran."""
    generated = Q(cache_hit="")
    return list(
        UsageRecord.objects.filter(created_at__gte=since, created_at__lt=until).order_by()
        .annotate(minute=Trunc("created_at", "minute", tzinfo=UTC))
        .values("minute", "backend")
        .annotate(
            requests=Count("id"),
            completed=Count("id", filter=Q(status__in=("stop", "length"))),
            aborted=Count("id", filter=Q(status="abort")),
            errors=Count("id", filter=Q(status="error")),
            blocked=Count("id", filter=Q(status__in=("content_filter", "blocked"))),
            cache_hits=Count("id", filter=~generated),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cached_tokens=Sum("cached_tokens"),
            ttft_p50_ms=Percentile("ttft_ms", 0.5, filter=generated),
            ttft_p95_ms=Percentile("ttft_ms", 0.95, filter=generated),
            itl_p50_ms=Percentile("itl_ms", 0.5, filter=generated),
            itl_p95_ms=Percentile("itl_ms", 0.95, filter=generated),
            cost=Sum("cost"),
            saved_cache=Sum("saved_cache"),
            saved_prefix=Sum("saved_prefix"),
            saved_routing=Sum("saved_routing"),
        )
    )


def top_users_by_tokens(*, since, limit: int = 10) -> list[dict]:
    """Users with the most tokens (prompt + completion) since a moment."""
    return list(
        UsageRecord.objects.filter(created_at__gte=since, user__isnull=False).order_by()
        .values("user_id", "user__username")
        .annotate(tokens=Sum("prompt_tokens") + Sum("completion_tokens"), cost=Sum("cost"), requests=Count("id"))
        .order_by("-tokens")[:limit]
    )


def api_keys_of(*, user):
    return ApiKey.objects.filter(user=user)
