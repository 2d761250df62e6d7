import pytest

from chatapp import runtime
from tests.conversations.conftest import fake_gateway, fast_streams, serving_api_in_process  # noqa: F401  (re-exported)
from tests.gateway.conftest import _close_thread_connections, fake_openai, remote  # noqa: F401  (re-exported)
from tests.safety import fakes

RECORDING = ["safety.checkers.RulesChecker", "tests.safety.fakes.Recorder"]


@pytest.fixture(autouse=True)
def _fresh_safety_state(settings):
    """Rules, checkers' verdicts and the recorder start empty in every test;
    the model checkers are off unless a test asks for them (they are scored
    by bench.safety, and loading them costs seconds)."""
    settings.SAFETY_CHECKERS = RECORDING
    settings.GATEWAY_REGISTRY_TTL_S = 0
    settings.SAFETY_RULES_TTL_S = 0
    runtime.reset()
    fakes.reset()
    yield
    fakes.reset()
    runtime.reset()
