"""Routing, fallback chains, circuit breakers and remote failures."""
import asyncio

import pytest
from asgiref.sync import sync_to_async

from gateway import quotas, registry, router
from gateway.models import Backend, Plan, UsageRecord
from gateway.registry import BackendSpec, Limits
from gateway.types import ChatRequest, ModelNotFound, Overloaded, Unavailable
from tests.gateway.helpers import add_remote, collect


def ask(user, model, text="hello", **extra):
    return ChatRequest(messages=[{"role": "user", "content": text}], user_id=user.pk, model=model,
                       max_tokens=20, temperature=0.7, **extra)


async def test_a_backend_error_before_the_first_token_falls_back(remote, alice):
    await sync_to_async(add_remote)(remote, "primary", remote_model="fake-500", fallbacks="remote")
    text, final = await collect(ask(alice, "primary"))
    assert text == "echo: hello" and final.model == "remote"
    assert final.route == "explicit:primary(failed) > remote"
    row = await UsageRecord.objects.aget()
    assert row.backend == "remote" and row.route == final.route


async def test_a_saturated_backend_falls_back_and_answers_429_when_nothing_is_left(remote, alice):
    await sync_to_async(add_remote)(remote, "busy", remote_model="fake-429", fallbacks="remote")
    await sync_to_async(add_remote)(remote, "busy-alone", remote_model="fake-429")
    _, final = await collect(ask(alice, "busy"))
    assert final.model == "remote" and "busy(saturated)" in final.route
    with pytest.raises(Overloaded) as refused:
        await collect(ask(alice, "busy-alone"))
    assert refused.value.status == 429 and refused.value.retry_after_s >= 1


async def test_an_unreachable_or_silent_backend_falls_back(remote, alice, settings):
    settings.GATEWAY_FIRST_TOKEN_TIMEOUT_S = 0.3
    await sync_to_async(Backend.objects.create)(
        name="gone", base_url="http://127.0.0.1:9/v1", remote_model="x", fallbacks="remote"
    )
    await sync_to_async(add_remote)(remote, "silent", remote_model="fake-hang", fallbacks="remote")
    _, final = await collect(ask(alice, "gone"))
    assert final.model == "remote" and "gone(failed)" in final.route
    _, final = await collect(ask(alice, "silent"))
    assert final.model == "remote" and "silent(failed)" in final.route


async def test_all_backends_failing_is_503_and_refunds_the_reservation(remote, alice):
    await sync_to_async(add_remote)(remote, "broken", remote_model="fake-500")
    with pytest.raises(Unavailable):
        await collect(ask(alice, "broken"))
    assert (await quotas.current_usage(alice.pk))[2] == 0
    row = await UsageRecord.objects.aget()
    assert row.status == "error" and row.charged_tokens == 0 and "HTTP 500" in row.error


async def test_a_failure_after_the_first_token_keeps_the_partial_and_says_error(remote, alice):
    await sync_to_async(add_remote)(remote, "flaky", remote_model="fake-break", fallbacks="remote")
    text, final = await collect(ask(alice, "flaky"))
    assert text == "echo:" and final.finish_reason == "error" and final.error
    assert final.model == "flaky"  # no silent switch to another model mid-reply


async def test_the_circuit_opens_after_n_failures_then_probes_half_open(remote, alice, settings):
    settings.GATEWAY_CIRCUIT_FAILURES = 2
    settings.GATEWAY_CIRCUIT_COOLDOWN_S = 0.3
    primary = await sync_to_async(add_remote)(remote, "primary", remote_model="fake-500", fallbacks="remote")
    for _ in range(2):
        await collect(ask(alice, "primary"))
    failed_calls = remote.count("fake-500")
    _, final = await collect(ask(alice, "primary"))
    assert "primary(circuit-open)" in final.route and remote.count("fake-500") == failed_calls
    await asyncio.sleep(0.35)
    _, final = await collect(ask(alice, "primary"))  # the half-open probe fails: open again
    assert remote.count("fake-500") == failed_calls + 1
    _, final = await collect(ask(alice, "primary"))
    assert "circuit-open" in final.route
    primary.remote_model = "fake-ok"
    await sync_to_async(primary.save)()
    registry.invalidate()
    await asyncio.sleep(0.35)
    _, final = await collect(ask(alice, "primary"))  # the probe succeeds: closed
    assert final.model == "primary"
    _, final = await collect(ask(alice, "primary"))
    assert final.model == "primary" and final.route == "explicit:primary"


async def test_a_remote_without_stream_usage_is_counted_by_estimate(remote, alice):
    await sync_to_async(add_remote)(remote, "old", remote_model="fake-nousage")
    _, final = await collect(ask(alice, "old", text="one two three"))
    assert final.usage.completion_tokens == 4 and final.usage.prompt_tokens > 0


# ----------------------------------------------------------------- routing

SPECS = {
    "small": BackendSpec(name="small", kind="local", pool="small"),
    "large": BackendSpec(name="large", kind="local", pool="large", fallbacks=("small", "remote")),
    "remote": BackendSpec(name="remote", kind="openai", base_url="http://x/v1"),
}
PRO = Limits(plan="p", tier=Plan.TIER_PRO, requests_per_minute=0, tokens_per_minute=0, tokens_per_day=0,
             tokens_per_month=0)
STANDARD = Limits(plan="s", tier=Plan.TIER_STANDARD, requests_per_minute=0, tokens_per_minute=0,
                  tokens_per_day=0, tokens_per_month=0)


def route(text, limits=PRO, model=None, prompt_tokens=10):
    request = ChatRequest(messages=[{"role": "user", "content": text}], model=model)
    return router.choose(request, SPECS, limits, prompt_tokens)


@pytest.mark.parametrize("text,expected", [
    ("hi, how are you?", ("small", "default")),
    ("why does this fail?\n```python\nprint(x)\n```", ("large", "code")),
    ("def add(a, b): return a + b", ("large", "code")),
    ("solve for x: 3x + 4 = 19", ("large", "maths")),
    ("what is \\frac{1}{2} of 10", ("large", "maths")),
])
def test_the_router_sends_code_and_maths_to_large_for_pro_plans(text, expected, settings):
    settings.DEFAULT_POOL = "small"
    assert route(text) == expected


def test_the_router_keeps_standard_plans_on_the_small_pool(settings):
    settings.DEFAULT_POOL = "small"
    assert route("def f(x): pass", limits=STANDARD) == ("small", "default")


def test_the_router_sends_long_prompts_to_large(settings):
    settings.DEFAULT_POOL = "small"
    assert route("hi", prompt_tokens=settings.GATEWAY_ROUTE_LONG_PROMPT_TOKENS + 1) == ("large", "long-prompt")


def test_an_explicit_choice_wins_and_unknown_or_forbidden_models_are_404(settings):
    assert route("def f(): pass", model="remote") == ("remote", "explicit")
    assert route("hi", model="auto", limits=STANDARD)[0] == settings.DEFAULT_POOL
    with pytest.raises(ModelNotFound):
        route("hi", model="nope")
    limited = Limits(**{**PRO.__dict__, "allowed_models": frozenset({"small"})})
    with pytest.raises(ModelNotFound):
        route("hi", model="remote", limits=limited)


def test_the_fallback_chain_is_transitive_and_respects_the_plan():
    assert router.chain("large", SPECS, PRO) == ["large", "small", "remote"]
    limited = Limits(**{**PRO.__dict__, "allowed_models": frozenset({"large", "small"})})
    assert router.chain("large", SPECS, limited) == ["large", "small"]


async def test_a_backend_silent_after_the_first_token_ends_with_an_error(remote, alice, settings):
    settings.GATEWAY_IDLE_TIMEOUT_S = 0.3
    await sync_to_async(add_remote)(remote, "stalls", remote_model="fake-stall", fallbacks="remote")
    text, final = await collect(ask(alice, "stalls"))
    assert text == "echo:" and final.finish_reason == "error" and "sent nothing for 0.3 s" in final.error
    row = await UsageRecord.objects.aget()
    assert row.status == "error" and row.completion_tokens == 1


async def test_a_request_the_backend_rejects_is_a_bad_request_not_a_fallback(remote, alice):
    from gateway.types import BadRequest

    await sync_to_async(add_remote)(remote, "strict", remote_model="fake-400", fallbacks="remote")
    calls = remote.count("fake-ok")
    with pytest.raises(BadRequest) as refused:
        await collect(ask(alice, "strict"))
    # The backend's own words are logged, not shown (they may name its hosts or paths): the status is.
    assert "HTTP 400" in refused.value.message and "context length exceeded" not in refused.value.message
    assert remote.count("fake-ok") == calls
