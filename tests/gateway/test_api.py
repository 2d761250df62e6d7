"""The OpenAI-compatible API through Django's async test client (same process)."""
import json

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.test import AsyncClient

from gateway.keys import api_key_create
from gateway.models import ApiKey, UsageRecord
from tests.gateway.helpers import give_plan


@pytest.fixture
def alice_key(alice):
    return api_key_create(user=alice, name="test")[1]


def auth(key):
    return {"headers": {"Authorization": f"Bearer {key}"}}


async def post(key, body, client=None):
    client = client or AsyncClient()
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return await client.post("/v1/chat/completions", raw, content_type="application/json", **auth(key))


def hello(**extra):
    return {"model": "remote", "messages": [{"role": "user", "content": "hello there"}], **extra}


async def test_it_answers_a_non_streamed_completion(remote, alice_key):
    response = await post(alice_key, hello(max_tokens=20))
    assert response.status_code == 200, response.content
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello there", "refusal": None}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 3
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 3
    assert response["x-ratelimit-limit-tokens"] and response["x-request-id"]
    row = await UsageRecord.objects.aget(request_id=response["x-request-id"])
    assert row.source == "api" and row.backend == "remote" and row.api_key_id is not None


async def test_it_streams_sse_chunks_with_usage_and_done(remote, alice_key):
    response = await post(alice_key, hello(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    events = [line[6:] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hello there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_a_missing_or_wrong_key_is_401(remote):
    response = await AsyncClient().post("/v1/chat/completions", json.dumps(hello()), content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    response = await post("sk-chat-not-a-real-key", hello())
    assert response.status_code == 401


async def test_a_revoked_key_is_401(remote, alice, alice_key):
    await ApiKey.objects.filter(user=alice).aupdate(revoked_at="2026-01-01T00:00:00Z")
    assert (await post(alice_key, hello())).status_code == 401


async def models_status(key) -> int:
    return (await AsyncClient().get("/v1/models", **auth(key))).status_code


async def test_a_known_key_is_answered_from_the_key_cache(remote, alice, alice_key):
    """Verified once, a key is not looked up again for a while: a change made
    behind the product's back (a bulk update sends no signal) is not seen."""
    assert await models_status(alice_key) == 200
    await ApiKey.objects.filter(user=alice).aupdate(revoked_at="2026-01-01T00:00:00Z")
    assert await models_status(alice_key) == 200


async def test_a_key_revoked_after_use_is_refused_at_once(remote, alice, alice_key):
    from gateway.keys import api_key_revoke

    assert await models_status(alice_key) == 200
    key = await ApiKey.objects.aget(user=alice)
    await sync_to_async(api_key_revoke)(user=alice, key_id=key.pk)
    assert await models_status(alice_key) == 401


async def test_the_ip_counter_and_the_key_cache_are_read_in_one_wait(remote, alice_key, monkeypatch):
    """The per-IP counter waits here until the key's cache lookup has been
    sent: one after the other (the lookup after the counter's answer), the
    request would never get past the counter."""
    import asyncio

    from gateway import api, ratelimits

    lookup_sent = asyncio.Event()
    real_hit, real_remembered = ratelimits.hit, api.aremembered

    async def hit(**kwargs):
        if kwargs["group"] == "api-ip":
            await asyncio.wait_for(lookup_sent.wait(), 10)
        return await real_hit(**kwargs)

    async def remembered(raw):
        lookup_sent.set()
        return await real_remembered(raw)

    monkeypatch.setattr(ratelimits, "hit", hit)
    monkeypatch.setattr(api, "aremembered", remembered)
    assert await models_status(alice_key) == 200
    assert await models_status(alice_key) == 200  # the second from the key cache


async def test_without_redis_a_call_is_refused_503_not_let_through(remote, alice_key, monkeypatch):
    """The request counters fail closed, like the token quotas behind them."""
    import redis.asyncio as aredis

    from chatapp import runtime
    from tests.gateway.live import free_port

    dead = aredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)  # nothing listens there
    monkeypatch.setattr(runtime, "redis_async", lambda: dead)
    response = await AsyncClient().get("/v1/models", **auth(alice_key))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"


async def test_over_its_ip_limit_a_request_never_reaches_the_key_table(remote, alice_key, settings, monkeypatch,
                                                                      fresh_minute):
    """Unknown keys sent past the per-IP limit are refused 429 by the counter
    alone: the key's cache entry is read beside it, the database only within
    the limit."""
    from gateway import keys

    settings.GATEWAY_API_RATE_PER_IP = "2/m"
    looked_up = []
    real_authenticate = keys._authenticate
    monkeypatch.setattr(keys, "_authenticate", lambda key_hash: looked_up.append(key_hash) or real_authenticate(key_hash))
    statuses = [await models_status(f"sk-chat-unknown-{i}") for i in range(5)]
    assert statuses == [401, 401, 429, 429, 429]
    assert len(looked_up) == 2
    assert await models_status(alice_key) == 429  # a good key past the IP's limit too


async def test_a_deleted_key_is_refused_at_once(remote, alice, alice_key):
    assert await models_status(alice_key) == 200
    await (await ApiKey.objects.aget(user=alice)).adelete()
    assert await models_status(alice_key) == 401


async def test_a_deactivated_users_key_is_refused_at_once_and_back_on_reactivation(remote, alice, alice_key):
    assert await models_status(alice_key) == 200
    alice.is_active = False
    await alice.asave(update_fields=["is_active"])
    assert await models_status(alice_key) == 401
    alice.is_active = True
    await alice.asave()
    assert await models_status(alice_key) == 200


async def test_a_revocation_that_rolls_back_leaves_the_key_working(remote, alice, alice_key):
    from django.db import transaction

    from gateway.keys import api_key_revoke

    assert await models_status(alice_key) == 200
    key = await ApiKey.objects.aget(user=alice)

    def revoke_then_fail():
        with transaction.atomic():
            api_key_revoke(user=alice, key_id=key.pk)
            raise RuntimeError("the rest of the change failed")

    with pytest.raises(RuntimeError):
        await sync_to_async(revoke_then_fail)()
    assert await models_status(alice_key) == 200


async def test_an_unknown_model_is_404(remote, alice_key):
    response = await post(alice_key, hello(model="gpt-17"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    "{not json",
    {"model": "remote"},
    {"model": "remote", "messages": []},
    {"model": "remote", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "remote", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
    {"model": "remote", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
    {"model": "remote", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"messages": [{"role": "user", "content": "x"}]},
])
async def test_bad_requests_are_400_with_a_message(remote, alice_key, body):
    response = await post(alice_key, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


async def test_an_exhausted_token_budget_is_429_with_retry_after_and_ratelimit_headers(remote, alice, alice_key,
                                                                                       fresh_minute):
    await sync_to_async(give_plan)(alice, tokens_per_minute=100, requests_per_minute=0)
    first = await post(alice_key, hello(max_tokens=60))
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]  # reserved ~66, refunded to what was used
    assert first["x-ratelimit-remaining-tokens"] == str(100 - used)
    response = await post(alice_key, hello(max_tokens=88))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response["Retry-After"]) <= 60
    wait_s = int(response["Retry-After"])
    assert f"Try again in {wait_s} second{'s' if wait_s != 1 else ''}." in response.json()["error"]["message"]
    assert response["x-ratelimit-limit-tokens"] == "100"
    assert response["x-ratelimit-remaining-tokens"] == str(100 - used)
    assert response["x-ratelimit-reset-tokens"].endswith("s")


async def test_a_streamed_reply_sends_the_rate_headers_its_admission_counted(remote, alice, alice_key, fresh_minute,
                                                                            monkeypatch):
    """Streamed, the x-ratelimit-* headers go out before the first chunk: the
    windows as this request's admission left them (its reservation counted),
    not read from Redis a second time on the way to the first token."""
    from gateway import quotas

    await sync_to_async(give_plan)(alice, tokens_per_minute=100, requests_per_minute=10)

    async def read_again(*args, **kwargs):
        raise AssertionError("the quota windows were read again for the headers")

    monkeypatch.setattr(quotas, "headers_for", read_again)
    response = await post(alice_key, hello(max_tokens=60, stream=True))
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    assert body.endswith("data: [DONE]\n\n")
    assert response["x-ratelimit-limit-requests"] == "10"
    assert response["x-ratelimit-remaining-requests"] == "9"
    assert response["x-ratelimit-limit-tokens"] == "100"
    # Its prompt and all 60 tokens it may write were reserved when the headers were taken.
    assert 0 <= int(response["x-ratelimit-remaining-tokens"]) <= 40
    assert response["x-ratelimit-reset-tokens"].endswith("s")


async def test_a_spent_monthly_budget_is_insufficient_quota(remote, alice, alice_key):
    await sync_to_async(give_plan)(alice, tokens_per_month=100, tokens_per_minute=0, tokens_per_day=0)
    assert (await post(alice_key, hello(max_tokens=60))).status_code == 200
    response = await post(alice_key, hello(max_tokens=90))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_quota"


async def test_models_lists_what_the_plan_allows(remote, alice, alice_key):
    response = await AsyncClient().get("/v1/models", **auth(alice_key))
    ids = [m["id"] for m in response.json()["data"]]
    assert "remote" in ids and "small" in ids
    await sync_to_async(give_plan)(alice, allowed_models="remote")
    response = await AsyncClient().get("/v1/models", **auth(alice_key))
    assert [m["id"] for m in response.json()["data"]] == ["remote"]
    assert (await AsyncClient().get("/v1/models/small", **auth(alice_key))).status_code == 404
    assert (await post(alice_key, hello(model="small"))).status_code == 404
    assert (await AsyncClient().get("/v1/models/remote", **auth(alice_key))).json()["id"] == "remote"


async def test_unknown_api_routes_are_json_404(remote, alice_key):
    response = await AsyncClient().get("/v1/audio/speech", **auth(alice_key))
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_the_per_user_http_rate_limit_answers_429(remote, alice_key, settings, fresh_minute):
    settings.GATEWAY_API_RATE_PER_USER = "2/m"
    client = AsyncClient()
    assert (await client.get("/v1/models", **auth(alice_key))).status_code == 200
    assert (await client.get("/v1/models", **auth(alice_key))).status_code == 200
    response = await client.get("/v1/models", **auth(alice_key))
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1


async def test_a_failure_after_the_first_token_is_an_error_not_a_truncation(transactional_db, fake_openai, settings,
                                                                            alice_key):
    from tests.gateway.helpers import add_remote

    await sync_to_async(add_remote)(fake_openai, "flaky", remote_model="fake-break")
    response = await post(alice_key, {**hello(), "model": "flaky"})
    assert response.status_code == 502
    response = await post(alice_key, {**hello(), "model": "flaky", "stream": True})
    body = b"".join([c async for c in response.streaming_content]).decode()
    assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
    assert '"finish_reason": "stop"' not in body


def test_create_api_key_prints_a_working_key_once(db, alice, capsys):
    call_command("create_api_key", "alice", "--name", "ops")
    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get(user=alice)
    assert raw.startswith("sk-chat-") and key.name == "ops"
    assert raw not in key.key_hash and key.prefix == raw[:12]


async def test_an_oversized_body_is_413_in_the_api_shape(remote, alice_key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = await post(alice_key, hello(messages=[{"role": "user", "content": "x" * 5000}]))
    assert response.status_code == 413 and response.json()["error"]["message"]


async def test_nulls_for_optional_fields_are_accepted(remote, alice_key):
    body = hello(n=None, stream=None, stop=None, temperature=None, max_tokens=None, stream_options=None, seed=None)
    response = await post(alice_key, body)
    assert response.status_code == 200, response.content


def test_complete_works_from_sync_code_like_a_celery_task(remote, alice):
    from gateway.services import complete
    from gateway.types import PRIORITY_BACKGROUND, ChatRequest

    text, final = complete(ChatRequest(messages=[{"role": "user", "content": "a title please"}], user_id=alice.pk,
                                       temperature=0, priority=PRIORITY_BACKGROUND, source="task"))
    assert text == "echo: a title please" and final.finish_reason == "stop"
    assert UsageRecord.objects.get(request_id__isnull=False).source == "task"


async def test_a_rate_window_of_several_seconds_counts_and_resets(remote, alice_key, settings):
    """The API's counters take every rate the settings accept: 2 requests per 3 s here."""
    import asyncio

    settings.GATEWAY_API_RATE_PER_USER = "2/3s"
    client = AsyncClient()
    # A window opens with its first request and lasts 3 s.
    statuses = [(await client.get("/v1/models", **auth(alice_key))).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = await client.get("/v1/models", **auth(alice_key))
    assert refused.status_code == 429 and 1 <= int(refused["Retry-After"]) <= 3
    await asyncio.sleep(int(refused["Retry-After"]) + 0.05)
    assert (await client.get("/v1/models", **auth(alice_key))).status_code == 200
