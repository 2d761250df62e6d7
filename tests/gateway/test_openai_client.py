"""Conformance: the official `openai` client, unchanged, against a live server.

The project runs under Daphne in a subprocess; its model is a remote backend
(the fake OpenAI-compatible server on loopback), so no engine is needed here.
"""
import openai
import pytest

from gateway.keys import api_key_create
from tests.gateway.helpers import add_remote, give_plan
from tests.gateway.live import settled, start_daphne, stop
from tests.waiting import eventually_sync


@pytest.fixture(scope="module")
def live_url(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        proc, base = start_daphne()
    yield base
    stop(proc)


@pytest.fixture
def client(live_url, transactional_db, fake_openai, alice):
    add_remote(fake_openai, "remote")
    _, raw = api_key_create(user=alice, name="conformance")
    yield openai.OpenAI(base_url=f"{live_url}/v1", api_key=raw, max_retries=0, timeout=30)
    settled(alice.pk)


def ledger_row(request_id: str):
    """The request's usage row, once the server has written it (beside the reply's end)."""
    from gateway.models import UsageRecord

    return eventually_sync(lambda: UsageRecord.objects.filter(request_id=request_id).first(), timeout_s=10)


def test_non_streamed_completion(client):
    completion = client.chat.completions.create(
        model="remote", messages=[{"role": "user", "content": "hello there"}], max_tokens=20
    )
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 3
    assert completion.model == "remote"


def test_streamed_completion_with_usage(client):
    stream = client.chat.completions.create(
        model="remote", messages=[{"role": "user", "content": "stream this please"}], max_tokens=20,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream this please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4


def test_raw_response_carries_the_rate_limit_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="remote", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert raw.headers["x-ratelimit-limit-tokens"] and raw.headers["x-ratelimit-remaining-requests"]


def test_models_list(client):
    assert "remote" in [m.id for m in client.models.list()]
    assert client.models.retrieve("remote").id == "remote"


def test_bad_key_is_authentication_error(client, live_url):
    bad = openai.OpenAI(base_url=f"{live_url}/v1", api_key="sk-chat-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"


def test_bad_request_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}], temperature=7)


def test_quota_is_rate_limit_error_with_retry_after(client, alice, fresh_minute):
    give_plan(alice, tokens_per_minute=60, requests_per_minute=0)
    client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    response = error.value.response
    assert error.value.code == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-limit-tokens"] == "60"


def test_a_failure_mid_stream_raises_in_the_client(client, fake_openai):
    add_remote(fake_openai, "flaky", remote_model="fake-break")
    stream = client.chat.completions.create(
        model="flaky", messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True
    )
    with pytest.raises(openai.APIError):
        list(stream)
    # The ledger row is written beside the error event, not before it.
    row = ledger_row(stream.response.headers["x-request-id"])
    assert row.status == "error" and row.error


def test_a_client_that_disconnects_mid_stream_stops_the_generation(client, live_url, fake_openai, alice):
    import httpx

    from gateway import quotas

    add_remote(fake_openai, "slow", remote_model="fake-slow")
    body = {"model": "slow", "messages": [{"role": "user", "content": "count"}], "max_tokens": 150, "stream": True}
    with httpx.stream("POST", f"{live_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {client.api_key}"}) as response:
        request_id = response.headers["x-request-id"]
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break
    row = ledger_row(request_id)
    assert row.status == "abort"
    assert 1 <= row.completion_tokens < 150  # the rest was never generated nor charged
    import asyncio

    assert asyncio.run(quotas.current_usage(alice.pk))[2] == row.charged_tokens  # the reservation was settled


def test_no_backend_available_is_503(client, fake_openai):
    add_remote(fake_openai, "broken", remote_model="fake-500")
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 503 and error.value.code == "service_unavailable"
