"""Health probes for /healthz: each returns (ok, detail)."""
from __future__ import annotations

import os

from django.conf import settings
from django.core.cache import cache
from django.db import connection

from chatapp import runtime
from retrieval import services as retrieval_services
from safety import featurizer
from safety import services as safety_services


def check_database() -> tuple[bool, str]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True, "ok"
    except Exception as exc:  # any driver error means "down" to a probe
        return False, f"{type(exc).__name__}: {exc}"


def check_redis() -> tuple[bool, str]:
    try:
        client = cache._cache.get_client(write=True)
        client.ping()
        return True, "ok"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def check_all() -> tuple[bool, dict]:
    db_ok, db_detail = check_database()
    redis_ok, redis_detail = check_redis()
    pool_report = runtime.engines_health()
    ok = db_ok and redis_ok and all(p["status"] == "ok" for p in pool_report.values())
    return ok, {
        "status": "ok" if ok else "degraded",
        "database": {"status": "ok" if db_ok else "down", "detail": db_detail},
        "redis": {"status": "ok" if redis_ok else "down", "detail": redis_detail},
        "model_pools": pool_report,
        # Which of the port's web processes answered (WEB_PROCESSES): each checks its own pools and models.
        "process": {"pid": os.getpid(), "web_processes": settings.WEB_PROCESSES},
        # MiniLM's number format, once loaded (retrieval.minilm): what "auto" chose and on what timings.
        # Each moderation checker "ok" or why it could not be built (its
        # categories then fail as SAFETY_FAIL_CLOSED says); null until loaded.
        "moderation": {"checkers": safety_services.checkers_report()},
        "embeddings": {"retrieval": retrieval_services.report(), "moderation_shallow": featurizer.shallow_report(),
                       # Forwards run on a local CPU engine's thread between its steps, and those it did not take.
                       "on_engine_thread": runtime.lending_report()},
    }


def public_report(report: dict) -> dict:
    """What anyone may see: up or down, per part. Exceptions, model paths and
    engine statistics are for staff and loopback callers (chatapp.views)."""
    return {
        "status": report["status"],
        "database": {"status": report["database"]["status"]},
        "redis": {"status": report["redis"]["status"]},
        "model_pools": {name: {"status": pool["status"]} for name, pool in report["model_pools"].items()},
    }
