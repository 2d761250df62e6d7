"""SSE routes (Channels consumers); mounted by chatapp.asgi before Django.

Django's URL resolver does not know these paths: templates build them with
the `stream_url` tag from STREAM_PATH.
"""
from django.urls import path

from conversations.consumers import ReplyStreamConsumer

STREAM_PATH = "c/reply/{reply_id}/stream"

http_urlpatterns: list = [
    path(STREAM_PATH.replace("{reply_id}", "<uuid:reply_id>"), ReplyStreamConsumer.as_asgi(), name="reply_stream"),
]
