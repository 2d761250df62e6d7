"""The account's settings pages: usage and API keys (ownership, CSRF, rate limit)."""
from django.test import Client
from django.urls import reverse

from gateway.keys import api_key_create
from gateway.models import ApiKey, UsageRecord


def test_the_usage_page_shows_limits_and_the_ledger(alice_client, alice):
    UsageRecord.objects.create(user=alice, request_id="r1", source="api", model="", backend="small",
                               route="default:small", status="stop", prompt_tokens=11, completion_tokens=22,
                               charged_tokens=33, ttft_ms=12)
    response = alice_client.get(reverse("usage"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Tokens this minute" in page and "small" in page and "33" in page and "12 ms" in page


def test_the_usage_page_needs_a_login(client):
    response = client.get(reverse("usage"))
    assert response.status_code == 302


def test_creating_a_key_shows_it_once(alice_client, alice):
    response = alice_client.post(reverse("api_keys"), {"name": "laptop"})
    assert response.status_code == 200
    key = ApiKey.objects.get(user=alice)
    raw = response.context["new_key"]
    assert raw.startswith("sk-chat-") and raw in response.content.decode()
    page = alice_client.get(reverse("api_keys")).content.decode()
    assert raw not in page and key.prefix in page and "laptop" in page


def test_it_rejects_revoking_another_users_key(alice, bob_client):
    key, _ = api_key_create(user=alice, name="mine")
    response = bob_client.post(reverse("api_key_revoke", args=[key.pk]))
    assert response.status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_revoking_a_key(alice_client, alice):
    key, _ = api_key_create(user=alice, name="mine")
    response = alice_client.post(reverse("api_key_revoke", args=[key.pk]))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_key_creation_needs_csrf(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(reverse("api_keys"), {"name": "x"}).status_code == 403
    assert not ApiKey.objects.exists()


def test_the_pages_are_rate_limited(alice_client, settings):
    # A day-long window: django-ratelimit staggers window ends per key, so a
    # minute's could end between two of these requests and reset the count.
    settings.GATEWAY_PAGE_RATE = "2/d"
    assert alice_client.get(reverse("api_keys")).status_code == 200
    assert alice_client.get(reverse("api_keys")).status_code == 200
    response = alice_client.get(reverse("api_keys"))
    assert response.status_code == 429 and response["Retry-After"]


def test_the_pages_keep_the_addresses_users_know(alice_client):
    assert alice_client.get("/settings/usage/").status_code == 200
    assert alice_client.get("/settings/api-keys/").status_code == 200
