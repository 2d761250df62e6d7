"""The audit tests drive the same surfaces as the abuse controls: their fixtures."""
from tests.abuse.conftest import *  # noqa: F401,F403
from tests.abuse.conftest import _close_thread_connections, _fresh_gateway_state  # noqa: F401 (autouse)
