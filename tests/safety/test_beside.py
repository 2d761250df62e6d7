"""The input's moderation runs beside the gateway's other stages (routing,
quota, cache, a local engine's prefill), and the first token waits for its
verdict: nothing of a blocked request is shown, its generation is aborted and
charged nothing, and its prompt never reaches a hosted remote backend. A
self-hosted one (Backend.self_hosted) is opened beside the check, like the
local engine, and hung up on if the prompt is blocked.

The Gated checker (tests.safety.fakes) holds its verdict on a prompt until
the test opens the gate, so the stages after it are seen running meanwhile."""
import asyncio
import time

import pytest

from gateway import registry, services
from gateway.models import Backend, UsageRecord
from gateway.types import Blocked, ChatRequest, ModerationUnavailable, TokenEvent
from tests.safety import fakes

pytestmark = pytest.mark.django_db(transaction=True)

MARK = "BLOCKME"


@pytest.fixture
def gated(settings):
    settings.SAFETY_CHECKERS = ["safety.checkers.RulesChecker", "tests.safety.fakes.Gated"]
    settings.SAFETY_CHECKER_TIMEOUT_S = 60  # the gate decides when the verdict comes, not the deadline
    fakes.MARKERS["input"] = MARK
    fakes.GATE.clear()
    yield
    fakes.GATE.set()


@pytest.fixture
def endless_engine(chat_engine, monkeypatch):
    """The default pool's engine, generating until stopped (no EOS, 5 ms a step)."""
    monkeypatch.setattr(chat_engine, "eos_token_ids", set())
    monkeypatch.setattr(chat_engine, "step_observer", lambda batch, duration_s: time.sleep(0.005))
    return chat_engine


async def _until(condition, timeout_s=30.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


async def _consume(request: ChatRequest, events: list):
    async for event in services.stream_chat(request):
        events.append(event)


def _generated(engine) -> int:
    return engine.stats()["generation_tokens_total"]


async def _held_while_the_engine_generates(engine, request, events) -> asyncio.Task:
    """Start the request; return once the engine has generated tokens for it
    while the verdict is still held (and nothing was shown)."""
    before = _generated(engine)
    task = asyncio.create_task(_consume(request, events))
    await _until(lambda: _generated(engine) >= before + 5)
    assert events == [] and not task.done()
    return task


async def test_a_local_generation_starts_beside_the_check_and_waits_for_it(alice, endless_engine, gated):
    request = ChatRequest(messages=[{"role": "user", "content": "Hello there"}], user_id=alice.pk, max_tokens=40)
    events = []
    task = await _held_while_the_engine_generates(endless_engine, request, events)
    fakes.GATE.set()
    await asyncio.wait_for(task, 30)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert tokens and events[-1].finish_reason == "length"
    assert "Hello there" in fakes.seen("input")


async def test_a_block_aborts_the_generation_shows_nothing_and_charges_nothing(alice, endless_engine, gated,
                                                                                blocked_signals):
    request = ChatRequest(messages=[{"role": "user", "content": f"{MARK} please"}], user_id=alice.pk,
                          max_tokens=1500)
    events = []
    task = await _held_while_the_engine_generates(endless_engine, request, events)
    fakes.GATE.set()
    with pytest.raises(Blocked):
        await asyncio.wait_for(task, 30)
    assert events == []
    await _until(lambda: not endless_engine.stats()["running"])  # its slot is free
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "blocked" and row.charged_tokens == 0
    assert [s["source"] for s in blocked_signals] == ["input"]


async def test_a_prompt_reaches_a_remote_backend_only_once_it_passed(remote, alice, gated):
    calls = remote.count()
    request = ChatRequest(messages=[{"role": "user", "content": f"{MARK} please"}], user_id=alice.pk, max_tokens=20)
    events = []
    task = asyncio.create_task(_consume(request, events))
    await _until(lambda: f"{MARK} please" in fakes.seen("input") or task.done())
    assert not task.done() and remote.count() == calls  # the check is running; the remote waits for it
    fakes.GATE.set()
    with pytest.raises(Blocked):
        await asyncio.wait_for(task, 30)
    assert events == [] and remote.count() == calls
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "blocked" and row.charged_tokens == 0


@pytest.fixture
def self_hosted(remote):
    """The remote backend marked as one the operator runs, streaming 200 ticks 50 ms apart (fake-slow)."""
    Backend.objects.filter(name="remote").update(self_hosted=True, remote_model="fake-slow")
    registry.invalidate()
    return remote


async def test_a_self_hosted_backend_is_opened_beside_the_check_and_waits_for_it(self_hosted, alice, gated):
    calls = self_hosted.count()
    request = ChatRequest(messages=[{"role": "user", "content": "Hello there"}], user_id=alice.pk, max_tokens=3)
    events = []
    task = asyncio.create_task(_consume(request, events))
    await _until(lambda: self_hosted.count() > calls or task.done())
    assert not task.done()  # the backend has the prompt while the verdict is held
    await asyncio.sleep(0.3)  # its whole reply (3 ticks) has been sent meanwhile
    assert events == [] and not task.done()
    fakes.GATE.set()
    await asyncio.wait_for(task, 30)
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == "tick tick tick"
    assert events[-1].finish_reason == "length"


async def test_a_block_hangs_up_on_a_self_hosted_backend_shows_and_charges_nothing(self_hosted, alice, gated,
                                                                                   blocked_signals):
    calls, hangups = self_hosted.count(), self_hosted.hangups
    request = ChatRequest(messages=[{"role": "user", "content": f"{MARK} please"}], user_id=alice.pk,
                          max_tokens=200)
    events = []
    task = asyncio.create_task(_consume(request, events))
    await _until(lambda: self_hosted.count() > calls or task.done())
    assert not task.done()
    fakes.GATE.set()
    with pytest.raises(Blocked):
        await asyncio.wait_for(task, 30)
    assert events == []
    # Hung up on: left alone, its 200 ticks would run for 10 s and end without a broken write.
    await _until(lambda: self_hosted.hangups > hangups)
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "blocked" and row.charged_tokens == 0
    assert [s["source"] for s in blocked_signals] == ["input"]


async def test_a_block_outranks_a_refusal_of_the_other_stages(remote, alice, gated):
    # Routing refuses an unknown model (404) while the check is still running.
    request = ChatRequest(messages=[{"role": "user", "content": f"{MARK} please"}], user_id=alice.pk,
                          max_tokens=20, model="no-such-model")
    fakes.GATE.set()
    with pytest.raises(Blocked):
        await services.stream_chat(request).__anext__()


@pytest.fixture
def failing_closed(settings, gated):
    """The gated checker fails once the gate opens; its category fails closed."""
    settings.SAFETY_CHECKERS = ["safety.checkers.RulesChecker", "tests.safety.fakes.GatedFailing"]
    settings.SAFETY_FAIL_CLOSED = ["violence"]


async def test_a_prompt_that_could_not_be_checked_is_refused_as_unavailable_not_as_blocked(
        alice, endless_engine, failing_closed, blocked_signals):
    """Fail-closed holds the prompt back, but says so: nothing judged it, so it
    is a 503 worth retrying, not a content-policy refusal naming a category
    the text never touched, and no block is counted."""
    request = ChatRequest(messages=[{"role": "user", "content": "Hello there"}], user_id=alice.pk, max_tokens=1500)
    events = []
    task = await _held_while_the_engine_generates(endless_engine, request, events)
    fakes.GATE.set()
    with pytest.raises(ModerationUnavailable) as refused:
        await asyncio.wait_for(task, 30)
    assert refused.value.status == 503 and refused.value.code == "moderation_unavailable"
    assert refused.value.retry_after_s == ModerationUnavailable.RETRY_AFTER_S
    assert "could not be checked" in refused.value.message and "violence" not in refused.value.message
    assert events == []
    await _until(lambda: not endless_engine.stats()["running"])  # its slot is free
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.status == "error" and row.charged_tokens == 0
    assert blocked_signals == []


async def test_a_judged_block_outranks_a_check_that_failed(alice, remote, failing_closed, blocked_signals, settings):
    settings.SAFETY_BLOCKED_TERMS = ["forbidden"]
    fakes.GATE.set()
    request = ChatRequest(messages=[{"role": "user", "content": "Hello there"},
                                    {"role": "user", "content": "the forbidden thing"}], user_id=alice.pk, max_tokens=20)
    with pytest.raises(Blocked) as refused:
        await services.stream_chat(request).__anext__()
    assert "blocked term" in refused.value.message
    assert [s["category"] for s in blocked_signals] == ["blocked_term"]
