"""200 SSE clients connecting and dropping at random while replies stream:
every reply still ends in a terminal status, no reader is left counted,
and the next chat works."""
import asyncio
import random

import pytest
from asgiref.sync import sync_to_async

from chatapp import runtime
from conversations import services, streams, turns
from conversations.models import Message
from tests.conversations.conftest import events_of, open_stream, read_stream

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 200
REPLIES = 10


@sync_to_async
def new_reply(user, text="Hi"):
    conversation = services.conversation_create(user=user)
    return services.message_send(conversation=conversation, text=text)


async def one_client(reply_id, user, rng: random.Random) -> str:
    """Connect at a random moment (resuming or not), then read to the end, or
    drop after a random while: a dropped browser connection reaches the
    application as `http.disconnect`, as Daphne sends it."""
    await asyncio.sleep(rng.uniform(0, 1.5))
    comm = open_stream(reply_id, user=user, last_event_id=rng.choice([None, None, 0, 3]))
    await comm.send_input({"type": "http.request", "body": b"", "more_body": False})
    stay_s = rng.choice([30, rng.uniform(0, 0.2), rng.uniform(0, 1.0)])
    deadline = asyncio.get_running_loop().time() + stay_s
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            message = await asyncio.wait_for(comm.output_queue.get(), max(remaining, 0.001))
            if message.get("type") == "http.response.body" and not message.get("more_body"):
                return await _ended(comm, "ended")
    except asyncio.TimeoutError:
        pass
    await comm.send_input({"type": "http.disconnect"})
    return await _ended(comm, "dropped")


async def _ended(comm, outcome: str):
    """The outcome, or the exception the consumer ended with after its response."""
    try:
        await comm.wait(10)
    except Exception as exc:
        return exc
    return outcome


async def test_200_clients_connecting_and_dropping_at_random(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"w{i} " for i in range(30)]
    fake_gateway.delay_s = 0.05  # 1.5 s a reply: clients arrive before, during and after
    replies = [await new_reply(alice, f"question {i}") for i in range(REPLIES)]
    for reply in replies:
        turns.start_reply(reply.id)
    rng = random.Random(7)
    outcomes = await asyncio.gather(*(
        one_client(rng.choice(replies).id, alice, random.Random(rng.random())) for _ in range(CLIENTS)))
    # Every consumer ends cleanly: redis-py 8's 5 s socket timeout once
    # raced channels_redis's 5 s blocking receive (about 2 in 200 here).
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert {"ended", "dropped"} == set(outcomes)

    await turns.wait_idle(30)
    stored = await sync_to_async(list)(Message.objects.filter(id__in=[r.id for r in replies]))
    assert all(m.status in Message.TERMINAL for m in stored), [m.status for m in stored]
    for reply in replies:
        assert streams.local_readers(reply.id) == 0
        assert await streams.live_subscribers(reply.id) == 0

    # The next chat works, from its first event to its last.
    fake_gateway.script = ["All ", "good."]
    reply = await new_reply(alice, "and now?")
    comm = open_stream(reply.id, user=alice)
    turns.start_reply(reply.id)
    _, raw = await read_stream(comm)
    assert events_of(raw)[-1]["data"]["status"] == "complete"
    assert streams.local_readers(reply.id) == 0
    await turns.wait_idle(30)  # its after-reply work, still on the database threads
    runtime.close_db_threads()
