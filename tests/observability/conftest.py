"""Helpers for the observability tests: scrape /metrics and read one series."""
from __future__ import annotations

from django.test import AsyncClient, Client
from prometheus_client.parser import text_string_to_metric_families

# The chat's and the gateway's fixtures, reused as they are.
from tests.conversations.conftest import (  # noqa: F401
    _close_thread_connections,
    fake_gateway,
    fast_streams,
    serving_api_in_process,
)
from tests.gateway.conftest import _fresh_gateway_state, fake_openai, fresh_minute, remote  # noqa: F401


def value(text: str, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels`
    (0 when there are none: a series appears on its first update)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                total += sample.value
    return total


def scrape() -> str:
    response = Client().get("/metrics")
    assert response.status_code == 200, response.status_code
    return response.content.decode()


async def ascrape() -> str:
    response = await AsyncClient().get("/metrics")
    assert response.status_code == 200, response.status_code
    return response.content.decode()
