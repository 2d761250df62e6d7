"""Fixtures for the chat tests.

`fake_gateway` replaces the gateway's client (the edge of this app) with a
scripted generator that honours abort like the engine does; the generation
tests that need the real engine use the `chat_engine` fixture instead.
"""
from __future__ import annotations

import asyncio
import functools
import json
import re

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import ApplicationCommunicator

from chatapp import runtime
from conversations import services, streams
from conversations.models import Message
from gateway import client as gateway_client
from gateway.types import FinalEvent, ModelInfo, TokenEvent, Usage


class FakeGateway:
    def __init__(self):
        self.script = ["Hello", ", ", "world", "!"]
        self.delay_s = 0.0
        self.error_before = None  # a GatewayError raised before the first token
        self.fail_after = None  # finish_reason "error" after this many tokens
        self.context_window = 2048
        self.aborted: set[str] = set()
        self.requests = []
        self.completions: list[str] = []
        self.yielded: list[int] = []  # per stream, the tokens it had yielded when it ended or was closed

    async def stream(self, request):
        self.requests.append(request)
        if self.error_before is not None:
            raise self.error_before
        sent = 0
        # Background tasks (titles, summaries) get the scripted completions.
        script = [self.completions.pop(0)] if request.source == "task" and self.completions else self.script
        try:
            for piece in script:
                await asyncio.sleep(self.delay_s)
                if request.request_id in self.aborted:
                    yield FinalEvent("abort", Usage(prompt_tokens=7, completion_tokens=sent), "small")
                    return
                if self.fail_after is not None and sent >= self.fail_after:
                    yield FinalEvent("error", Usage(prompt_tokens=7, completion_tokens=sent), "small",
                                     error="backend died")
                    return
                sent += 1
                yield TokenEvent(piece)
            yield FinalEvent("stop", Usage(prompt_tokens=7, completion_tokens=sent), "small")
        finally:
            self.yielded.append(sent)

    def abort(self, request_id):
        self.aborted.add(request_id)

    def model_info(self, model=None):
        return ModelInfo(name=model or "small", context_window=self.context_window)

    def count_prompt_tokens(self, messages, model=None):
        # Words + a per-message template overhead: monotonic like the real count.
        return sum(len(m["content"].split()) + 4 for m in messages) + 2

    def available_models(self, user_id=None):
        return ["small"]

    async def aavailable_models(self, user_id=None):
        return ["small"]

    def default_model(self):
        return "small"

    def background_model(self):
        return "small"

    def complete(self, request):
        self.requests.append(request)
        text = self.completions.pop(0) if self.completions else "A summary."
        return text, FinalEvent("stop", Usage(prompt_tokens=5, completion_tokens=3), "small")


class ServingApiInProcess(httpx.BaseTransport):
    """The serving process's API, here: a background task's HTTP request
    goes through Django's test client to the real /v1 views."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        from django.test import Client

        skip = {"content-length", "content-type"}
        response = Client().generic(
            request.method, request.url.raw_path.decode(), data=request.read(),
            content_type=request.headers.get("content-type", ""),
            headers={name: value for name, value in request.headers.items() if name.lower() not in skip},
        )
        return httpx.Response(response.status_code, headers=dict(response.items()), content=response.content)


@pytest.fixture
def serving_api_in_process(monkeypatch):
    from conversations import tasks

    monkeypatch.setattr(tasks, "serving_api", functools.partial(tasks.serving_api, transport=ServingApiInProcess()))


@pytest.fixture
def fake_gateway(settings, serving_api_in_process):
    """The fake behind the gateway's client, which the chat's turns and the
    API (where background tasks reach it over HTTP) both use."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    with gateway_client.use(FakeGateway()) as fake:
        yield fake


@pytest.fixture
def fast_streams(settings):
    settings.STREAM_HEARTBEAT_S = 0.2
    settings.STREAM_GRACE_S = 1.0
    settings.STREAM_MATERIALIZE_S = 0.05
    return settings


# ------------------------------------------------------------ SSE helpers

def sse_app():
    from conversations.routing import http_urlpatterns

    return URLRouter(http_urlpatterns)


def open_stream(reply_id, *, user, last_event_id=None, query: str = ""):
    headers = [(b"host", b"testserver")]
    if last_event_id is not None:
        headers.append((b"last-event-id", str(last_event_id).encode()))
    scope = {
        "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": f"/c/reply/{reply_id}/stream", "raw_path": f"/c/reply/{reply_id}/stream".encode(),
        "query_string": query.encode(), "root_path": "", "headers": headers, "user": user,
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    return ApplicationCommunicator(sse_app(), scope)


def parse_sse(raw: bytes) -> list[dict]:
    frames = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        frame = {"comments": []}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comments"].append(line[1:].strip())
            elif ":" in line:
                k, v = line.split(":", 1)
                frame[k] = v.strip()
        if "data" in frame:
            frame["data"] = json.loads(frame["data"])
        frames.append(frame)
    return frames


async def read_stream(comm, *, timeout_s: float = 10.0, stop_after=None) -> tuple[dict, bytes]:
    """Start the request and read until the response ends (or `stop_after(raw)`)."""
    await comm.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await comm.receive_output(timeout_s)
    raw = b""
    if start["type"] != "http.response.start":
        raise AssertionError(start)
    while True:
        msg = await comm.receive_output(timeout_s)
        raw += msg.get("body", b"")
        if not msg.get("more_body"):
            break
        if stop_after is not None and stop_after(raw):
            break
    return start, raw


def events_of(raw: bytes) -> list[dict]:
    return [f for f in parse_sse(raw) if "event" in f]


def text_of(raw: bytes) -> str:
    return "".join(f["data"]["t"] for f in events_of(raw) if f["event"] == "token")


def reply_shown_live_or_whole(html: str) -> bool:
    """Whether a page shows the turn's reply either streaming (the element
    htmx's SSE extension attaches to) or, where the instant fake gateway
    finished it before the page was rendered (seen on a loaded CI box),
    already complete. A reply that errored, or no reply at all, is neither."""
    article = re.search(r'<article class="msg assistant status-(\w+)"[^>]*>', html)
    if article is None:
        return False
    status, tag = article.group(1), article.group(0)
    return ((status in ("pending", "streaming") and "data-stream=" in tag)
            or (status == "complete" and "data-stream=" not in tag))


async def has_streamed_text(reply_id) -> bool:
    """Whether a token of the reply is in its event log (what readers get)."""
    return any(ev.event == "token" for ev in await streams.read_after(reply_id, 0))


@pytest.fixture(autouse=True)
def _close_thread_connections():
    """The chat's database threads keep their connections; close them so the
    test database can be dropped (asgiref's sync thread: tests/conftest.py)."""
    yield
    runtime.close_db_threads()


@sync_to_async
def new_reply(user, text="Hi"):
    """A new chat with `text` and its pending reply (the placeholder)."""
    conversation = services.conversation_create(user=user)
    return services.message_send(conversation=conversation, text=text)


@sync_to_async
def load(reply_id):
    return Message.objects.get(id=reply_id)
