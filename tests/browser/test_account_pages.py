"""The account's settings pages in Chromium: create a key (shown once), revoke it, read usage."""
import pytest

from chatapp import runtime

from tests.browser.conftest import ARTIFACTS, signup

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def _close_gateway_db():
    yield
    runtime.close_db_threads()


def test_a_user_creates_sees_once_and_revokes_an_api_key_then_reads_usage(page, live):
    signup(page, live, username="dora")
    page.goto(live + "/settings/api-keys/")
    page.fill("input[name=name]", "laptop script")
    page.click("text=Create key")
    key = page.inner_text("code.new-key")
    assert key.startswith("sk-chat-")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "account-api-keys.png"), full_page=True)
    page.goto(live + "/settings/api-keys/")
    assert key not in page.content() and "laptop script" in page.content()
    page.click("text=Revoke")
    page.wait_for_selector("text=revoked")
    page.goto(live + "/settings/usage/")
    assert "Tokens this minute" in page.content()
    page.screenshot(path=str(ARTIFACTS / "account-usage.png"), full_page=True)
