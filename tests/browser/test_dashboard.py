"""The staff dashboard in Chromium: every chart drawn as SVG with real paths, screenshot kept."""
from datetime import UTC, datetime, timedelta

import pytest

from chatapp import runtime
from dashboard import services
from feedback import services as feedback_services
from tests.browser.conftest import ARTIFACTS, signup
from tests.dashboard.helpers import ledger_row
from tests.feedback.conftest import make_thread

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def _close_gateway_db():
    yield
    runtime.close_db_threads()


def seed(user):
    now = datetime.now(UTC)
    for minutes in range(2, 300, 4):
        ledger_row(at=now - timedelta(minutes=minutes), user=user, ttft_ms=120 + minutes % 50,
                   itl_ms=15 + minutes % 7, prompt_tokens=200 + minutes, completion_tokens=80)
        ledger_row(at=now - timedelta(minutes=minutes), user=user, backend="large", ttft_ms=400 + minutes % 90,
                   itl_ms=40 + minutes % 11, cost="0.2", saved_routing="0.05",
                   status="error" if minutes % 40 == 2 else "stop")
        if minutes % 12 == 2:
            ledger_row(at=now - timedelta(minutes=minutes), user=user, cache_hit="exact", cost="0",
                       saved_cache="0.02")
    services.rollup_minutes(now=now)
    _, _, reply = make_thread(user)
    feedback_services.feedback_set(user=user, message=reply, rating="up")


def test_staff_open_the_dashboard_and_every_chart_is_drawn(page, live, django_user_model):
    signup(page, live, username="ops")
    # Staff by the admin's hand: off a loopback bind the first sign-up is no admin.
    django_user_model.objects.filter(username="ops").update(is_staff=True)
    seed(django_user_model.objects.get(username="ops"))
    page.goto(live + "/staff/dashboard/?hours=6")
    page.wait_for_selector("svg.chart")
    charts = page.locator("figure.chart-box")
    assert charts.count() >= 9
    drawn = page.eval_on_selector_all(
        "svg.chart path.series, svg.chart path.bar",
        "paths => paths.filter(p => (p.getAttribute('d') || '').length > 10 && p.getBBox().width > 0).length",
    )
    assert drawn >= 8
    lines = page.eval_on_selector_all("svg.chart path.series", "ps => ps.map(p => p.getTotalLength())")
    assert lines and all(length > 0 for length in lines)
    assert page.locator("text=No data in this range").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_a_user_rates_a_finished_reply_in_the_chat(page, live, django_user_model):
    signup(page, live, username="rita")
    conversation, _, reply = make_thread(django_user_model.objects.get(username="rita"))
    page.goto(f"{live}/c/{conversation.id}/")
    page.click(f"#m-{reply.id} button[aria-label='Bad reply']")
    page.wait_for_selector(f"#m-{reply.id} button[aria-label='Bad reply'][aria-pressed=true]")
    page.select_option(f"#m-{reply.id} select[name=category]", "inaccurate")
    page.fill(f"#m-{reply.id} textarea[name=comment]", "Tomatoes need more than that.")
    page.click(f"#m-{reply.id} details button:text('Save')")
    page.wait_for_selector(f"#m-{reply.id} summary:text('Feedback saved')")
    from feedback.models import Feedback

    feedback = Feedback.objects.get()
    assert (feedback.rating, feedback.category) == (-1, "inaccurate")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feedback-widget.png"))


def test_the_rating_buttons_appear_when_a_streamed_reply_ends(page, live, fake_gateway):
    fake_gateway.script = [f"w{i} " for i in range(120)]
    fake_gateway.delay_s = 0.03
    signup(page, live, username="sid")
    page.fill("#composer-text", "Say something")
    page.keyboard.press("Enter")
    page.wait_for_selector("article.msg.assistant .body.streaming")
    # Hidden while generating (read in one step: the reply may end at any moment).
    shown = page.evaluate("""() => {
        const reply = document.querySelector('article.msg.assistant');
        return reply.dataset.stream ? getComputedStyle(reply.querySelector('form.feedback')).display : 'ended';
    }""")
    assert shown in ("none", "ended")
    page.wait_for_selector("article.msg.assistant.status-complete")
    page.click("article.msg.assistant button[aria-label='Good reply']")
    page.wait_for_selector("article.msg.assistant button[aria-label='Good reply'][aria-pressed=true]")
    from feedback.models import Feedback

    assert Feedback.objects.get().rating == 1
