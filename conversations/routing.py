"""SSE routes (Channels consumers); mounted by chatapp.asgi."""

http_urlpatterns: list = []
