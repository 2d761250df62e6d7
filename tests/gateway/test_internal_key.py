"""The internal credential: the product's own background jobs (titles and
summaries from the Celery worker) call the API as no user, at background
priority, and nothing else can pass for them."""
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from gateway import services
from gateway.keys import INTERNAL_KEY_PREFIX, api_key_create, internal_api_key
from gateway.models import UsageRecord
from gateway.types import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE
from tests.gateway.test_api import auth, hello, post


@pytest.fixture
def seen_requests(monkeypatch):
    """The ChatRequests the API hands the gateway (the gateway itself still runs)."""
    seen = []
    real = services.stream_chat

    def recording(request):
        seen.append(request)
        return real(request)

    monkeypatch.setattr(services, "stream_chat", recording)
    return seen


async def test_background_jobs_run_as_no_user_at_background_priority(remote, seen_requests):
    response = await post(internal_api_key(), hello(max_tokens=20))
    assert response.status_code == 200, response.content
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello there"
    (request,) = seen_requests
    assert (request.priority, request.source, request.user_id) == (PRIORITY_BACKGROUND, "task", None)
    # No quota, so no x-ratelimit headers; ledgered like any task.
    assert not [name for name in response.headers if name.startswith("x-ratelimit")]
    row = await UsageRecord.objects.aget(request_id=response["x-request-id"])
    assert (row.source, row.user_id, row.api_key_id, row.status) == ("task", None, None, "stop")


async def test_a_user_key_stays_interactive(remote, alice, seen_requests):
    key = (await sync_to_async(api_key_create)(user=alice, name="test"))[1]
    assert (await post(key, hello(max_tokens=5))).status_code == 200
    assert (seen_requests[0].priority, seen_requests[0].source) == (PRIORITY_INTERACTIVE, "api")


async def test_nothing_else_passes_for_the_internal_key(remote):
    real = internal_api_key()
    for token in (
        INTERNAL_KEY_PREFIX + "0" * 64,  # the shape, not the secret
        real[:-1] + ("0" if real[-1] != "0" else "1"),  # one character off
        real[:-1],
        real + "0",
        INTERNAL_KEY_PREFIX,
    ):
        response = await post(token, hello())
        assert response.status_code == 401, token
        assert response.json()["error"]["code"] == "invalid_api_key"


async def test_the_internal_key_is_not_rate_limited(remote, settings):
    settings.GATEWAY_API_RATE_PER_IP = "1/m"
    for _ in range(3):
        assert (await post(internal_api_key(), hello(max_tokens=5))).status_code == 200


async def test_a_model_card_says_its_context_window(remote):
    response = await AsyncClient().get("/v1/models/remote", **auth(internal_api_key()))
    assert response.status_code == 200
    assert response.json()["context_window"] == 8192  # the Backend row's default

