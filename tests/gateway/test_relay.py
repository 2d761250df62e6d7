"""The relay of a remote stream: what arrives together goes on as one event,
counted as every chunk it holds, a Stop ends a read that waits, and the final
event goes out while the reply is billed, not after."""
import asyncio

import pytest
from asgiref.sync import sync_to_async

from gateway import client, services
from gateway.models import UsageRecord
from gateway.services import stream_chat
from gateway.types import ChatRequest, FinalEvent, TokenEvent
from tests.gateway.helpers import add_remote, give_plan


def ask(user, model, text="hello", max_tokens=64):
    return ChatRequest(messages=[{"role": "user", "content": text}], user_id=user.pk, model=model,
                       max_tokens=max_tokens, temperature=0.7)


async def test_chunks_that_arrive_together_are_relayed_whole_and_each_counted(remote, alice):
    words = [f"word{i}" for i in range(40)]
    tokens = []
    final = None
    async for event in stream_chat(ask(alice, "remote", " ".join(words))):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            final = event
    # The fake writes its 41 chunks back to back: however many reads they
    # took, the text is whole and every chunk is counted once.
    assert "".join(t.text for t in tokens) == "echo: " + " ".join(words)
    assert sum(t.pieces for t in tokens) == 41 == final.usage.completion_tokens
    assert final.finish_reason == "stop"


async def test_a_stop_while_the_backend_is_silent_ends_the_reply_as_aborted(remote, alice):
    await sync_to_async(add_remote)(remote, "stall", remote_model="fake-stall")
    request = ask(alice, "stall")
    events = []
    async for event in stream_chat(request):
        events.append(event)
        if isinstance(event, TokenEvent):
            # From another thread, as the Stop endpoint does.
            await asyncio.to_thread(client.current().abort, request.request_id)
    assert [e.text for e in events[:-1]] == ["echo:"]
    assert events[-1].finish_reason == "abort"


async def _reply_text(request) -> str:
    parts = []
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        else:
            assert event.finish_reason == "stop", event
    return "".join(parts)


async def test_a_finished_stream_leaves_its_connection_for_the_next(remote, alice):
    # A kept-alive backend writes its body's end 50 ms after [DONE]: the reply
    # does not wait for it, and the connection still goes back to the pool.
    await sync_to_async(add_remote)(remote, "kept", remote_model="fake-keepalive")
    before = remote.connections
    for i in range(3):
        assert await _reply_text(ask(alice, "kept", f"turn {i}")) == f"echo: turn {i}"
        await asyncio.sleep(0.2)  # the body's end arrives and is read off the reply's path
    assert remote.connections - before == 1


async def test_a_burst_on_a_kept_connection_gets_a_connection_each(remote, alice):
    await sync_to_async(add_remote)(remote, "kept", remote_model="fake-keepalive")
    await sync_to_async(give_plan)(alice, max_concurrent=16)
    assert await _reply_text(ask(alice, "kept", "warm")) == "echo: warm"
    await asyncio.sleep(0.2)
    texts = await asyncio.gather(*(_reply_text(ask(alice, "kept", f"n{i}")) for i in range(8)))
    assert texts == [f"echo: n{i}" for i in range(8)]


def test_the_http_client_of_a_closed_loop_is_closed_when_the_next_loop_asks(caplog):
    from chatapp import runtime

    async def client():
        return runtime.http()

    first = asyncio.run(client())
    assert not first.closed
    second = asyncio.run(client())
    assert second is not first and first.closed
    del first
    import gc

    gc.collect()
    assert "Unclosed" not in caplog.text


@pytest.fixture
def held_ledger(monkeypatch):
    """Ledger rows are written only once the returned event is set."""
    release = asyncio.Event()
    real = services._Run._write_ledger

    async def held(self, *args, **kwargs):
        await release.wait()
        await real(self, *args, **kwargs)

    monkeypatch.setattr(services._Run, "_write_ledger", held)
    return release


async def _until_final(events) -> FinalEvent:
    async for event in events:
        if isinstance(event, FinalEvent):
            return event
    raise AssertionError("no final event")


async def _row(request_id: str) -> UsageRecord:
    for _ in range(500):
        row = await UsageRecord.objects.filter(request_id=request_id).afirst()
        if row is not None:
            return row
        await asyncio.sleep(0.01)
    raise AssertionError("no ledger row")


async def test_the_final_event_goes_out_before_the_bill_and_a_consumer_leaving_keeps_it(remote, alice,
                                                                                        held_ledger):
    request = ask(alice, "remote", "hello world", max_tokens=10)
    events = stream_chat(request)
    final = await asyncio.wait_for(_until_final(events), 30)  # not held by the ledger's write
    assert final.finish_reason == "stop"
    assert not await UsageRecord.objects.filter(request_id=request.request_id).aexists()
    closing = asyncio.ensure_future(events.aclose())  # the consumer leaves, as the chat and the API do
    await asyncio.sleep(0.05)
    held_ledger.set()
    await asyncio.wait_for(closing, 30)
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    # Billed as the reply ended, not as an abort by the consumer's leaving.
    assert row.status == "stop"
    assert row.charged_tokens == final.usage.prompt_tokens + final.usage.completion_tokens > 0


async def test_a_consumer_cancelled_after_the_final_event_does_not_lose_the_bill(remote, alice, held_ledger):
    request = ask(alice, "remote", "hello world", max_tokens=10)
    seen = []

    async def consume():
        async for event in stream_chat(request):
            seen.append(event)

    consumer = asyncio.ensure_future(consume())
    for _ in range(3000):
        if seen and isinstance(seen[-1], FinalEvent):
            break
        await asyncio.sleep(0.01)
    assert isinstance(seen[-1], FinalEvent) and not consumer.done()  # it waits on the bill now
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    held_ledger.set()
    row = await _row(request.request_id)
    assert row.status == "stop" and row.completion_tokens == 3


async def test_a_settlement_that_fails_after_the_final_event_is_logged_not_raised(remote, alice, monkeypatch,
                                                                                  caplog):
    async def broken(self, charged):
        raise RuntimeError("reconcile broke")

    monkeypatch.setattr(services._Run, "_reconcile", broken)
    request = ask(alice, "remote", "hello world", max_tokens=10)
    events = [event async for event in stream_chat(request)]  # no exception reaches the consumer
    assert events[-1].finish_reason == "stop"
    assert any("reconcile broke" in str(r.exc_info) for r in caplog.records if "settling" in r.getMessage())
    row = await _row(request.request_id)  # the ledger half of the settlement still ran
    assert row.status == "stop"
