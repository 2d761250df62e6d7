import shutil
from pathlib import Path

import pytest
from django.conf import settings

from chatapp import embedded


def pytest_collection_modifyitems(config, items):
    """Browser tests run last. Playwright's sync API keeps an event loop
    marked running on the main thread for as long as the browser lives (a
    session fixture), and every async test collected after it would then
    fail with "Runner.run() cannot be called from a running event loop"."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="session", autouse=True)
def embedded_services():
    """Redis now; Postgres starts lazily on the first connection. Both are
    stopped at the end: they would otherwise outlive the test run."""
    if settings.EMBEDDED_REDIS:
        embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
    yield
    from django.db import connections

    connections.close_all()
    pgdata = settings.DATABASES["default"].get("EMBEDDED_PGDATA")
    if pgdata:
        embedded.stop_postgres(Path(pgdata))
    if settings.EMBEDDED_REDIS:
        embedded.stop_redis(settings.EMBEDDED_REDIS_DIR)
    shutil.rmtree(settings.DATA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clear_cache(request):
    """Each test starts with an empty Redis cache (rate limits, quotas)."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-pass-123")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pass-123")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def bob_client(alice, bob):
    from django.test import Client

    c = Client()
    c.force_login(bob)
    return c


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the bundled GGUF (cached in MODELS_DIR)."""
    from inference.bootstrap import resolve_model

    return resolve_model("bundled:smollm2", settings.MODELS_DIR)
