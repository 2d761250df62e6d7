"""Share tests use the chat's fake gateway and memory's fixtures (a shared
chat's replies queue memory's background job like any other)."""
from tests.memory.conftest import *  # noqa: F401,F403
from tests.memory.conftest import _close_thread_connections  # noqa: F401 (autouse)
