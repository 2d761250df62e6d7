"""The turn task and the SSE consumer (Channels ApplicationCommunicator):
ids, replay from Last-Event-ID, heartbeats, terminal events on done, stop,
error, the grace period, and 404 for other users' streams."""
import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from conversations import services, streams, turns
from conversations.streams import StreamEvent
from gateway.types import QuotaExceeded, TokenEvent
from tests.conversations.conftest import events_of, has_streamed_text, load, new_reply, open_stream, read_stream, text_of
from tests.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_turn_streams_tokens_then_done_and_stores_the_reply(alice, fake_gateway, fast_streams):
    reply = await new_reply(alice)
    comm = open_stream(reply.id, user=alice)
    turns.start_reply(reply.id)
    start, raw = await read_stream(comm)
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    events = events_of(raw)
    assert [e["event"] for e in events] == ["status", "token", "token", "token", "token", "done"]
    assert [int(e["id"]) for e in events] == [1, 2, 3, 4, 5, 6]
    assert text_of(raw) == "Hello, world!"
    done = events[-1]["data"]
    assert done["status"] == "complete" and "Hello, world!" in done["html"]
    assert done["usage"]["completion_tokens"] == 4
    stored = await load(reply.id)
    assert (stored.status, stored.content, stored.completion_tokens, stored.stream_seq) == ("complete", "Hello, world!", 4, 6)


async def test_replay_from_last_event_id_has_no_gap_and_no_duplicate(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"w{i} " for i in range(30)]
    fake_gateway.delay_s = 0.01
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    first = open_stream(reply.id, user=alice)
    # Read the first few tokens, then drop the connection mid-reply.
    _, raw1 = await read_stream(first, stop_after=lambda raw: raw.count(b"event: token") >= 5)
    await first.send_input({"type": "http.disconnect"})
    got = events_of(raw1)
    last_id = got[-1]["id"]
    second = open_stream(reply.id, user=alice, last_event_id=last_id)
    _, raw2 = await read_stream(second)
    assert text_of(raw1) + text_of(raw2) == "".join(fake_gateway.script)
    ids = [int(e["id"]) for e in got + events_of(raw2)]
    assert ids == list(range(1, len(ids) + 1))
    # The query-string fallback (a fresh page) behaves the same.
    third = open_stream(reply.id, user=alice, query=f"last_event_id={last_id}")
    _, raw3 = await read_stream(third)
    assert text_of(raw3) == text_of(raw2)


async def test_a_finished_reply_replays_its_log_or_its_stored_text(alice, fake_gateway, fast_streams):
    reply = await new_reply(alice)
    await turns.generate_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    assert text_of(raw) == "Hello, world!" and events_of(raw)[-1]["event"] == "done"
    # Served from another process's log (Redis), the same.
    streams.drop_local(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    assert text_of(raw) == "Hello, world!" and events_of(raw)[-1]["event"] == "done"
    # The log expired: the stored text comes as the terminal event's HTML.
    await streams.client().delete(streams.log_key(reply.id))
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    (only,) = events_of(raw)
    assert only["event"] == "done" and "Hello, world!" in only["data"]["html"]


async def test_heartbeat_comments_while_waiting(alice, fake_gateway, fast_streams):
    reply = await new_reply(alice)  # pending: no task yet, the stream waits
    comm = open_stream(reply.id, user=alice)
    _, raw = await read_stream(comm, stop_after=lambda raw: raw.count(b": heartbeat") >= 2)
    assert raw.count(b": heartbeat") >= 2
    # Each heartbeat marks the connection live for the grace-period watcher.
    assert await streams.live_subscribers(reply.id) == 1
    await comm.send_input({"type": "http.disconnect"})
    await comm.wait(1)
    assert await streams.live_subscribers(reply.id) == 0


async def test_stop_aborts_the_generation_and_keeps_the_partial_text(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(200)]
    fake_gateway.delay_s = 0.02
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    comm = open_stream(reply.id, user=alice)
    _, raw = await read_stream(comm, stop_after=lambda raw: raw.count(b"event: token") >= 3)
    status = await turns.stop_reply(reply.id)
    assert status == "stopped"
    assert fake_gateway.requests[-1].request_id in fake_gateway.aborted
    stored = await load(reply.id)
    assert stored.status == "stopped"
    assert 3 <= stored.completion_tokens < 200 and stored.content.startswith("t0 t1 t2 ")
    # The stream carries on to the terminal event, with exactly the stored text.
    while b"event: done" not in raw:
        raw += (await comm.receive_output(5)).get("body", b"")
    assert text_of(raw) == stored.content
    assert events_of(raw)[-1]["data"]["status"] == "stopped"


async def test_stop_of_a_reply_whose_process_died_ends_it_from_the_database(alice, fake_gateway, fast_streams):
    reply = await new_reply(alice)
    await sync_to_async(services.reply_start)(reply_id=reply.id, request_id="gone")
    await sync_to_async(services.replies_materialize)(checkpoints={reply.id: ("half", 3)})
    assert await turns.stop_reply(reply.id, wait_s=0.2) == "stopped"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("stopped", "half")
    _, raw = await read_stream(open_stream(reply.id, user=alice, last_event_id=3))
    (done,) = events_of(raw)
    assert done["event"] == "done" and done["data"]["status"] == "stopped"


async def test_no_reader_for_the_grace_period_interrupts_the_reply(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(500)]
    fake_gateway.delay_s = 0.01
    reply = await new_reply(alice)
    status = await asyncio.wait_for(turns.generate_reply(reply.id), 10)
    assert status == "interrupted"
    assert fake_gateway.requests[-1].request_id in fake_gateway.aborted
    stored = await load(reply.id)
    assert stored.status == "interrupted" and 0 < stored.completion_tokens < 500


async def test_a_reader_within_the_grace_period_keeps_it_going(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(150)]
    fake_gateway.delay_s = 0.01  # ~1.5 s: longer than the 1 s grace
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    assert events_of(raw)[-1]["data"]["status"] == "complete"
    assert text_of(raw) == "".join(fake_gateway.script)


async def test_gateway_refusal_before_the_first_token_is_a_readable_error(alice, fake_gateway, fast_streams):
    fake_gateway.error_before = QuotaExceeded("You have used your tokens for this minute.", retry_after_s=42)
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    last = events_of(raw)[-1]
    assert last["event"] == "error"
    assert "Try again in 42 seconds" in last["data"]["error"]
    stored = await load(reply.id)
    assert stored.status == "error" and "42 seconds" in stored.error


async def test_failure_after_tokens_keeps_the_partial_text_with_error(alice, fake_gateway, fast_streams):
    fake_gateway.fail_after = 2
    reply = await new_reply(alice)
    assert await turns.generate_reply(reply.id) == "error"
    stored = await load(reply.id)
    assert (stored.status, stored.content, stored.error) == ("error", "Hello, ", "backend died")
    _, raw = await read_stream(open_stream(reply.id, user=alice))
    assert events_of(raw)[-1]["event"] == "error"


async def test_an_exception_in_the_gateway_never_leaves_a_stream_open(alice, fake_gateway, fast_streams, monkeypatch):
    async def broken(request):
        yield TokenEvent("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(fake_gateway, "stream", broken)
    reply = await new_reply(alice)
    assert await turns.generate_reply(reply.id) == "error"
    stored = await load(reply.id)
    assert stored.content == "x" and "failed" in stored.error


async def test_partial_text_is_materialized_while_streaming(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(60)]
    fake_gateway.delay_s = 0.02
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    comm = open_stream(reply.id, user=alice)
    await read_stream(comm, stop_after=lambda raw: raw.count(b"event: token") >= 30)
    mid = await load(reply.id)
    assert mid.status == "streaming" and mid.content and mid.stream_seq > 1
    # What the database holds is exactly the log up to stream_seq.
    log = await streams.read_after(reply.id, 0)
    assert "".join(e.data["t"] for e in log if e.event == "token" and e.seq <= mid.stream_seq) == mid.content
    await turns.stop_reply(reply.id)


async def test_the_first_checkpoint_comes_an_interval_after_the_first_token(alice, fake_gateway, fast_streams):
    """Not an interval after the turn started: the first tokens of a burst of
    new chats come seconds in, and each wrote the database at once while the
    burst's other chats were still being saved on the same threads."""
    fast_streams.STREAM_MATERIALIZE_S = 0.3
    fake_gateway.delay_s = 0.6  # every gap, the first one too, is longer than the interval
    reply = await new_reply(alice)
    turns.start_reply(reply.id)
    comm = open_stream(reply.id, user=alice)
    await read_stream(comm, stop_after=lambda raw: b"event: token" in raw)
    await asyncio.sleep(0.2)  # the second token is 0.4 s away
    first = await load(reply.id)
    assert first.status == "streaming" and first.content == ""

    async def checkpointed():
        return (await load(reply.id)).content.startswith("Hello, ")

    await eventually(checkpointed, timeout_s=5)
    await turns.stop_reply(reply.id)


async def test_a_stuck_checkpoint_does_not_hold_the_stream(alice, fake_gateway, fast_streams, monkeypatch):
    """The partial-text checkpoint is written beside the stream: with the
    database thread stuck in one, every token still reaches the log, and the
    end is stored once the checkpoint is through."""
    import threading

    stuck = threading.Event()
    release = threading.Event()
    real = services.replies_materialize
    writes = []

    def slow_materialize(*, checkpoints):
        writes.append(checkpoints)
        stuck.set()
        assert release.wait(30), "the test never released the checkpoint"
        return real(checkpoints=checkpoints)

    monkeypatch.setattr(services, "replies_materialize", slow_materialize)
    fake_gateway.script = [f"t{i} " for i in range(40)]
    fake_gateway.delay_s = 0.01  # ~0.4 s: many checkpoint intervals (0.05 s)
    reply = await new_reply(alice)
    task = turns.start_reply(reply.id)
    reader = asyncio.ensure_future(read_stream(open_stream(reply.id, user=alice)))  # a reader: no grace timeout
    await eventually(stuck.is_set, timeout_s=10)

    async def every_token_logged():
        return sum(e.event == "token" for e in await streams.read_after(reply.id, 0)) == 40

    try:
        await eventually(every_token_logged, timeout_s=10)
        assert writes == writes[:1], "a second checkpoint was queued behind the stuck one"
        assert not task.done()  # the end waits for the checkpoint, then is the database's last word
    finally:
        release.set()
    _, raw = await asyncio.wait_for(reader, 10)
    assert text_of(raw) == "".join(f"t{i} " for i in range(40))
    assert await asyncio.wait_for(task, 10) == "complete"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "".join(f"t{i} " for i in range(40)))


async def test_replies_streaming_together_are_checkpointed_in_one_statement(alice, fake_gateway, fast_streams,
                                                                          monkeypatch):
    """A process writes the partial texts of all its streaming replies in one
    statement an interval, not one statement per reply."""
    real = services.replies_materialize
    statements = []

    def counting_materialize(*, checkpoints):
        statements.append(dict(checkpoints))
        return real(checkpoints=checkpoints)

    monkeypatch.setattr(services, "replies_materialize", counting_materialize)
    fast_streams.STREAM_MATERIALIZE_S = 0.2
    script = [f"t{i} " for i in range(60)]
    fake_gateway.script = script
    fake_gateway.delay_s = 0.02  # ~1.2 s a reply: several intervals
    replies = [await new_reply(alice) for _ in range(4)]
    tasks = [turns.start_reply(reply.id) for reply in replies]
    readers = [asyncio.ensure_future(read_stream(open_stream(reply.id, user=alice))) for reply in replies]
    assert await asyncio.wait_for(asyncio.gather(*tasks), 30) == ["complete"] * 4
    for reader in readers:
        _, raw = await asyncio.wait_for(reader, 10)
        assert text_of(raw) == "".join(script)
    assert max(len(checkpoints) for checkpoints in statements) == 4, statements
    # Each statement held the text and sequence number of one moment.
    for checkpoints in statements:
        for content, seq in checkpoints.values():
            assert content == "".join(script[:seq - 1])  # the first event is the status
    for reply in replies:
        stored = await load(reply.id)
        assert (stored.status, stored.content) == ("complete", "".join(script))


async def test_a_failed_checkpoint_is_written_again_with_newer_text_and_the_reply_goes_on(alice, fake_gateway,
                                                                                       fast_streams, monkeypatch):
    from django.db import OperationalError

    real = services.replies_materialize
    statements = []

    def failing_once(*, checkpoints):
        statements.append(dict(checkpoints))
        if len(statements) == 1:
            raise OperationalError("terminating connection due to administrator command")
        return real(checkpoints=checkpoints)

    monkeypatch.setattr(services, "replies_materialize", failing_once)
    fast_streams.STREAM_MATERIALIZE_S = 0.1
    script = [f"t{i} " for i in range(100)]
    fake_gateway.script = script
    fake_gateway.delay_s = 0.02  # ~2 s: many intervals
    reply = await new_reply(alice)
    task = turns.start_reply(reply.id)
    reader = asyncio.ensure_future(read_stream(open_stream(reply.id, user=alice)))
    assert await asyncio.wait_for(task, 30) == "complete"
    _, raw = await asyncio.wait_for(reader, 10)
    assert text_of(raw) == "".join(script)
    [(_, failed_seq)] = statements[0].values()
    [(_, next_seq)] = statements[1].values()
    assert next_seq > failed_seq
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "".join(script))


async def test_a_reply_whose_log_cannot_be_written_ends_as_an_error_and_frees_the_model(alice, fake_gateway,
                                                                                       fast_streams):
    """The status event is written beside the gateway's admission: when Redis
    cannot take it, nothing is relayed and the generation is closed at its
    first token, instead of streaming to no reader."""
    fast_streams.STREAM_REDIS_RETRY_DELAYS_S = (0.01,)
    fake_gateway.script = [f"t{i} " for i in range(50)]
    fake_gateway.delay_s = 0.01
    reply = await new_reply(alice)
    fast_streams.REDIS_URL = "redis://127.0.0.1:1/0"
    assert await asyncio.wait_for(turns.generate_reply(reply.id), 30) == "error"
    stored = await load(reply.id)
    assert stored.status == "error" and stored.error == turns.STREAM_FAILED and stored.content == ""
    assert fake_gateway.yielded == [1]


async def test_other_users_get_404_for_a_stream(alice, bob, fake_gateway, fast_streams):
    reply = await new_reply(alice)
    comm = open_stream(reply.id, user=bob)
    await comm.send_input({"type": "http.request", "body": b""})
    start = await comm.receive_output(5)
    assert start["status"] == 404
    from django.contrib.auth.models import AnonymousUser

    comm = open_stream(reply.id, user=AnonymousUser())
    await comm.send_input({"type": "http.request", "body": b""})
    assert (await comm.receive_output(5))["status"] == 404


async def test_events_encode_newlines_safely():
    ev = StreamEvent(seq=3, event="token", data={"t": "a\n\ndata: fake"})
    frame = ev.encode().decode()
    assert frame.count("\n\n") == 1 and frame.startswith("id: 3\nevent: token\n")


async def test_stop_before_generation_starts_ends_it_at_once(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(300)]
    fake_gateway.delay_s = 0.01
    reply = await new_reply(alice)
    await streams.request_stop(reply.id)
    assert await asyncio.wait_for(turns.generate_reply(reply.id), 5) == "stopped"
    stored = await load(reply.id)
    assert stored.status == "stopped" and stored.completion_tokens < 20


async def test_server_shutdown_marks_the_reply_interrupted(alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(300)]
    fake_gateway.delay_s = 0.01
    reply = await new_reply(alice)
    task = turns.start_reply(reply.id)
    await eventually(lambda: has_streamed_text(reply.id))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await load(reply.id)
    assert stored.status == "interrupted" and stored.content.startswith("t0 ")


async def test_a_stream_follows_a_reply_generated_in_another_process(alice, fast_streams):
    """The log in Redis and the shared poke channel are all another process
    needs: each append wakes the stream at once (heartbeats are far apart)."""
    fast_streams.STREAM_HEARTBEAT_S = 30
    reply = await new_reply(alice)
    comm = open_stream(reply.id, user=alice)
    await comm.send_input({"type": "http.request", "body": b"", "more_body": False})
    assert (await comm.receive_output(5))["type"] == "http.response.start"
    assert b"retry:" in (await comm.receive_output(5))["body"]
    conn = streams.client()
    script = [("status", {"status": "streaming"}), ("token", {"t": "far "}), ("token", {"t": "away"}),
              ("done", {"status": "complete", "html": "<p>far away</p>", "error": ""})]
    raw = b""
    for seq, (event, data) in enumerate(script, start=1):
        await conn.xadd(streams.log_key(reply.id), {"e": event, "d": json.dumps(data)}, id=f"{seq}-0")
        await conn.publish(streams.new_channel(), f"another-process {reply.id}")
        msg = await comm.receive_output(2)  # woken by the poke, not by a heartbeat 30 s away
        raw += msg["body"]
    assert not msg.get("more_body")
    assert [int(e["id"]) for e in events_of(raw)] == [1, 2, 3, 4]
    assert text_of(raw) == "far away"


async def test_a_replay_from_before_this_process_wrote_reads_redis(alice, fast_streams):
    """A process that wrote only the tail of a log (the Stop fallback) must not
    answer a replay from the beginning with that tail alone."""
    reply = await new_reply(alice)
    conn = streams.client()
    await conn.xadd(streams.log_key(reply.id), {"e": "token", "d": json.dumps({"t": "early "})}, id="1-0")
    await streams.append(reply.id, StreamEvent(seq=2, event="token", data={"t": "late"}))
    assert [e.seq for e in await streams.read_after(reply.id, 0)] == [1, 2]
    assert [e.seq for e in await streams.read_after(reply.id, 1)] == [2]


async def test_a_local_log_without_a_terminal_event_does_not_live_forever(alice, fast_streams):
    """A reply whose task died before its terminal event leaves no lasting
    memory behind: once Redis would have expired it, the next reply drops it."""
    fast_streams.STREAM_LOG_TTL_S = 10
    dead, alive = await new_reply(alice), await new_reply(alice)
    await streams.append(dead.id, StreamEvent(seq=1, event="token", data={"t": "half"}))
    assert str(dead.id) in streams._state().logs
    streams._state().logs[str(dead.id)].touched_at -= 11
    await streams.append(alive.id, StreamEvent(seq=1, event="token", data={"t": "new"}))
    assert str(dead.id) not in streams._state().logs and str(alive.id) in streams._state().logs
    # Its readers still get it, from Redis.
    assert [e.data["t"] for e in await streams.read_after(dead.id, 0)] == ["half"]


async def test_heartbeats_are_recorded_together_and_never_revive_a_closed_stream(alice, fast_streams):
    reply = await new_reply(alice)
    await streams.subscriber_touch(reply.id, "a")
    await streams.subscriber_touch(reply.id, "b")
    fast_streams.STREAM_HEARTBEAT_S = 1000  # scores from the test's own beats only
    conn = streams.client()
    before = await conn.zscore(streams.subs_key(reply.id), "a")
    streams.subscriber_heartbeat(reply.id, "a")
    streams.subscriber_heartbeat(reply.id, "b")
    await streams.subscriber_leave(reply.id, "b")
    streams.subscriber_heartbeat(reply.id, "b")  # a late beat of a stream that has closed

    async def a_was_recorded():
        return await conn.zscore(streams.subs_key(reply.id), "a") > before

    await eventually(a_was_recorded)  # in the same ZADD as b's late beat
    assert await conn.zscore(streams.subs_key(reply.id), "b") is None
    assert await streams.live_subscribers(reply.id) == 1


async def test_an_open_stream_ends_when_its_reply_is_ended_without_a_log(alice, fast_streams):
    """The reaper ends replies of a dead process in the database only: a stream
    left open on one finds out within a few heartbeats and closes with it."""
    reply = await new_reply(alice)
    await sync_to_async(services.reply_start)(reply_id=reply.id, request_id="dead-process")
    comm = open_stream(reply.id, user=alice)
    reading = asyncio.create_task(read_stream(comm, timeout_s=10))
    await eventually(lambda: streams.live_subscribers(reply.id))  # open and waiting
    assert not reading.done()
    assert len(await sync_to_async(services.reap_stale_replies)(stale_s=0)) == 1  # its process died
    _, raw = await reading
    assert raw.count(b": heartbeat") >= 1
    assert events_of(raw)[-1]["event"] == "done"
    assert events_of(raw)[-1]["data"]["status"] == "interrupted"


async def test_the_site_authenticates_a_stream_by_its_session_cookie(alice, bob, fake_gateway, fast_streams):
    """Through the deployed ASGI application (no user in the scope): the
    session cookie decides, as for every page."""
    from channels.testing import ApplicationCommunicator
    from django.test import Client

    from chatapp.asgi import application

    @sync_to_async
    def session_cookie(user):
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    reply = await new_reply(alice)
    await turns.stop_reply(reply.id)  # ended: the stream replays it and closes

    async def status_for(cookie):
        path = f"/c/reply/{reply.id}/stream"
        headers = [(b"host", b"testserver")] + ([(b"cookie", f"sessionid={cookie}".encode())] if cookie else [])
        comm = ApplicationCommunicator(application, {
            "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1234), "server": ("testserver", 80)})
        await comm.send_input({"type": "http.request", "body": b""})
        status = (await comm.receive_output(5))["status"]
        if status == 200:
            body = b""
            while True:
                message = await comm.receive_output(5)
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            assert events_of(body)[-1]["event"] in ("done", "error")
        await comm.send_input({"type": "http.disconnect"})
        await comm.wait(5)
        return status

    assert await status_for(await session_cookie(alice)) == 200
    assert await status_for(await session_cookie(bob)) == 404
    assert await status_for("not-a-session") == 404
    assert await status_for(None) == 404


async def test_a_new_chat_moves_to_streaming_beside_the_gateway_and_shows_nothing_before(
        alice, fake_gateway, fast_streams, monkeypatch):
    """The page's path: the turn is saved and its request built in one trip
    (the reply still pending); the task's move to streaming runs beside the
    gateway's admission, and no token is shown before it is stored."""
    real_start = services.reply_start
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_start(**kwargs):
        import time
        time.sleep(0.3)  # the database thread, held: the gateway's tokens are ready long before
        try:
            return real_start(**kwargs)
        finally:
            loop.call_soon_threadsafe(done.set)

    monkeypatch.setattr(services, "reply_start", slow_start)
    reply, prepared = await sync_to_async(turns.create_and_prepare)(services.conversation_start, user=alice,
                                                                     text="hello")
    assert prepared is not None and (await load(reply.id)).status == "pending"
    task = turns.start_reply(reply.id, prepared)
    while not done.is_set():
        assert not any(e.event == "token" for e in await streams.read_after(reply.id, 0))
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(task, 10) == "complete"
    stored = await load(reply.id)
    assert (stored.status, stored.content) == ("complete", "Hello, world!")
    assert stored.request_id == prepared.request_id


async def test_a_new_chat_deleted_before_its_reply_started_generates_nothing_for_it(
        alice, fake_gateway, fast_streams):
    fake_gateway.script = [f"t{i} " for i in range(300)]
    fake_gateway.delay_s = 0.01
    reply, prepared = await sync_to_async(turns.create_and_prepare)(services.conversation_start, user=alice,
                                                                     text="hello")
    await sync_to_async(services.conversation_delete)(conversation=reply.conversation)
    assert await asyncio.wait_for(turns.generate_reply(reply.id, prepared), 5) == turns.GONE
    assert fake_gateway.yielded and fake_gateway.yielded[-1] < 20  # its stream was closed at the first token
    assert not any(e.event == "token" for e in await streams.read_after(reply.id, 0))
