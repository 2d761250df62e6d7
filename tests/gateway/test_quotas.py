"""Token quotas: reserve before, reconcile after, and the 429 contract."""
import asyncio
import math
import time

import pytest
from asgiref.sync import sync_to_async

from gateway import quotas
from gateway.models import UsageRecord
from gateway.registry import Limits
from gateway.services import abort, stream_chat
from gateway.types import BadRequest, ChatRequest, FinalEvent, QuotaExceeded, RateLimited, TokenEvent, Unavailable, try_again_in
from tests.gateway.helpers import add_remote, collect, give_plan

LIMITS = Limits(plan="t", tier="standard", requests_per_minute=10, tokens_per_minute=100,
                tokens_per_day=1000, tokens_per_month=0)


async def test_retry_after_is_the_time_until_the_minute_window_rolls_over():
    now = 1_800_000_000 // 60 * 60 + 17.25  # 17.25 s into a minute
    ok = await quotas.reserve(user_id=901, limits=LIMITS, tokens=80, now=now)
    assert ok.headers["x-ratelimit-remaining-tokens"] == "20"
    assert ok.headers["x-ratelimit-remaining-requests"] == "9"
    with pytest.raises(RateLimited) as refused:
        await quotas.reserve(user_id=901, limits=LIMITS, tokens=30, now=now)
    error = refused.value
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert error.retry_after_s == math.ceil(60 - 17.25) == 43
    assert error.headers["Retry-After"] == "43"
    assert error.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.headers["x-ratelimit-limit-requests"] == "10"
    assert error.headers["x-ratelimit-remaining-tokens"] == "20"
    assert error.headers["x-ratelimit-reset-tokens"] == "43s"
    # A smaller request still fits in what is left.
    await quotas.reserve(user_id=901, limits=LIMITS, tokens=20, now=now)


async def test_a_spent_daily_budget_is_insufficient_quota_until_midnight_utc():
    limits = Limits(plan="t", tier="standard", requests_per_minute=0, tokens_per_minute=0,
                    tokens_per_day=100, tokens_per_month=0)
    midnight = 1_800_000_000 // 86400 * 86400
    now = midnight + 86400 - 3600.5  # an hour (and half a second) before midnight
    await quotas.reserve(user_id=902, limits=limits, tokens=90, now=now)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.reserve(user_id=902, limits=limits, tokens=20, now=now)
    assert refused.value.code == "insufficient_quota"
    assert refused.value.retry_after_s == 3601
    assert "tokens per day" in refused.value.message
    assert try_again_in(3601) == "Try again in 61 minutes."
    assert try_again_in(1) == "Try again in 1 second."
    assert try_again_in(42.2) == "Try again in 43 seconds."
    assert try_again_in(90000) == "Try again in 25 hours."
    assert try_again_in(3 * 86400) == "Try again in 3 days."


async def test_requests_per_minute_are_counted(fresh_minute):
    limits = Limits(plan="t", tier="standard", requests_per_minute=2, tokens_per_minute=0,
                    tokens_per_day=0, tokens_per_month=0)
    await quotas.reserve(user_id=903, limits=limits, tokens=1)
    await quotas.reserve(user_id=903, limits=limits, tokens=1)
    with pytest.raises(RateLimited) as refused:
        await quotas.reserve(user_id=903, limits=limits, tokens=1)
    assert "requests per minute" in refused.value.message


async def test_a_request_larger_than_the_whole_budget_is_a_bad_request():
    with pytest.raises(BadRequest) as refused:
        await quotas.reserve(user_id=904, limits=LIMITS, tokens=101)
    assert "lower max_tokens" in refused.value.message


async def test_reconcile_refunds_what_was_not_used():
    reservation = await quotas.reserve(user_id=905, limits=LIMITS, tokens=90)
    await quotas.reconcile(reservation, charged_tokens=30)
    await quotas.reconcile(reservation, charged_tokens=30)  # settling twice changes nothing
    assert (await quotas.current_usage(905))[2] == 30


async def test_a_dead_processes_reservation_is_given_back_once_its_lease_runs_out(settings):
    """kill -9 mid-request: nobody reconciles. The lease runs out and a sweep
    (any process's) gives the whole reservation back, exactly once."""
    settings.QUOTA_LEASE_S = 60
    done = await quotas.reserve(user_id=906, limits=LIMITS, tokens=40)
    await quotas.reconcile(done, charged_tokens=25)
    orphan = await quotas.reserve(user_id=906, limits=LIMITS, tokens=50)  # its process "dies" here
    assert (await quotas.current_usage(906))[2] == 75
    assert await quotas.sweep_expired() == 0  # its lease still runs
    assert await quotas.sweep_expired(now=time.time() + 61) == 1
    assert (await quotas.current_usage(906))[1:3] == (25, 25)
    assert await quotas.sweep_expired(now=time.time() + 61) == 0
    await quotas.reconcile(orphan, charged_tokens=10)  # a late settle: already given back
    assert (await quotas.current_usage(906))[2] == 25


async def test_a_live_reservations_lease_is_renewed_and_survives_the_sweep(settings):
    settings.QUOTA_LEASE_S = 60
    live = await quotas.reserve(user_id=907, limits=LIMITS, tokens=50)  # leased for 60 s
    settings.QUOTA_LEASE_S = 600
    await quotas.renew([live.id])  # what its process's keeper does while the request runs
    assert await quotas.sweep_expired(now=time.time() + 120) == 0
    await quotas.reconcile(live, charged_tokens=20)
    assert (await quotas.current_usage(907))[2] == 20


async def test_fifty_concurrent_requests_overshoot_by_at_most_one_max_tokens(remote, alice, fresh_minute):
    await sync_to_async(give_plan)(alice, requests_per_minute=0, tokens_per_minute=1000,
                                   tokens_per_day=0, tokens_per_month=0)
    max_tokens = 100
    question = "please say the same thing back to me right now"  # ~13 tokens in, 11 out

    async def one(i):
        request = ChatRequest(messages=[{"role": "user", "content": f"{question} {i}"}], user_id=alice.pk,
                              max_tokens=max_tokens, temperature=0.7)
        try:
            return await collect(request)
        except RateLimited:
            return None

    results = await asyncio.gather(*(one(i) for i in range(50)))
    served = [r for r in results if r is not None]
    assert served and len(served) < 50
    assert all(final.finish_reason == "stop" for _, final in served)
    used = sum(final.usage.total_tokens for _, final in served)
    assert used <= 1000 + max_tokens
    charged = await sync_to_async(lambda: sum(UsageRecord.objects.values_list("charged_tokens", flat=True)))()
    assert charged == used
    assert (await quotas.current_usage(alice.pk))[1] <= 1000


async def test_stop_mid_reply_charges_only_what_was_generated(transactional_db, fake_openai, settings, alice):
    settings.DEFAULT_POOL = "slow"
    await sync_to_async(add_remote)(fake_openai, "slow", remote_model="fake-slow")
    await sync_to_async(give_plan)(alice, tokens_per_minute=10000)
    request = ChatRequest(messages=[{"role": "user", "content": "count"}], user_id=alice.pk, max_tokens=150)
    tokens, final = 0, None
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            tokens += 1
            if tokens == 3:
                abort(request.request_id)
        else:
            final = event
    assert isinstance(final, FinalEvent) and final.finish_reason == "abort"
    assert 3 <= final.usage.completion_tokens < 20
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "abort" and row.reserved_tokens > row.charged_tokens == final.usage.total_tokens
    assert (await quotas.current_usage(alice.pk))[2] == final.usage.total_tokens


async def test_closing_the_stream_early_settles_the_quota_and_the_ledger(transactional_db, fake_openai, settings, alice):
    settings.DEFAULT_POOL = "slow"
    await sync_to_async(add_remote)(fake_openai, "slow", remote_model="fake-slow")
    request = ChatRequest(messages=[{"role": "user", "content": "count"}], user_id=alice.pk, max_tokens=150)
    stream = stream_chat(request)
    async for event in stream:
        break
    await stream.aclose()
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "abort" and row.completion_tokens == 1
    assert (await quotas.current_usage(alice.pk))[2] == row.charged_tokens < row.reserved_tokens


async def test_redis_unreachable_fails_closed_with_503(remote, alice, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    with pytest.raises(Unavailable) as refused:
        await collect(ChatRequest(messages=[{"role": "user", "content": "hi"}], user_id=alice.pk))
    assert refused.value.status == 503
    assert "Redis" in refused.value.message


async def test_a_stop_before_the_backend_starts_still_stops_it(transactional_db, fake_openai, settings, alice):
    settings.DEFAULT_POOL = "slow"
    await sync_to_async(add_remote)(fake_openai, "slow", remote_model="fake-slow")
    request = ChatRequest(messages=[{"role": "user", "content": "count"}], user_id=alice.pk, max_tokens=150)
    abort(request.request_id)  # e.g. Stop pressed while the quota was being reserved
    text, final = await collect(request)
    assert final.finish_reason == "abort" and final.usage.completion_tokens < 10


async def test_background_tasks_are_ledgered_but_not_refused_for_quota(remote, alice):
    await sync_to_async(give_plan)(alice, tokens_per_minute=1, requests_per_minute=1)
    request = ChatRequest(messages=[{"role": "user", "content": "title this"}], user_id=alice.pk, source="task")
    _, final = await collect(request)
    assert final.finish_reason == "stop"
    assert (await UsageRecord.objects.aget(request_id=request.request_id)).source == "task"


async def test_the_api_fails_closed_when_redis_is_down(remote, alice, settings):
    import json

    from django.test import AsyncClient

    from gateway.keys import api_key_create

    _, raw = await sync_to_async(api_key_create)(user=alice, name="t")
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": "redis://127.0.0.1:1/0"}}
    response = await AsyncClient().post(
        "/v1/chat/completions", json.dumps({"model": "remote", "messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json", headers={"Authorization": f"Bearer {raw}"},
    )
    assert response.status_code == 503 and "Redis" in response.json()["error"]["message"]
