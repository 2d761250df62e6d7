import pytest

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
    # The gateway's database work runs on its own threads, whose connections
    # would otherwise stay open and block dropping the test database
    # (asgiref's sync thread: tests/conftest.py).
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
