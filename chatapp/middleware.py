"""Middleware of the whole site."""
from __future__ import annotations

import functools

from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpResponse
from django.middleware.security import SecurityMiddleware
from asgiref.sync import iscoroutinefunction, markcoroutinefunction

# SQLSTATE class 53: insufficient resources (53100 disk full, 53200 out of memory).
OUT_OF_RESOURCES = "53"

DISK_FULL = ("The server is out of storage space, so nothing was saved. "
             "Your text is still here: try again later.")
DB_DOWN = ("The database is unreachable right now, so nothing was saved. "
           "Your text is still here: try again in a moment.")
RETRY_AFTER_S = 30


def _trouble_message(exc: Exception) -> str | None:
    """What a user should read when `exc` means the database cannot store
    anything right now; None for errors that are bugs (they stay 500s)."""
    if not isinstance(exc, DatabaseError):
        return None
    sqlstate = getattr(exc.__cause__, "sqlstate", None) or ""
    if sqlstate.startswith(OUT_OF_RESOURCES):
        return DISK_FULL
    if isinstance(exc, (OperationalError, InterfaceError)):
        return DB_DOWN
    return None


class DatabaseTroubleMiddleware:
    """A database that is full or gone answers 503 with a sentence the chat
    page shows in the composer, instead of a bare "Server Error" page. The
    write that failed was one transaction, so nothing is half-stored; the
    page keeps the user's text because only a 200 clears the composer.

    Sync and async, and not a MiddlewareMixin: it only passes the request
    on, so it must cost no adaptation (no thread hop) in either mode."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)  # a coroutine in async mode, awaited by the caller

    def process_exception(self, request, exception):
        message = _trouble_message(exception)
        if message is None:
            return None
        response = HttpResponse(message, status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = str(RETRY_AFTER_S)
        if request.headers.get("HX-Request"):
            response["HX-Retarget"] = "#composer-error"
            response["HX-Reswap"] = "innerHTML"
        return response


class LoadedUserMiddleware:
    """After AuthenticationMiddleware, in Django's synchronous block: loads
    the signed-in user there, on the request's thread, and gives async views
    that same object through `request.auser()`. Django's own `auser` queries
    the user again (its cache is separate from `request.user`'s), through a
    thread hop, on every async view behind login_required."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.user.is_authenticated  # evaluates the lazy user here
        request.auser = functools.partial(_loaded_user, request)
        return self.get_response(request)


async def _loaded_user(request):
    return request.user


class InlineSecurityMiddleware(SecurityMiddleware):
    """SecurityMiddleware (the https redirect, HSTS, nosniff, Referrer-Policy,
    COOP), run on the event loop: its methods only read settings and set
    headers, so the API's stack (settings.API_MIDDLEWARE) need not hop to a
    thread for them as MiddlewareMixin's async path does."""

    sync_capable = False
    async_capable = True

    async def __acall__(self, request):
        response = self.process_request(request)
        if response is None:
            response = await self.get_response(request)
        return self.process_response(request, response)
