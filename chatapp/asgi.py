"""ASGI entry point: Django for ordinary HTTP, Channels consumers for SSE streams."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs the app registry)
from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.urls import re_path  # noqa: E402

from chatapp.routing import http_stream_patterns  # noqa: E402


class ApiHandler(ASGIHandler):
    """Django for /v1, with settings.API_MIDDLEWARE in place of MIDDLEWARE
    (the same URLs, views and error handling)."""

    def load_middleware(self, is_async=False):
        # Django reads the list from settings; it is swapped only while this
        # handler is built, once, at import, before anything is served.
        site_middleware = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = site_middleware


api_asgi_app = ApiHandler()

application = ProtocolTypeRouter(
    {
        # No Channels auth middleware: Django's own authenticates its views,
        # and the stream consumers look their user up themselves, on the
        # chat's database threads (see conversations.consumers._load).
        "http": URLRouter([*http_stream_patterns(), re_path(r"^v1/", api_asgi_app), re_path(r"", django_asgi_app)]),
    }
)
