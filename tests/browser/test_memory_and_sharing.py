"""Memory and share links in a real Chromium: a suggested memory accepted on
the Memory page and then used in a new chat; a share link opened by a
logged-out visitor, revoked by its owner, and gone (404)."""
import functools
import re
import time

import pytest

from memory import tasks as memory_tasks
from memory.models import Memory
from retrieval.services import embed
from tests.browser.conftest import signup
from tests.conversations.conftest import ServingApiInProcess

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def memory_serving_api_in_process(monkeypatch):
    monkeypatch.setattr(memory_tasks, "serving_api",
                        functools.partial(memory_tasks.serving_api, transport=ServingApiInProcess()))


def _send(page, text):
    page.fill("#composer-text", text)
    page.keyboard.press("Enter")


def _wait_until(condition, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        time.sleep(0.05)


def test_an_accepted_suggestion_is_used_in_a_new_chat(page, live, fake_gateway):
    # Accepting embeds the memory; the first embedding of a process loads
    # MiniLM and torch (tens of seconds on a busy box): load it here, once.
    embed(["warm up"])
    fake_gateway.completions = ["Moving to Lisbon", "- I live in Lisbon"]  # the title, then the suggestions
    signup(page, live)
    _send(page, "I just moved to Lisbon and need a good bakery.")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    page.wait_for_selector("article.msg.assistant.status-complete")
    _wait_until(lambda: Memory.objects.filter(text="I live in Lisbon", status="suggested").exists())

    page.goto(live + "/memory/")
    suggestion = page.locator("li.memory.suggestion", has_text="I live in Lisbon")
    suggestion.locator("button.accept").click()
    page.wait_for_selector("li.memory.active")
    assert page.locator("li.memory.active textarea").input_value() == "I live in Lisbon"
    assert page.locator("li.memory.suggestion").count() == 0

    page.goto(live + "/")
    _send(page, "Where do I live?")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    page.wait_for_selector("article.msg.assistant.status-complete")
    used = page.locator("article.msg.assistant details.memory-used")
    assert used.locator("summary").inner_text() == "Used 1 memory"
    used.locator("summary").click()
    assert used.locator("li").inner_text() == "I live in Lisbon"
    chat = [r for r in fake_gateway.requests if r.source == "chat"][-1]
    assert "- I live in Lisbon" in chat.messages[0]["content"]


def test_a_share_link_opens_logged_out_and_404s_once_revoked(page, live, fake_gateway, browser_instance):
    fake_gateway.script = ["Knead ", "the ", "dough."]
    signup(page, live)
    _send(page, "How do I make bread?")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    page.wait_for_selector("article.msg.assistant.status-complete")
    page.click("details.menu > summary")
    page.click("button.share")
    url = page.locator("input.share-url").input_value()
    assert re.fullmatch(re.escape(live) + r"/s/[A-Za-z0-9_-]{43}/", url)

    visitor = browser_instance.new_context()
    try:
        anon = visitor.new_page()
        response = anon.goto(url)
        assert response.status == 200 and response.headers["x-robots-tag"] == "noindex, nofollow"
        assert anon.locator("article.msg.assistant").inner_text() == "Knead the dough."
        assert anon.locator("meta[name=robots]").get_attribute("content") == "noindex, nofollow"
        assert anon.locator(".sidebar").count() == 0 and anon.locator("text=Continue this chat").count() == 1

        page.goto(live + "/shares/")
        page.click("li.share-item button.revoke")
        page.wait_for_selector("text=No shared links")
        assert anon.reload().status == 404
    finally:
        visitor.close()
