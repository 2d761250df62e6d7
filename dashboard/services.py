"""Writes: fold the ledger into per-minute rollups, prune old ones.

Run by Celery beat every ROLLUP_INTERVAL_S (`dashboard.tasks.rollup`), not on
the ledger's write path: latency percentiles need a minute's rows together,
and one grouped query per minute costs the request path nothing (figures in
docs/ARCHITECTURE.md). Ledger rows are committed asynchronously after their
reply ends, so each pass recomputes the last few closed minutes too:
an upsert makes that idempotent.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from dashboard.models import MinuteRollup
from gateway.selectors import ledger_by_minute

# Ledger rows land up to a few seconds after their minute ends (asynchronous
# commit after the reply); recomputing this many closed minutes catches them.
RECOMPUTE_MINUTES = 3
FIELDS = [f.name for f in MinuteRollup._meta.get_fields() if f.name not in ("id", "minute", "model")]


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def rollup_minutes(*, now: datetime | None = None, since: datetime | None = None) -> int:
    """Upsert the rollups of every closed minute from `since` (default: a
    little before the newest rollup; the whole retention window on the first
    run) up to now. Returns the number of (minute, model) rows written."""
    now = now or timezone.now()
    until = _floor_minute(now)
    if since is None:
        newest = MinuteRollup.objects.order_by("-minute").values_list("minute", flat=True).first()
        oldest_kept = until - timedelta(days=settings.ROLLUP_RETENTION_DAYS)
        since = max(newest - timedelta(minutes=RECOMPUTE_MINUTES), oldest_kept) if newest else oldest_kept
    rows = [
        MinuteRollup(minute=row.pop("minute"), model=row.pop("backend"), **row)
        for row in ledger_by_minute(since=_floor_minute(since), until=until)
    ]
    with transaction.atomic():
        MinuteRollup.objects.bulk_create(
            rows, batch_size=1000, update_conflicts=True, unique_fields=["minute", "model"], update_fields=FIELDS,
        )
    return len(rows)


def rollup_prune(*, now: datetime | None = None) -> int:
    """Delete rollups older than ROLLUP_RETENTION_DAYS; returns how many."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.ROLLUP_RETENTION_DAYS)
    deleted, _ = MinuteRollup.objects.filter(minute__lt=cutoff).delete()
    return deleted
