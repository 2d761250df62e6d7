"""Static files come from the app itself (ServeStatic, straight from the
finders), through the same ASGI middleware stack as every page."""
import re

import pytest
from django.test import AsyncClient

from tests.hops import thread_hops

pytestmark = pytest.mark.django_db(transaction=True)


def _assets(html: str) -> list[str]:
    return re.findall(r'<(?:script[^>]*src|link[^>]*href)="(/static/[^"]+)"', html)


async def test_every_script_and_stylesheet_of_the_chat_page_is_served(alice):
    from asgiref.sync import sync_to_async

    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    page = await client.get("/")
    assets = _assets(page.content.decode())
    # htmx and its SSE extension from django-htmx, and the chat's own script and styles.
    assert any("django_htmx/htmx" in a for a in assets) and any("hx-sse" in a for a in assets)
    assert "/static/js/chat.js" in assets and any(a.endswith(".css") for a in assets)
    await client.alogout()  # no session needed: the sign-in page uses them too
    for url in assets:
        response = await client.get(url)
        assert response.status_code == 200, url
        body = b"".join([chunk async for chunk in response.streaming_content])
        assert len(body) > 100, url
        kind = "text/css" if url.endswith(".css") else "javascript"
        assert kind in response["Content-Type"], (url, response["Content-Type"])
        assert "max-age" in response["Cache-Control"]
        # A revalidation costs nothing.
        again = await client.get(url, headers={"If-None-Match": response["ETag"]})
        assert again.status_code == 304


async def test_an_unknown_static_file_is_404():
    response = await AsyncClient().get("/static/js/nothing-here.js")
    assert response.status_code == 404


def test_djangos_middleware_is_adapted_once_not_per_method(caplog, settings):
    """Django's own middleware runs as one synchronous block: Django adapts
    the stack where it changes mode (around the async ServeStatic, and into
    the views), not each MiddlewareMixin's process_request/process_response
    on every request."""
    from django.core.handlers.asgi import ASGIHandler
    from django.utils.deprecation import MiddlewareMixin
    from django.utils.module_loading import import_string

    for path in settings.MIDDLEWARE:
        cls = import_string(path)
        if issubclass(cls, MiddlewareMixin):
            assert not cls.async_capable and cls.sync_capable, path
    settings.DEBUG = True  # Django reports each adaptation only then
    with caplog.at_level("DEBUG", logger="django.request"):
        ASGIHandler()  # loads the middleware, in async mode
    adapted = sorted(r.getMessage() for r in caplog.records if "adapted" in r.getMessage())
    # Only where the mode changes: ServeStatic (async, under the request
    # context) calls the one run of Django's classes (SecurityMiddleware
    # first), which calls the async middleware and views under it. (Django
    # names the middleware that is given the adapted handler; django-csp's
    # CSPMiddleware ends that run: it is a MiddlewareMixin like Django's own.)
    assert adapted == [
        "Asynchronous handler adapted for middleware csp.middleware.CSPMiddleware.",
        "Synchronous handler adapted for middleware servestatic.middleware.ServeStaticMiddleware.",
    ]


async def test_a_new_chat_costs_a_few_thread_hops(alice, monkeypatch):
    """The chat's busiest POST: the one sync block, CSRF's process_view, the
    rate limit (both counters in one trip), saving the turn and rendering the
    new chat (one trip each), the signals. No hop to re-read the user for
    login_required, none for its test."""
    from asgiref.sync import sync_to_async

    from conversations import turns

    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    await client.get("/")
    monkeypatch.setattr(turns, "start_reply", lambda *args, **kwargs: None)
    hops = thread_hops(monkeypatch)
    response = await client.post("/c/new", {"text": "hello"}, headers={"HX-Request": "true"})
    assert response.status_code == 200, response.content[:300]
    assert not any("login_required" in hop or "QuerySet" in hop for hop in hops), hops
    assert hops.count("convert_exception_to_response.<locals>.inner") == 1, hops
    assert len(hops) <= 8, hops


def test_static_files_carry_the_security_headers(client):
    response = client.get("/static/js/chat.js")
    assert response.status_code == 200
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


async def test_a_page_costs_a_few_thread_hops_not_one_per_middleware_method(alice, monkeypatch):
    from asgiref.sync import sync_to_async

    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    await client.get("/")  # warm: the URL resolver, templates
    hops = thread_hops(monkeypatch)
    response = await client.get("/")
    assert response.status_code == 200
    # The request_started signal, into SecurityMiddleware, into the run of
    # Django's classes below ServeStatic, CSRF's process_view, the (sync) view,
    # closing the response. One hop per middleware method made it 16.
    assert len(hops) <= 6, hops
