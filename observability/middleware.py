"""Request id, log context and requests by view and status.

RequestContextMiddleware comes first and runs in whichever mode its caller
does (under ASGI, on the event loop, before ServeStatic), so that Django's
own middleware after it stays one synchronous block (chatapp.apps): each
switch between async and sync code is a thread hop. UserContextMiddleware
sits inside that block and is sync-only for the same reason. Measured
overhead: `python -m bench.metrics`.
"""
from __future__ import annotations

import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from observability import logs, metrics

UNMATCHED = "unmatched"  # no URL pattern matched: the raw path is never a label


class RequestContextMiddleware:
    """First in MIDDLEWARE: binds a request id (the caller's X-Request-ID when
    sane) for every log line of the request, sends it back as a header, and
    counts the request by resolved view name, method and status."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self._acall(request)
        started = self._start(request)
        return self._finish(request, self.get_response(request), started)

    async def _acall(self, request):
        started = self._start(request)
        return self._finish(request, await self.get_response(request), started)

    @staticmethod
    def _start(request) -> float:
        started = time.perf_counter()
        request_id = logs.request_id_from(request.headers.get(logs.REQUEST_ID_HEADER))
        request.request_id = request_id
        # Cleared at the start, not the end: Django logs a 4xx/5xx response
        # after the middleware returns, and that line needs the ids too. Each
        # ASGI request runs in a context of its own, so nothing leaks.
        logs.clear()
        logs.bind(request_id=request_id)
        return started

    @staticmethod
    def _finish(request, response, started: float):
        # /v1 answers carry the gateway's own request id (OpenAI's header, the
        # usage ledger's key, and never the caller's choice); everything else
        # carries this one.
        if logs.REQUEST_ID_HEADER not in response:
            response[logs.REQUEST_ID_HEADER] = request.request_id
        match = getattr(request, "resolver_match", None)
        metrics.http_request(view=match.view_name if match else UNMATCHED, method=request.method,
                             status=response.status_code, duration_s=time.perf_counter() - started)
        return response

    async def process_view(self, request, view_func, view_args, view_kwargs):
        """The ids in the URL, for the view's log lines. Async: under ASGI
        Django awaits it directly, where a sync one would cost a thread hop."""
        logs.bind(conversation_id=view_kwargs.get("conversation_id"), message_id=view_kwargs.get("message_id"))


class UserContextMiddleware:
    """After AuthenticationMiddleware: the signed-in user's id for the log lines."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            logs.bind(user_id=user.pk)
        return self.get_response(request)
