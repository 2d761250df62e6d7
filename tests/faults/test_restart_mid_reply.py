"""Redis or PostgreSQL restarted while a reply is streaming: the reply pauses
and then completes with all its text, stored and streamed, and the next chat
works without restarting anything."""
import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.conf import settings as django_settings

from chatapp import embedded
from conversations import streams, turns
from tests.conversations.conftest import has_streamed_text, load, new_reply
from tests.faults.test_db_restart import restart_postgres
from tests.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = [f"word{i} " for i in range(40)]


@pytest.fixture
def slow_reply(fake_gateway, settings):
    fake_gateway.script = SCRIPT
    fake_gateway.delay_s = 0.05
    settings.STREAM_MATERIALIZE_S = 0.1  # checkpoints land during the restart
    settings.STREAM_GRACE_S = 120  # nobody reads in these tests: that must not abort the reply
    return fake_gateway


def restart_redis() -> None:
    """What an operator's restart does: save, stop, start on the same socket."""
    embedded.stop_redis(django_settings.EMBEDDED_REDIS_DIR)
    embedded.start_redis(django_settings.EMBEDDED_REDIS_DIR)


async def restart_mid_reply(user, restart) -> tuple:
    reply = await new_reply(user, "Count for me")
    task = turns.start_reply(reply.id)
    await eventually(lambda: has_streamed_text(reply.id), timeout_s=30)
    await asyncio.to_thread(restart)
    await sync_to_async(connections.close_all)()  # the test's own connection, not the server's
    status = await asyncio.wait_for(task, 120)
    return reply, status


async def test_a_redis_restart_mid_reply_pauses_it_and_loses_no_text(alice, slow_reply):
    reply, status = await restart_mid_reply(alice, restart_redis)
    assert status == "complete"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "".join(SCRIPT))
    # The log readers replay holds every token once, in order, and the end.
    events = await streams.read_after(reply.id, 0)
    assert "".join(e.data["t"] for e in events if e.event == "token") == "".join(SCRIPT)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].event == "done"
    after, status = await restart_mid_reply(alice, lambda: None)  # and the next chat works
    assert status == "complete"


async def test_a_postgres_restart_mid_reply_keeps_the_reply_and_the_next_chat_works(
        alice, slow_reply, monkeypatch):
    # A restart takes seconds on a busy machine: storing the end retries for longer.
    monkeypatch.setattr(turns, "SETTLE_RETRY_DELAYS_S", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0))
    reply, status = await restart_mid_reply(alice, restart_postgres)
    assert status == "complete"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "".join(SCRIPT))
    after, status = await restart_mid_reply(alice, lambda: None)
    assert status == "complete" and (await load(after.id)).content == "".join(SCRIPT)
