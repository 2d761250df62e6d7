"""Fixtures for the fault tests: a fake remote model (the gateway's real path)
and a clean gateway state around each test."""
from tests.gateway.conftest import _close_thread_connections, _fresh_gateway_state, fake_openai, remote  # noqa: F401
