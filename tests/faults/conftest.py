"""Fixtures for the fault tests: a fake remote model (the gateway's real
path) for the restart test, the scripted gateway for the stream tests (with
whatever fixtures it needs), and a clean gateway state around each test."""
from tests.conversations.conftest import *  # noqa: F401,F403
from tests.gateway.conftest import _close_thread_connections, _fresh_gateway_state, fake_openai, remote  # noqa: F401
