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


class _KeepAliveBackend:
    """bench.sse_stub (HTTP/1.1, chunked, keep-alive, as vLLM and llama.cpp
    answer) on a loop of its own, counting the connections it accepts."""

    def __init__(self):
        import threading

        from bench import sse_stub

        self.connections = 0
        handle = sse_stub._handler(0.001)

        async def counting(reader, writer):
            self.connections += 1
            await handle(reader, writer)

        self.loop, ready = asyncio.new_event_loop(), threading.Event()

        def run():
            self.server = self.loop.run_until_complete(asyncio.start_server(counting, "127.0.0.1", 0))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        self.base_url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    def stop(self):
        async def shut():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:  # connections kept alive, waiting for a next request
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def test_replies_from_a_keep_alive_backend_reuse_one_connection(transactional_db, alice):
    backend = _KeepAliveBackend()
    try:
        await sync_to_async(add_remote)(backend, "kept", remote_model="stub")
        for _ in range(3):
            text, final = "", None
            async for event in stream_chat(ask(alice, "kept", max_tokens=5)):
                if isinstance(event, TokenEvent):
                    text += event.text
                else:
                    final = event
            assert text == "the quick brown fox jumps" and final.finish_reason == "length"
        # Read to the end of each response after [DONE], the connection went
        # back to the pool: three replies, one TCP handshake.
        assert backend.connections == 1
    finally:
        backend.stop()
