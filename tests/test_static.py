"""Static files come from the app itself (ServeStatic, straight from the
finders), through the same ASGI middleware stack as every page."""
import re

import pytest
from django.test import AsyncClient

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


def test_the_middleware_stack_is_async_end_to_end(caplog, settings):
    """No middleware makes Django adapt the chain: one sync-only middleware
    would put every request, async views too, on a thread and back."""
    from django.core.handlers.asgi import ASGIHandler

    settings.DEBUG = True  # Django reports each adaptation only then
    with caplog.at_level("DEBUG", logger="django.request"):
        ASGIHandler().load_middleware(is_async=True)
    adapted = [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]
    assert adapted == []
