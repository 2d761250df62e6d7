from datetime import datetime
from decimal import Decimal

from gateway.models import UsageRecord


def ledger_row(*, at: datetime, backend="small", user=None, status="stop", cache_hit="", ttft_ms=100, itl_ms=20.0,
               prompt_tokens=10, completion_tokens=5, cost="0.01", **extra) -> UsageRecord:
    """A ledger row written at `at` (created_at is auto_now_add, so it is set after)."""
    row = UsageRecord.objects.create(
        user=user, request_id="r", source="chat", backend=backend, route="default", status=status,
        cache_hit=cache_hit, ttft_ms=ttft_ms, itl_ms=itl_ms, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, cost=Decimal(cost), **extra,
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=at)
    return row
