"""The registry `/metrics` renders: every process's values plus the pools' state."""
from __future__ import annotations

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from observability import multiprocess
from observability.engine import PoolCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    """The Prometheus text format. A fresh registry per scrape, as
    prometheus-client's multiprocess mode asks: the files are read now."""
    multiprocess.forget_dead_processes()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(settings.METRICS_DIR))
    registry.register(PoolCollector())
    return generate_latest(registry)
