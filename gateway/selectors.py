"""Reads for the settings pages: a user's usage and keys."""
from __future__ import annotations

from datetime import timedelta

from django.db.models import Count, Q, Sum
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
    }


def api_keys_of(*, user):
    return ApiKey.objects.filter(user=user)
