"""The relay of a remote stream: what arrives together goes on as one event,
counted as every chunk it holds, and a Stop ends a read that waits."""
import asyncio

from asgiref.sync import sync_to_async

from gateway import client
from gateway.services import stream_chat
from gateway.types import ChatRequest, TokenEvent
from tests.gateway.helpers import add_remote


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
