"""Per-user concurrency caps, shedding by plan priority, the fair queue,
leases that outlive no process, and the chat's HTTP rate limits."""
import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from gateway import concurrency
from gateway.registry import Limits
from gateway.services import stream_chat
from gateway.types import ChatRequest, FinalEvent, Overloaded, RateLimited, TokenEvent
from tests.abuse.conftest import akey_for, aplan
from tests.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)


def ask(user, text="count for me"):
    return ChatRequest(messages=[{"role": "user", "content": text}], user_id=user.pk, max_tokens=200)


async def first_token(stream):
    """Start a generation and hold it after its first token."""
    event = await stream.__anext__()
    assert isinstance(event, TokenEvent)
    return stream


async def drain(stream):
    final = None
    async for event in stream:
        if isinstance(event, FinalEvent):
            final = event
    return final


async def test_concurrent_requests_over_the_plans_cap_are_429(slow_remote, alice):
    await aplan(alice, max_concurrent=2, tokens_per_minute=0, requests_per_minute=0, tokens_per_day=0)

    async def one():
        stream = stream_chat(ask(alice))
        try:
            await first_token(stream)
        except RateLimited as exc:
            return exc
        return stream

    results = await asyncio.gather(*(one() for _ in range(6)))
    running = [r for r in results if not isinstance(r, RateLimited)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(running) == 2 and len(refused) == 4
    assert all(r.status == 429 and r.headers["Retry-After"] for r in refused)
    assert "2 at once" in refused[0].message
    assert await sync_to_async(concurrency.in_flight)(alice.pk) == 2
    for stream in running:
        await stream.aclose()
    # Every slot is given back: a new request is admitted at once.
    assert await sync_to_async(concurrency.in_flight)(alice.pk) == 0
    await (await first_token(stream_chat(ask(alice)))).aclose()


async def test_the_cap_counts_chat_and_api_together_and_the_api_answers_429(slow_remote, alice):
    await aplan(alice, max_concurrent=1, tokens_per_minute=0, requests_per_minute=0, tokens_per_day=0)
    held = await first_token(stream_chat(ask(alice)))
    key = await akey_for(alice)
    response = await AsyncClient().post(
        "/v1/chat/completions", json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json", headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 429 and response["Retry-After"]
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    await held.aclose()


async def test_a_capacity_spike_sheds_low_priority_plans_first(slow_remote, alice, bob, settings):
    settings.ABUSE_CAPACITY = 4
    settings.ABUSE_PRIORITY_RESERVE = 0.5  # priority 0 may fill 2 of the 4 slots, priority 100 all 4
    await aplan(alice, priority=0, max_concurrent=0, tokens_per_minute=0, requests_per_minute=0, tokens_per_day=0)
    await aplan(bob, priority=100, max_concurrent=0, tokens_per_minute=0, requests_per_minute=0, tokens_per_day=0)
    held = [await first_token(stream_chat(ask(alice))) for _ in range(2)]
    with pytest.raises(Overloaded) as refused:
        await first_token(stream_chat(ask(alice)))
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    # The higher plan is still served, up to the whole capacity.
    held += [await first_token(stream_chat(ask(bob))) for _ in range(2)]
    with pytest.raises(Overloaded):
        await first_token(stream_chat(ask(bob)))
    for stream in held:
        await stream.aclose()


async def test_the_fair_queue_puts_a_users_extra_requests_behind_others(settings):
    limits = Limits(plan="t", tier="standard", requests_per_minute=0, tokens_per_minute=0, tokens_per_day=0,
                    tokens_per_month=0, max_concurrent=0)
    leases = [await concurrency.acquire(user_id=901, request_id=f"r{i}", limits=limits, on_revoked=lambda r: None)
              for i in range(3)]
    other = await concurrency.acquire(user_id=902, request_id="o1", limits=limits, on_revoked=lambda r: None)
    priorities = [lease.fair_priority(0) for lease in leases]
    assert priorities == [0, 1, 2] and other.fair_priority(0) == 0
    # Still ahead of background work (titles, summaries: priority 10).
    many = concurrency.Lease(user_id=901, request_id="x", on_revoked=print, queue_position=50)
    assert many.fair_priority(0) == 9
    for lease in [*leases, other]:
        await concurrency.release(lease)


async def test_slots_of_a_process_that_died_expire(settings):
    """A process that dies stops renewing: its slots stop counting after the lease TTL."""
    settings.ABUSE_LEASE_RENEW_S = 0.1
    settings.ABUSE_LEASE_TTL_S = 1.0
    limits = Limits(plan="t", tier="standard", requests_per_minute=0, tokens_per_minute=0, tokens_per_day=0,
                    tokens_per_month=0, max_concurrent=1)

    async def hold_in_a_process_that_dies():
        await concurrency.acquire(user_id=903, request_id="dead", limits=limits, on_revoked=lambda r: None)

    # Its own event loop, closed after the lease was taken: its keeper dies with it, as with a killed serve.
    await asyncio.to_thread(asyncio.run, hold_in_a_process_that_dies())
    with pytest.raises(RateLimited):
        await concurrency.acquire(user_id=903, request_id="new", limits=limits, on_revoked=lambda r: None)

    async def admitted():
        try:
            lease = await concurrency.acquire(user_id=903, request_id="new", limits=limits, on_revoked=lambda r: None)
        except RateLimited:
            return None
        return lease

    lease = await eventually(admitted, timeout_s=10, poll_s=0.1)
    await concurrency.release(lease)


async def test_a_live_lease_is_renewed_past_its_ttl(settings):
    settings.ABUSE_LEASE_RENEW_S = 0.1
    settings.ABUSE_LEASE_TTL_S = 1.0
    limits = Limits(plan="t", tier="standard", requests_per_minute=0, tokens_per_minute=0, tokens_per_day=0,
                    tokens_per_month=0, max_concurrent=1)
    lease = await concurrency.acquire(user_id=904, request_id="live", limits=limits, on_revoked=lambda r: None)
    taken_at = time.monotonic()
    # This loop's keeper renews it meanwhile.
    await eventually(lambda: time.monotonic() - taken_at > 1.5 * settings.ABUSE_LEASE_TTL_S, timeout_s=10, poll_s=0.1)
    with pytest.raises(RateLimited):
        await concurrency.acquire(user_id=904, request_id="other", limits=limits, on_revoked=lambda r: None)
    await concurrency.release(lease)


# ------------------------------------------------------------ the chat's HTTP rate limit

async def test_chat_posts_are_rate_limited_per_user_with_retry_after(alice, fake_gateway, settings):
    from django.test import AsyncClient as Client

    settings.CHAT_RATE_PER_USER = "2/m"

    async def three_posts(user):
        client = Client()
        await sync_to_async(client.force_login)(user)
        statuses = []
        for i in range(3):
            response = await client.post("/c/new", {"text": f"hello {i}"}, headers={"HX-Request": "true"})
            statuses.append(response.status_code)
        return statuses, response

    statuses, response = await three_posts(alice)
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    assert int(response["Retry-After"]) >= 1
    assert "too fast" in response.content.decode()
    from conversations import turns

    await turns.wait_idle()


async def _post_as(user, text="hello"):
    client = AsyncClient()
    await sync_to_async(client.force_login)(user)
    return await client.post("/c/new", {"text": text}, headers={"HX-Request": "true"})


async def test_chat_posts_are_rate_limited_per_address_and_refusals_do_not_count(alice, bob, fake_gateway, settings):
    """One address's budget is shared by its users; a POST refused by its
    user's own limit is not counted against the address as well."""
    settings.CHAT_RATE_PER_USER = "1/m"
    settings.CHAT_RATE_PER_IP = "2/m"
    assert (await _post_as(alice, "one")).status_code == 200
    assert (await _post_as(alice, "two")).status_code == 429  # alice's own limit
    assert (await _post_as(bob, "three")).status_code == 200  # the address's second
    refused = await _post_as(bob, "four")
    assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
    from conversations import turns

    await turns.wait_idle()


async def test_chat_posts_fail_closed_when_the_rate_limiter_is_unreachable(alice, fake_gateway, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = await _post_as(alice)
    assert response.status_code == 503
    assert "rate limiter (Redis) is unreachable" in response.content.decode()
    from conversations.models import Conversation

    assert not await Conversation.objects.filter(user=alice).aexists()  # nothing was saved
