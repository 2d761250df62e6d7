"""Long-lived HTTP (SSE) routes served by Channels consumers instead of Django views."""


def http_stream_patterns() -> list:
    from conversations.routing import http_urlpatterns as conversation_streams

    return [*conversation_streams]
