"""The staff dashboard: staff only (404 for everyone else), every chart drawn from rollups."""
import re
from datetime import UTC, datetime, timedelta

import pytest

from dashboard import services
from feedback import services as feedback_services
from tests.dashboard.helpers import ledger_row
from tests.feedback.conftest import make_thread


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("sam", password="sam-pass-123", is_staff=True)


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def seed(alice, bob):
    now = datetime.now(UTC)
    for minutes in range(2, 40, 3):
        ledger_row(at=now - timedelta(minutes=minutes), user=alice, ttft_ms=100 + minutes, prompt_tokens=100)
        ledger_row(at=now - timedelta(minutes=minutes), user=bob, backend="large", ttft_ms=400 + minutes,
                   cost="0.2", saved_routing="0.05")
    ledger_row(at=now - timedelta(minutes=5), user=bob, cache_hit="semantic", saved_cache="0.3", cost="0")
    ledger_row(at=now - timedelta(minutes=6), user=bob, status="error")
    services.rollup_minutes(now=now)
    _, _, reply = make_thread(alice)
    feedback_services.feedback_set(user=alice, message=reply, rating="up")


@pytest.mark.parametrize("who", ["anonymous", "alice"])
def test_everyone_but_staff_gets_404(client, alice, who):
    if who == "alice":
        client.force_login(alice)
    assert client.get("/staff/dashboard/").status_code == 404
    assert client.get("/staff/dashboard/engines").status_code == 404


def test_staff_see_every_chart_drawn(staff_client, alice, bob):
    seed(alice, bob)
    response = staff_client.get("/staff/dashboard/?hours=6")
    assert response.status_code == 200
    html = response.content.decode()
    for title in ("Time to first token", "Inter-token latency", "Tokens per day per model", "Cache hit rate",
                  "Errors, stops and interrupts", "Top users by tokens", "Feedback per day",
                  "Spend per model", "Saved"):
        assert title in html, title
    assert len(re.findall(r'<path class="series s\d" d="M[\d.]+,[\d.]+ L', html)) >= 4
    assert re.search(r">alice<", html) and "100% thumbs up" in html
    assert "No data in this range" not in html
    assert "<script>" not in html and " style=" not in html.split("<main", 1)[1]


def test_an_empty_dashboard_says_so(staff_client):
    html = staff_client.get("/staff/dashboard/").content.decode()
    assert "No data in this range" in html


def test_a_bad_range_is_a_clear_400(staff_client):
    response = staff_client.get("/staff/dashboard/?hours=5")
    assert response.status_code == 400 and "hours must be one of 1, 6, 24, 168, 720" in response.content.decode()


def test_the_live_engine_panel_reports_the_pools(staff_client):
    html = staff_client.get("/staff/dashboard/engines").content.decode()
    assert 'hx-trigger="every 5s"' in html and "small" in html
