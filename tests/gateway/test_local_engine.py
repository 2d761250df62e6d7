"""The gateway over real local engines (tiny random-weight Llamas with
SmolLM2's tokenizer): usage, Stop, and saturation → fallback → 429."""
import asyncio
import time
from contextlib import aclosing

import pytest

from gateway import services
from gateway.models import UsageRecord
from gateway.types import ChatRequest, Overloaded, TokenEvent
from tests.conftest import tiny_smollm2_engine
from tests.gateway.helpers import collect


def _tiny_engine(smollm2_dir, **config):
    return tiny_smollm2_engine(smollm2_dir, kv_cache_mb=16, **config)


@pytest.fixture(scope="session")
def gw_engines(smollm2_dir):
    from chatapp import runtime

    engines = {
        "gw-small": _tiny_engine(smollm2_dir, model_name="gw-small"),
        # One sequence at a time and one waiting: easy to saturate on purpose.
        "gw-large": _tiny_engine(smollm2_dir, model_name="gw-large", max_num_seqs=1, max_waiting=1),
    }
    for name, engine in engines.items():
        runtime.register_engine(name, engine)
    yield engines
    for name, engine in engines.items():
        runtime.unregister_engine(name)
        engine.shutdown()


@pytest.fixture
def local_pools(gw_engines, transactional_db, settings):
    settings.MODEL_POOLS = {name: {"model": "tiny"} for name in gw_engines}
    settings.DEFAULT_POOL = "gw-small"
    settings.GATEWAY_FALLBACKS = {"gw-large": ["gw-small"]}
    return gw_engines


def ask(user, model="gw-small", max_tokens=8, **extra):
    return ChatRequest(messages=[{"role": "user", "content": "Hello there"}], user_id=user.pk, model=model,
                       max_tokens=max_tokens, **extra)


async def test_a_local_pool_streams_and_charges_its_real_usage(local_pools, alice):
    request = ask(alice, max_tokens=8, temperature=0.7)
    text, final = await collect(request)
    engine = local_pools["gw-small"]
    prompt_tokens = len(engine.apply_chat_template(request.messages))
    assert final.model == "gw-small" and final.finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens == prompt_tokens and 1 <= final.usage.completion_tokens <= 8
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.reserved_tokens == prompt_tokens + 8
    assert row.charged_tokens == final.usage.total_tokens and row.ttft_ms is not None


async def test_model_facts_come_from_the_engine(local_pools):
    from chatapp import runtime

    engine = local_pools["gw-small"]
    messages = [{"role": "user", "content": "count my tokens"}]
    # On the chat's database threads, where the turn's context counts its
    # tokens: a plain thread would keep a pooled connection for good.
    assert await runtime.on_db_thread(services.count_prompt_tokens)(messages, "gw-small") == len(
        engine.apply_chat_template(messages))
    info = await runtime.on_db_thread(services.model_info)("gw-small")
    assert info.context_window == engine.max_model_len


async def test_stop_ends_the_local_sequence(local_pools, alice, monkeypatch):
    # Random weights may pick EOS at any step; an engine that knows no EOS
    # can only end this reply by Stop or after 1,500 tokens.
    monkeypatch.setattr(local_pools["gw-small"], "eos_token_ids", set())
    request = ask(alice, max_tokens=1500)
    seen, final = 0, None
    async for event in services.stream_chat(request):
        if isinstance(event, TokenEvent):
            seen += 1
            if seen == 2:
                services.abort(request.request_id)
        else:
            final = event
    assert final.finish_reason == "abort" and final.usage.completion_tokens < 1500
    deadline = time.monotonic() + 5
    while local_pools["gw-small"].stats()["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert local_pools["gw-small"].stats()["running"] == 0


async def test_a_saturated_pool_degrades_to_the_small_pool_then_answers_429(local_pools, alice, settings):
    from inference import SamplingParams

    large = local_pools["gw-large"]
    hog = SamplingParams(max_tokens=1500, ignore_eos=True, temperature=0)
    prompt = large.apply_chat_template([{"role": "user", "content": "busy"}])
    running = large.submit(prompt, hog, request_id="hog-running")
    deadline = time.monotonic() + 10
    while large.stats()["running"] < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    waiting = large.submit(prompt, hog, request_id="hog-waiting")
    try:
        text, final = await collect(ask(alice, model="gw-large"))
        assert final.model == "gw-small"
        assert final.route == "explicit:gw-large(saturated) > gw-small"
        settings.GATEWAY_FALLBACKS = {}
        with pytest.raises(Overloaded) as refused:
            await collect(ask(alice, model="gw-large"))
        assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    finally:
        large.abort("hog-running")
        large.abort("hog-waiting")
        for handle in (running, waiting):
            async for _ in handle:
                pass


async def test_a_per_user_prefix_cache_scope_salts_the_engine_cache(local_pools, alice, bob, settings):
    settings.GATEWAY_PREFIX_CACHE_SCOPE = "user"
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}

    def request(user):
        return ChatRequest(messages=[system, {"role": "user", "content": "hi"}], user_id=user.pk, model="gw-small",
                           max_tokens=2, temperature=0.7)

    _, first = await collect(request(alice))
    _, again = await collect(request(alice))
    _, other = await collect(request(bob))
    assert again.usage.cached_tokens > 0  # the same user reuses the prefix
    assert other.usage.cached_tokens == 0  # another user does not


async def test_a_request_marked_on_its_way_lets_go_once_its_engine_has_the_prompt(local_pools, alice):
    """The server marks each POST for the engines (chatapp.asgi, inference.arrivals);
    the gateway's submit to a local engine, in the request's context, ends the
    mark before the first token: the decodes it held wait no longer."""
    from inference import arrivals

    async def marked_request():
        mark = arrivals.expect()
        async with aclosing(services.stream_chat(ask(alice))) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    return mark, mark.released

    mark, released = await asyncio.create_task(marked_request())
    assert released is True and mark not in arrivals.ARRIVALS
