"""GET /metrics: open to loopback, a bearer token for everyone else, 404 otherwise."""
import pytest

from tests.observability.conftest import value

OUTSIDE = "203.0.113.9"
TOKEN = "metrics-token-for-tests"


def test_loopback_callers_scrape_without_a_token(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert "# TYPE chatapp_sse_streams_open gauge" in text  # series with labels appear on their first update


def test_other_callers_get_404_without_the_token(client, settings):
    settings.METRICS_TOKEN = TOKEN
    assert client.get("/metrics", REMOTE_ADDR=OUTSIDE).status_code == 404
    assert client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION="Bearer wrong").status_code == 404
    assert client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=TOKEN).status_code == 404  # no scheme
    response = client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200 and b"chatapp_" in response.content


def test_without_a_configured_token_only_loopback_gets_in(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION="Bearer ").status_code == 404
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200


def test_a_request_relayed_by_a_local_proxy_needs_the_token(client, settings):
    settings.METRICS_TOKEN = TOKEN
    proxied = {"HTTP_X_FORWARDED_FOR": OUTSIDE}
    assert client.get("/metrics", **proxied).status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **proxied).status_code == 200


def test_metrics_disabled_answers_404_and_counts_nothing(client, settings):
    before = client.get("/metrics").content.decode()
    settings.METRICS_ENABLED = False
    assert client.get("/metrics").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    settings.METRICS_ENABLED = True
    after = client.get("/metrics").content.decode()
    assert value(after, "chatapp_http_requests_total", view="unmatched") == value(
        before, "chatapp_http_requests_total", view="unmatched")


@pytest.mark.parametrize("path,view", [("/c/code.css", "code_css"), ("/no/such/page", "unmatched")])
def test_requests_are_counted_by_view_name_never_by_raw_path(client, path, view):
    before = client.get("/metrics").content.decode()
    status = client.get(path).status_code
    after = client.get("/metrics").content.decode()
    labels = {"view": view, "method": "GET", "status": status}
    assert value(after, "chatapp_http_requests_total", **labels) == value(
        before, "chatapp_http_requests_total", **labels) + 1
    assert "/no/such/page" not in after
