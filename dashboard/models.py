"""Per-minute rollups of the gateway's ledger, drawn by the staff dashboard (issue 15)."""
from __future__ import annotations

from django.db import models


class MinuteRollup(models.Model):
    """One minute of one serving model: counts, tokens, latency percentiles, money.

    Written by `dashboard.services.rollup_minutes` (Celery beat) from the
    ledger; kept ROLLUP_RETENTION_DAYS. Percentiles leave out cache hits.
    """

    minute = models.DateTimeField()
    model = models.CharField(max_length=64, help_text="the backend that served (empty: none did)")
    requests = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0, help_text="stop or length")
    aborted = models.PositiveIntegerField(default=0, help_text="Stop pressed, reader gone, or interrupted")
    errors = models.PositiveIntegerField(default=0)
    blocked = models.PositiveIntegerField(default=0, help_text="prompt blocked or reply filtered")
    cache_hits = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    ttft_p50_ms = models.FloatField(null=True, blank=True)
    ttft_p95_ms = models.FloatField(null=True, blank=True)
    itl_p50_ms = models.FloatField(null=True, blank=True)
    itl_p95_ms = models.FloatField(null=True, blank=True)
    cost = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_cache = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_prefix = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_routing = models.DecimalField(max_digits=18, decimal_places=9, default=0)

    class Meta:
        ordering = ["minute", "model"]
        constraints = [models.UniqueConstraint(fields=["minute", "model"], name="rollup_minute_model")]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.model}"
