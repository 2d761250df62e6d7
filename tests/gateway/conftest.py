import pytest
from asgiref.sync import SyncToAsync
from django.db import connections

from chatapp import runtime
from tests.gateway.fake_openai import FakeOpenAI
from tests.gateway.helpers import add_remote


@pytest.fixture(scope="session")
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_gateway_state(settings):
    """Registry and circuit breakers are per process: start every test clean."""
    settings.GATEWAY_REGISTRY_TTL_S = 0
    runtime.reset()
    yield
    runtime.reset()


@pytest.fixture(autouse=True)
def _close_thread_connections():
    yield
    # Async ORM calls run on asgiref's single sync thread and the gateway's DB
    # work on its own pool; their connections would otherwise stay open and
    # block dropping the test database.
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()
    runtime.close_db_threads()


@pytest.fixture
def remote(transactional_db, fake_openai, settings):
    """A healthy remote backend named 'remote', the default model."""
    add_remote(fake_openai, "remote")
    settings.DEFAULT_POOL = "remote"
    return fake_openai


@pytest.fixture
def fresh_minute():
    """Per-minute windows are aligned to the clock: a test that needs two
    requests in one window waits out the last seconds of a minute."""
    import time

    if time.time() % 60 > 50:
        time.sleep(60.2 - time.time() % 60)
