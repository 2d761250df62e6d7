"""ASGI entry point: Django for ordinary HTTP, Channels consumers for SSE streams."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs the app registry)
from django.urls import re_path  # noqa: E402

from chatapp.routing import http_stream_patterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # No Channels auth middleware: Django's own authenticates its views,
        # and the stream consumers look their user up themselves, on the
        # chat's database threads (see conversations.consumers._load).
        "http": URLRouter([*http_stream_patterns(), re_path(r"", django_asgi_app)]),
    }
)
