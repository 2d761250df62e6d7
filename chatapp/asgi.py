"""ASGI entry point: Django for ordinary HTTP, Channels consumers for SSE streams."""
import os
from concurrent.futures import ThreadPoolExecutor

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django.setup(set_prefix=False)  # what django.core.asgi.get_asgi_application does before its handler

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs the app registry)
from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.db import close_old_connections, reset_queries  # noqa: E402
from django.urls import re_path  # noqa: E402

from chatapp.routing import http_stream_patterns  # noqa: E402
from inference import arrivals  # noqa: E402  (no torch: marks only)


def drop_request_started_receivers() -> None:
    """Disconnect Django's two request_started receivers, which do nothing
    under its ASGI handler but start a thread.

    The handler runs each request inside asgiref's ThreadSensitiveContext,
    so the request's synchronous work (the signal's sync receivers, the
    middleware block, closing the response) runs on a thread of that
    request's (lent by REQUEST_THREADS, below), and Django's connections are
    per thread: reset_queries and close_old_connections find no connection
    there to reset or close, the last request's having been given back when
    it finished. Yet sending them switched to that thread and back before
    the middleware ran, and beside a busy engine every switch waits for a core.
    The connections a request borrows are still given back: request_finished
    keeps close_old_connections, and runs on the request's thread when the
    response is closed. Only the server loads this module; management
    commands and Celery keep Django's receivers."""
    signals.request_started.disconnect(reset_queries)
    signals.request_started.disconnect(close_old_connections)


drop_request_started_receivers()


class RequestThreads:
    """Threads lent to requests, one each, for their thread-sensitive sync
    work, and kept for the next request instead of ending with this one.

    Django's handler enters a new asgiref ThreadSensitiveContext for each
    request: its first thread-sensitive call (a page's middleware block, a
    /v1 response's close) starts a thread, and leaving the context starts a
    second one that joins the first. Both starts run on the event loop and
    wait there until the new thread has run, and beside a busy engine that
    thread waits for a core: over a burst of 32 new chats through the page,
    about 130 thread starts held the loop about 200 ms in all, most of it
    while the chats were being admitted.

    A request still has one thread to itself for its whole life (its
    database connection, its thread-locals), as under Django's own handler;
    the thread just outlives it. `limit` idle threads are kept; more are
    shut down when given back. A task that a request started and that
    outlives it gets asgiref's RuntimeError from a thread-sensitive call
    instead of a thread lent to another request: long-lived work starts in a
    context of its own (conversations.turns.start_reply)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._idle: list[ThreadPoolExecutor] = []

    def lend(self) -> ThreadPoolExecutor:
        if self._idle:
            return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        if len(self._idle) < self.limit:
            self._idle.append(executor)
        else:
            executor.shutdown(wait=False)

    def idle(self) -> int:
        return len(self._idle)


REQUEST_THREADS = RequestThreads()


class PageHandler(ASGIHandler):
    """Django's ASGI handler, each request's sync work on a thread lent by
    REQUEST_THREADS rather than on one started for it."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = REQUEST_THREADS.lend()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            REQUEST_THREADS.give_back(executor)


django_asgi_app = PageHandler()


class ApiHandler(PageHandler):
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


def marked_on_its_way(app):
    """`app`, with each POST marked on its way to this process's engines
    (inference.arrivals) from before its middleware until its prompt reaches
    an engine or its response starts: meanwhile an engine on the CPU starts no
    step that only decodes, so the request's web work and then its prompt's
    step have the cores. A chat's send and an API call are POSTs; other POSTs
    (a rename, a sign-in) hold the decodes until they are answered, and every
    mark lets go after EngineConfig.arrival_hold_ms whatever happens."""

    async def marked(scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await app(scope, receive, send)
        arrival = arrivals.expect()

        async def send_and_release(message):
            if message["type"] == "http.response.start":
                arrival.release()
            await send(message)

        try:
            return await app(scope, receive, send_and_release)
        finally:
            arrival.release()

    return marked

application = ProtocolTypeRouter(
    {
        # No Channels auth middleware: Django's own authenticates its views,
        # and the stream consumers look their user up themselves, on the
        # chat's database threads (see conversations.consumers._load).
        "http": URLRouter([*http_stream_patterns(), re_path(r"^v1/", marked_on_its_way(api_asgi_app)),
                           re_path(r"", marked_on_its_way(django_asgi_app))]),
    }
)
