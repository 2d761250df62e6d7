"""SSE routes (Channels consumers); mounted by chatapp.asgi before Django."""
from django.urls import path

from conversations.consumers import ReplyStreamConsumer

http_urlpatterns: list = [
    path("c/reply/<uuid:reply_id>/stream", ReplyStreamConsumer.as_asgi(), name="reply_stream"),
]
