"""ASGI entry point: Django for ordinary HTTP, Channels consumers for SSE streams."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from chatapp.routing import http_stream_patterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": AuthMiddlewareStack(
            URLRouter([*http_stream_patterns(), re_path(r"", django_asgi_app)])
        ),
    }
)
