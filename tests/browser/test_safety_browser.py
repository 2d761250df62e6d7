"""A reply the content policy stops, in a real Chromium: the notice, and none
of the reply's text, neither at the end of the stream nor after a reload."""
import re

import pytest

from tests.browser.conftest import signup
from tests.gateway.conftest import fake_openai, remote  # noqa: F401  (re-exported fixtures)
from tests.safety import fakes

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def blocking_replies(settings, remote):  # noqa: F811  (the fixture above)
    """The real gateway, its model the fake server (it replies "echo: <message>"),
    and a checker that blocks replies holding "there", seen only by the
    whole-message check at the end: the start of the reply streams first."""
    settings.GATEWAY_REGISTRY_TTL_S = 0
    settings.SAFETY_CHECKERS = ["safety.checkers.RulesChecker", "tests.safety.fakes.Recorder"]
    fakes.reset()
    fakes.MARKERS["output"] = "there"
    yield
    fakes.reset()


def test_a_blocked_reply_shows_the_notice_and_none_of_its_text(page, live, blocking_replies):
    signup(page, live)
    page.fill("#composer-text", "hello there")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    reply = page.locator("article.msg.assistant").last
    page.wait_for_selector("article.msg.assistant.status-blocked")
    assert "Blocked" in reply.locator(".note").inner_text() and "content policy" in reply.locator(".note").inner_text()
    assert reply.locator(".body").inner_text().strip() == ""
    assert "echo" not in reply.inner_text()
    page.reload()
    reply = page.locator("article.msg.assistant").last
    assert "status-blocked" in reply.get_attribute("class")
    assert reply.locator(".body").inner_text().strip() == "" and "echo" not in page.content()
