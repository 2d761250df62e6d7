"""Long-lived HTTP (SSE) routes served by Channels consumers instead of Django views."""
from conversations.routing import http_urlpatterns as conversation_streams


def http_stream_patterns() -> list:
    return [*conversation_streams]
