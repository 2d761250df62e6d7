"""Dashboard rollups: what a beat pass costs, against a counter upsert on the ledger's write path.

    python -m bench.rollup [--rows 100000] [--days 7]

Runs on a fresh temporary DATA_DIR with the embedded Postgres. Fills the
ledger with `--rows` rows spread over `--days`, then times:
- one beat pass (`dashboard.services.rollup_minutes`, the last few minutes
  recomputed), the way the worker runs it every ROLLUP_INTERVAL_S;
- the first pass (the whole ledger backfilled);
- the alternative: one counter upsert per ledger row on the write path
  (which still could not give latency percentiles), and the ledger insert
  itself for scale.
Prints a table (nothing is written to docs/).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench import report


def _fill(rows: int, days: int) -> None:
    from django.db import connection

    from gateway.models import UsageRecord

    batch = [UsageRecord(request_id=f"r{i}", source="chat", backend=("small", "large")[i % 2], route="default",
                         status="stop", prompt_tokens=100, completion_tokens=50, ttft_ms=100 + i % 200,
                         itl_ms=20.0 + i % 30)
             for i in range(rows)]
    UsageRecord.objects.bulk_create(batch, batch_size=5000)
    minutes = days * 24 * 60
    with connection.cursor() as cursor:  # spread over the days, oldest ids first, as a ledger grows
        cursor.execute(f"UPDATE gateway_usagerecord SET created_at = now() - ({rows} - id) * {minutes}.0 / {rows} "
                       f"* interval '1 minute' - interval '1 second'")
        cursor.execute("VACUUM FULL gateway_usagerecord")  # rows back in time order on disk, as a grown ledger has them
        cursor.execute("VACUUM ANALYZE gateway_usagerecord")


def _times_ms(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _upsert_counter(cursor) -> None:
    cursor.execute(
        "INSERT INTO dashboard_minuterollup (minute, model, requests, completed, aborted, errors, blocked, cache_hits,"
        " prompt_tokens, completion_tokens, cached_tokens, cost, saved_cache, saved_prefix, saved_routing)"
        " VALUES (date_trunc('minute', now()), 'small', 1, 1, 0, 0, 0, 0, 100, 50, 0, 0, 0, 0, 0)"
        " ON CONFLICT (minute, model) DO UPDATE SET requests = dashboard_minuterollup.requests + 1,"
        " prompt_tokens = dashboard_minuterollup.prompt_tokens + 100"
    )


def _run(rows: int, days: int) -> list[tuple]:
    from django.db import connection

    from dashboard import services
    from dashboard.models import MinuteRollup
    from gateway.models import UsageRecord

    _fill(rows, days)
    backfill = _times_ms(services.rollup_minutes, 1)[0]
    written = MinuteRollup.objects.count()
    beat = _times_ms(services.rollup_minutes, 20)
    with connection.cursor() as cursor:
        upsert = _times_ms(lambda: _upsert_counter(cursor), 500)
    insert = _times_ms(lambda: UsageRecord.objects.create(request_id="x", source="chat", backend="small",
                                                          route="", status="stop"), 500)
    return [
        ("first pass (backfill)", f"{backfill:.0f}", f"{written} minute×model rows"),
        ("beat pass, p50", f"{statistics.median(beat):.1f}", "once per ROLLUP_INTERVAL_S, in the worker"),
        ("beat pass, p95", f"{report.percentile(beat, 0.95):.1f}", ""),
        ("write-path counter upsert, p50", f"{statistics.median(upsert):.2f}", "per ledger row, no percentiles"),
        ("ledger insert, p50 (reference)", f"{statistics.median(insert):.2f}", "per ledger row"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="chatapp-bench-")
    os.environ.setdefault("LOAD_MODELS", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    os.environ["ROLLUP_RETENTION_DAYS"] = str(args.days + 1)
    sys.path.insert(0, str(report.ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()
    from django.core.management import call_command

    from chatapp import embedded

    try:
        call_command("migrate", interactive=False, verbosity=0)
        rows = _run(args.rows, args.days)
    finally:
        embedded.stop_configured()
    print(f"{args.rows} ledger rows over {args.days} days. {report.machine_header(report.machine_info())}")
    print(report.table(["what", "ms", "note"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
