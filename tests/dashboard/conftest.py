from tests.gateway.conftest import (  # noqa: F401  (the gateway's fixtures, re-exported)
    _close_thread_connections,
    _fresh_gateway_state,
    fake_openai,
    remote,
)
