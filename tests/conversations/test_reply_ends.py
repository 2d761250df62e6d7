"""Every reply ends in a terminal status, whatever fails: Redis on its first
or last event, the database while it finishes, or the process that
generated it (the heartbeat and the reaper)."""
import asyncio
import datetime

import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.utils import timezone

from conversations import services, streams, turns
from conversations.models import Message
from tests.conversations.conftest import load, new_reply
from tests.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)


@sync_to_async
def streaming_reply(user, *, text="", beat_s_ago: float = 0):
    """A reply some process is (or was) generating, its last heartbeat `beat_s_ago`."""
    conversation = services.conversation_create(user=user)
    reply = services.message_send(conversation=conversation, text="Hi")
    services.reply_start(reply_id=reply.id, request_id=f"r-{reply.id}")
    services.replies_materialize(checkpoints={reply.id: (text, 3)})
    Message.objects.filter(id=reply.id).update(
        heartbeat_at=timezone.now() - datetime.timedelta(seconds=beat_s_ago))
    return reply


def failing_append(monkeypatch, reply_id, *, which=lambda event: True):
    """Appends of `reply_id`'s events that `which` picks fail with a Redis
    connection error (streams.append and ReplyLog both queue through
    streams.append_nowait)."""
    real = streams.append_nowait

    def append_nowait(rid, event):
        if str(rid) == str(reply_id) and which(event):
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(redis.exceptions.ConnectionError("Redis went away"))
            return failed
        return real(rid, event)

    monkeypatch.setattr(streams, "append_nowait", append_nowait)


# ------------------------------------------------------------ Redis and the database fail

async def test_a_redis_failure_on_the_first_event_ends_the_reply_with_an_error(alice, fake_gateway, monkeypatch):
    reply = await new_reply(alice)
    failing_append(monkeypatch, reply.id)
    assert await turns.generate_reply(reply.id) == "error"
    stored = await load(reply.id)
    assert stored.status == "error" and stored.error and stored.finished_at is not None


async def test_an_unpublished_terminal_event_still_leaves_the_reply_ended_in_the_database(
        alice, fake_gateway, monkeypatch):
    reply = await new_reply(alice)
    failing_append(monkeypatch, reply.id, which=lambda event: event.terminal)
    assert await turns.generate_reply(reply.id) == "complete"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "Hello, world!")


async def test_a_database_failure_while_finishing_is_retried(alice, fake_gateway, monkeypatch):
    reply = await new_reply(alice)
    real, calls = services.reply_finish, []

    def reply_finish(**kwargs):
        calls.append(kwargs["status"])
        if len(calls) <= 2:
            raise OperationalError("terminating connection due to administrator command")
        return real(**kwargs)

    monkeypatch.setattr(services, "reply_finish", reply_finish)
    monkeypatch.setattr(turns, "SETTLE_RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    assert await turns.generate_reply(reply.id) == "complete"
    assert calls == ["complete"] * 3
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "Hello, world!")
    events = await streams.read_after(reply.id, 0)
    assert events[-1].event == "done" and events[-1].seq == stored.stream_seq


# ------------------------------------------------------------ heartbeats and the reaper

async def test_the_reaper_ends_a_stale_reply_keeping_its_text_and_spares_another_nodes_live_one(
        alice, bob, settings):
    settings.REPLY_STALE_S = 90
    stale = await streaming_reply(alice, text="half a rep", beat_s_ago=120)
    live = await streaming_reply(bob, text="still going", beat_s_ago=5)  # another serve's, beating
    assert await turns.reap_stale_replies() == 1
    stale_now, live_now = await load(stale.id), await load(live.id)
    assert (stale_now.status, stale_now.content) == ("interrupted", "half a rep")
    assert stale_now.finished_at is not None and stale_now.error
    assert (live_now.status, live_now.content) == ("streaming", "still going")
    # Readers still tailing the stale reply's log get its end there too.
    events = await streams.read_after(stale.id, 0)
    assert events[-1].event == "done" and events[-1].data["status"] == "interrupted"
    assert events[-1].data.get("replace") and "half a rep" in events[-1].data["html"]
    assert await turns.reap_stale_replies() == 0


async def test_the_reaper_keeps_the_text_a_killed_process_streamed_after_its_last_checkpoint(alice, settings):
    """A process killed between two materializations: its log in Redis still
    holds the tokens readers saw, and the stored reply must not lose them."""
    settings.REPLY_STALE_S = 90
    reply = await streaming_reply(alice, text="half a rep", beat_s_ago=120)  # stored through seq 3
    for seq, text in ((1, "half"), (2, " a"), (3, " rep"), (4, "ly,"), (5, " then")):
        await streams.append(reply.id, streams.StreamEvent(seq=seq, event="token", data={"t": text}))
    assert await turns.reap_stale_replies() == 1
    stored = await load(reply.id)
    assert (stored.status, stored.content, stored.stream_seq) == ("interrupted", "half a reply, then", 5)
    end = (await streams.read_after(reply.id, 0))[-1]
    assert end.seq == 6 and end.data["replace"] and "half a reply, then" in end.data["html"]


async def test_the_reaper_ends_a_reply_with_its_streamed_text_in_one_update(alice, settings, monkeypatch):
    """Nobody reads the ended reply without the text its log held: the
    status and the recovered text change together (a reader that saw
    `interrupted` first and the text a moment later once failed CI)."""
    settings.REPLY_STALE_S = 90
    reply = await streaming_reply(alice, text="half a rep", beat_s_ago=120)
    for seq, text in ((1, "half"), (2, " a"), (3, " rep"), (4, "ly")):
        await streams.append(reply.id, streams.StreamEvent(seq=seq, event="token", data={"t": text}))
    seen = []
    real = services.reap_stale_replies

    def reap_and_look(**kwargs):
        reaped = real(**kwargs)
        seen.append(Message.objects.values_list("status", "content").get(id=reply.id))
        return reaped

    monkeypatch.setattr(services, "reap_stale_replies", reap_and_look)
    assert await turns.reap_stale_replies() == 1
    assert seen == [("interrupted", "half a reply")]


async def test_the_start_up_reaper_keeps_the_text_a_killed_process_streamed(alice, settings):
    settings.REPLY_STALE_S = 90
    reply = await streaming_reply(alice, text="half a rep", beat_s_ago=120)  # stored through seq 3
    for seq, text in ((1, "half"), (2, " a"), (3, " rep"), (4, "ly,"), (5, " then")):
        await streams.append(reply.id, streams.StreamEvent(seq=seq, event="token", data={"t": text}))
    assert await sync_to_async(services.reap_orphaned_replies)() == 1
    stored = await load(reply.id)
    assert (stored.status, stored.content, stored.stream_seq) == ("interrupted", "half a reply, then", 5)


async def test_the_reaper_adds_a_log_read_before_a_later_checkpoint_only_once(alice, settings):
    """A log read at one checkpoint is not added to a row that was
    materialized past it meanwhile (its text already holds those tokens)."""
    settings.REPLY_STALE_S = 90
    reply = await streaming_reply(alice, text="half a rep", beat_s_ago=120)
    for seq, text in ((1, "half"), (2, " a"), (3, " rep"), (4, "ly")):
        await streams.append(reply.id, streams.StreamEvent(seq=seq, event="token", data={"t": text}))
    streamed = await services.streamed_since(await sync_to_async(services.stale_replies)())
    await sync_to_async(Message.objects.filter(id=reply.id).update)(content="half a reply", stream_seq=4)
    await sync_to_async(services.reap_stale_replies)(streamed=streamed)
    stored = await load(reply.id)
    assert (stored.status, stored.content, stored.stream_seq) == ("interrupted", "half a reply", 4)


async def test_stop_after_the_generating_process_died_keeps_what_it_streamed(alice, settings):
    reply = await streaming_reply(alice, text="first", beat_s_ago=0)
    for seq, text in ((1, "fir"), (2, "st"), (3, ""), (4, " and second")):
        await streams.append(reply.id, streams.StreamEvent(seq=seq, event="token", data={"t": text}))
    assert await turns.stop_reply(reply.id, wait_s=0.2) == "stopped"  # no task answers
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("stopped", "first and second")


async def test_a_pending_reply_that_never_started_is_reaped_once_stale(alice, settings):
    settings.REPLY_STALE_S = 90
    reply = await new_reply(alice)
    assert await turns.reap_stale_replies() == 0  # just created: its task may be about to run
    await sync_to_async(Message.objects.filter(id=reply.id).update)(
        heartbeat_at=timezone.now() - datetime.timedelta(seconds=120))
    assert await turns.reap_stale_replies() == 1
    assert (await load(reply.id)).status == "interrupted"


async def test_the_start_up_reaper_of_a_second_serve_leaves_the_first_ones_live_replies_alone(alice, bob, settings):
    settings.REPLY_STALE_S = 90
    live = await streaming_reply(alice, text="going", beat_s_ago=1)
    dead = await streaming_reply(bob, text="gone", beat_s_ago=300)
    assert await sync_to_async(services.reap_orphaned_replies)() == 1
    assert (await load(live.id)).status == "streaming"
    assert (await load(dead.id)).status == "interrupted"


async def test_a_reply_generating_longer_than_the_stale_threshold_is_kept_alive(alice, bob, fake_gateway, settings):
    """The process's keeper beats its live replies, so its own reaper (and any
    other serve's) never takes one that is still being written; a reply of a
    dead process is reaped by the same periodic pass."""
    settings.REPLY_HEARTBEAT_S = 0.1
    settings.REPLY_STALE_S = 0.5
    settings.STREAM_MATERIALIZE_S = 60  # no partial-text writes: only the keeper beats
    fake_gateway.delay_s = 0.4  # four tokens: 1.6 s, three stale thresholds
    orphan = await streaming_reply(bob, text="orphaned", beat_s_ago=0)
    reply = await new_reply(alice)
    task = turns.start_reply(reply.id)

    async def orphan_reaped():
        return (await load(orphan.id)).status == "interrupted"

    await eventually(orphan_reaped, timeout_s=3)
    assert await task == "complete"
    assert (await load(reply.id)).status == "complete"
