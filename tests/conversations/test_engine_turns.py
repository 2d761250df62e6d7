"""Turns through the real gateway and a real engine (tiny random weights):
streamed text equals stored text, usage is recorded, and Stop or a missing
reader frees the engine's sequence."""
import asyncio
import time

import pytest

from conversations import turns
from tests.conversations.conftest import events_of, load, new_reply, open_stream, read_stream, text_of

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def engine_settings(settings, chat_engine):
    settings.STREAM_HEARTBEAT_S = 0.2
    settings.STREAM_GRACE_S = 1.0
    settings.STREAM_MATERIALIZE_S = 0.05
    settings.CHAT_TEMPERATURE = 0.0
    settings.CELERY_TASK_ALWAYS_EAGER = True
    return settings


async def _idle(engine, timeout_s=5.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert asyncio.get_running_loop().time() < deadline, engine.stats()
        await asyncio.sleep(0.02)


async def test_a_turn_on_the_engine_streams_what_it_stores(alice, chat_engine, engine_settings):
    engine_settings.CHAT_REPLY_MAX_TOKENS = 24
    reply = await new_reply(alice, "Hello there")
    turns.start_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice), timeout_s=30)
    done = events_of(raw)[-1]
    assert done["event"] == "done" and done["data"]["status"] == "complete"
    stored = await load(reply.id)
    assert stored.content == text_of(raw)
    assert 0 < stored.completion_tokens <= 24 and stored.prompt_tokens > 0
    await _idle(chat_engine)


async def test_stop_frees_the_engine_sequence_and_keeps_usage(alice, chat_engine, engine_settings):
    engine_settings.CHAT_REPLY_MAX_TOKENS = 1500
    reply = await new_reply(alice, "Hello there")
    turns.start_reply(reply.id)
    comm = open_stream(reply.id, user=alice)
    await read_stream(comm, timeout_s=30, stop_after=lambda raw: raw.count(b"event: token") >= 5)
    assert await turns.stop_reply(reply.id) == "stopped"
    stored = await load(reply.id)
    assert stored.status == "stopped" and 5 <= stored.completion_tokens < 1500
    await _idle(chat_engine)  # the sequence left the engine
    assert chat_engine.stats()["kv_blocks_used"] <= chat_engine.stats()["kv_blocks_cached"]


async def test_a_reply_nobody_reads_is_interrupted_and_freed(alice, chat_engine, engine_settings, monkeypatch):
    # An engine that knows no EOS and takes at least 5 ms a step needs 9.5 s
    # for these 1,900 tokens: only the 1 s grace can end the reply sooner.
    monkeypatch.setattr(chat_engine, "eos_token_ids", set())
    monkeypatch.setattr(chat_engine, "step_observer", lambda batch, duration_s: time.sleep(0.005))
    engine_settings.CHAT_REPLY_MAX_TOKENS = 1900
    reply = await new_reply(alice, "Hello there")
    status = await asyncio.wait_for(turns.generate_reply(reply.id), 60)
    stored = await load(reply.id)
    assert status == "interrupted" and stored.status == "interrupted"
    await _idle(chat_engine)
