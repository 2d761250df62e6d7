"""Fixtures for the fault tests: a fake remote model (the gateway's real
path) for the restart test, the scripted gateway for the stream tests, and
a clean gateway state around each test."""
from tests.conversations.conftest import fake_gateway, fast_streams  # noqa: F401
from tests.gateway.conftest import _close_thread_connections, _fresh_gateway_state, fake_openai, remote  # noqa: F401
