"""Exact and semantic caches: hits, isolation between users, and what is never cached."""
import pytest
from asgiref.sync import sync_to_async

from gateway import quotas
from gateway.models import SemanticCacheEntry, UsageRecord
from gateway.services import abort, stream_chat
from gateway.types import ChatRequest, TokenEvent
from tests.gateway.helpers import add_remote, collect


def ask(user, text, *, system=None, temperature=0.0, model=None, history=()):
    messages = [{"role": "system", "content": system}] if system else []
    messages += list(history) + [{"role": "user", "content": text}]
    return ChatRequest(messages=messages, user_id=user.pk, temperature=temperature, max_tokens=50, model=model)


async def test_an_exact_repeat_is_served_from_the_cache_without_the_backend(remote, alice):
    text, first = await collect(ask(alice, "what is the capital of France"))
    calls = remote.count()
    again, hit = await collect(ask(alice, "what is the capital of France"))
    assert again == text and hit.cache_hit == "exact" and first.cache_hit is None
    assert remote.count() == calls
    assert hit.usage.completion_tokens == first.usage.completion_tokens
    rows = [r async for r in UsageRecord.objects.order_by("created_at")]
    assert [r.cache_hit for r in rows] == ["", "exact"]
    assert rows[1].charged_tokens == 0 and rows[1].status == "stop"
    # The hit reserved tokens too, and gave them all back.
    assert (await quotas.current_usage(alice.pk))[2] == first.usage.total_tokens


async def test_a_paraphrase_by_the_same_user_is_a_semantic_hit(remote, alice):
    text, _ = await collect(ask(alice, "How do I bake bread?"))
    calls = remote.count()
    again, hit = await collect(ask(alice, "What is the way to bake bread?"))
    assert hit.cache_hit == "semantic" and again == text and remote.count() == calls


async def test_another_users_paraphrase_never_hits_the_first_users_entries(remote, alice, bob):
    await collect(ask(alice, "How do I bake bread?"))
    calls = remote.count()
    _, paraphrase = await collect(ask(bob, "What is the way to bake bread?"))
    assert paraphrase.cache_hit is None and remote.count() == calls + 1
    scopes = {e.scope async for e in SemanticCacheEntry.objects.all()}
    assert scopes == {f"user:{alice.pk}", f"user:{bob.pk}"}


async def test_a_deployment_scope_shares_entries_when_configured(remote, alice, bob, settings):
    settings.GATEWAY_CACHE_SCOPE = "deployment"
    await collect(ask(alice, "How do I bake bread?"))
    _, hit = await collect(ask(bob, "What is the way to bake bread?"))
    assert hit.cache_hit == "semantic"


async def test_unrelated_questions_do_not_hit(remote, alice):
    await collect(ask(alice, "How do I bake bread?"))
    _, other = await collect(ask(alice, "How do I change a bicycle tyre?"))
    assert other.cache_hit is None


async def test_a_different_system_prompt_is_a_different_key(remote, alice):
    await collect(ask(alice, "How do I bake bread?", system="Answer in French."))
    _, other = await collect(ask(alice, "How do I bake bread?", system="Answer in German."))
    assert other.cache_hit is None


async def test_requests_with_history_skip_the_semantic_cache(remote, alice):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    await collect(ask(alice, "How do I bake bread?", history=history))
    assert await SemanticCacheEntry.objects.acount() == 0
    _, hit = await collect(ask(alice, "How do I bake bread?", history=history))
    assert hit.cache_hit == "exact"  # the exact cache covers the whole conversation


async def test_sampled_replies_are_not_cached(remote, alice):
    await collect(ask(alice, "tell me a story", temperature=0.8))
    calls = remote.count()
    _, again = await collect(ask(alice, "tell me a story", temperature=0.8))
    assert again.cache_hit is None and remote.count() == calls + 1


async def test_sampled_replies_are_cached_when_configured(remote, alice, settings):
    settings.GATEWAY_CACHE_SAMPLED = True
    await collect(ask(alice, "tell me a story", temperature=0.8))
    _, again = await collect(ask(alice, "tell me a story", temperature=0.8))
    assert again.cache_hit == "exact"


async def test_errors_are_not_cached(transactional_db, fake_openai, alice):
    await sync_to_async(add_remote)(fake_openai, "flaky", remote_model="fake-break")
    text, final = await collect(ask(alice, "hello", model="flaky"))
    assert final.finish_reason == "error" and text == "echo:"
    calls = fake_openai.count("fake-break")
    _, again = await collect(ask(alice, "hello", model="flaky"))
    assert again.cache_hit is None and fake_openai.count("fake-break") == calls + 1
    assert await SemanticCacheEntry.objects.acount() == 0


async def test_stopped_replies_are_not_cached(transactional_db, fake_openai, alice):
    await sync_to_async(add_remote)(fake_openai, "slow", remote_model="fake-slow")
    request = ask(alice, "count", model="slow")
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            abort(request.request_id)
    calls = fake_openai.count("fake-slow")
    request = ask(alice, "count", model="slow")
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            abort(request.request_id)
        else:
            assert event.cache_hit is None and event.finish_reason == "abort"
    assert fake_openai.count("fake-slow") == calls + 1


async def test_moderated_replies_are_not_cached(remote, alice, settings):
    settings.SAFETY_BLOCKED_TERMS = ["echo:"]
    _, final = await collect(ask(alice, "hello"))
    assert final.finish_reason == "content_filter"
    calls = remote.count()
    _, again = await collect(ask(alice, "hello"))
    assert again.cache_hit is None and remote.count() == calls + 1


@pytest.mark.parametrize("kind", ["exact", "semantic"])
async def test_a_hit_streams_through_the_same_event_path(remote, alice, kind):
    await collect(ask(alice, "How do I bake bread today?"))
    question = "How do I bake bread today?" if kind == "exact" else "How can I bake bread today?"
    events = [e async for e in stream_chat(ask(alice, question))]
    assert all(isinstance(e, TokenEvent) for e in events[:-1]) and len(events) > 2
    assert events[-1].cache_hit == kind
