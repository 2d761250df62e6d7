"""Per-minute rollups: what a minute holds, re-running, late rows, retention."""
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from dashboard import services
from dashboard.models import MinuteRollup
from tests.dashboard.helpers import ledger_row

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_minute_per_model_counts_outcomes_tokens_money_and_latency_percentiles(db):
    for ttft in (100, 200, 300, 400):
        ledger_row(at=T0 + timedelta(seconds=ttft / 10), ttft_ms=ttft, itl_ms=ttft / 10)
    ledger_row(at=T0 + timedelta(seconds=50), status="error", ttft_ms=None, itl_ms=None, cost="0")
    ledger_row(at=T0 + timedelta(seconds=51), status="abort", ttft_ms=250)
    # A cache hit counts as a request and a hit, never in the latency percentiles.
    ledger_row(at=T0 + timedelta(seconds=52), cache_hit="exact", ttft_ms=1, itl_ms=None, cost="0",
               saved_cache=Decimal("0.02"))
    ledger_row(at=T0 + timedelta(seconds=30), backend="large", ttft_ms=900, cost="1.5")
    ledger_row(at=T0 + timedelta(minutes=1, seconds=5), ttft_ms=50)

    written = services.rollup_minutes(now=T0 + timedelta(minutes=2), since=T0)
    assert written == 3
    small = MinuteRollup.objects.get(minute=T0, model="small")
    assert (small.requests, small.completed, small.errors, small.aborted, small.cache_hits) == (7, 5, 1, 1, 1)
    assert small.prompt_tokens == 70 and small.completion_tokens == 35
    assert small.ttft_p50_ms == 250  # of 100, 200, 300, 400 and the abort's 100: not the hit's 1
    assert small.ttft_p95_ms > 300 and small.itl_p50_ms == 20
    assert small.cost == Decimal("0.05") and small.saved_cache == Decimal("0.02")
    assert MinuteRollup.objects.get(minute=T0, model="large").ttft_p50_ms == 900
    assert MinuteRollup.objects.get(minute=T0 + timedelta(minutes=1)).requests == 1


def test_the_open_minute_waits_and_late_rows_are_folded_in_on_the_next_pass(db):
    ledger_row(at=T0 + timedelta(seconds=10))
    ledger_row(at=T0 + timedelta(minutes=1, seconds=10))  # in the minute still open at T0 + 1:30
    services.rollup_minutes(now=T0 + timedelta(minutes=1, seconds=30), since=T0)
    assert list(MinuteRollup.objects.values_list("minute", "requests")) == [(T0, 1)]
    ledger_row(at=T0 + timedelta(seconds=59))  # committed late, into a minute already rolled up
    services.rollup_minutes(now=T0 + timedelta(minutes=2, seconds=1))  # `since` from the newest rollup
    assert list(MinuteRollup.objects.values_list("minute", "requests")) == [(T0, 2), (T0 + timedelta(minutes=1), 1)]
    services.rollup_minutes(now=T0 + timedelta(minutes=2, seconds=1))  # idempotent
    assert MinuteRollup.objects.count() == 2


def test_the_first_pass_backfills_the_retention_window_and_pruning_drops_older_rollups(db, settings):
    settings.ROLLUP_RETENTION_DAYS = 2
    now = T0 + timedelta(days=10)
    ledger_row(at=now - timedelta(days=5))  # older than retention: never rolled up
    ledger_row(at=now - timedelta(days=1))
    services.rollup_minutes(now=now)
    assert MinuteRollup.objects.count() == 1
    MinuteRollup.objects.create(minute=now - timedelta(days=3), model="small", requests=1)
    assert services.rollup_prune(now=now) == 1
    assert MinuteRollup.objects.count() == 1


def test_the_beat_task_rolls_up_and_prunes(db, settings):
    from dashboard.tasks import rollup

    ledger_row(at=datetime.now(UTC) - timedelta(minutes=2))
    rollup.apply()
    assert MinuteRollup.objects.filter(requests=1).exists()
    assert "dashboard.tasks.rollup" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}
