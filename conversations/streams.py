"""The event log of a live reply, in Redis, shared by every Daphne process.

Each reply has a Redis Stream whose entry ids are `<seq>-0`, so an SSE
`id:` is the stream id and replaying "everything after Last-Event-ID" is a
plain XRANGE/XREAD from `<seq>-0`. The generating task is the only writer
(except the stop fallback for a reply whose process died). Alongside it:

- `…:subs`  a sorted set of live SSE connections scored by their last
  heartbeat, so a crashed web process stops counting after a while;
- `…:stop`  records a Stop request (a task that has not subscribed yet, or
  missed the poke, still finds it).

Two pub/sub channels serve every reply: `replies:new` carries, once per
batch of appends, the ids of the replies that grew (and which process wrote
them); `replies:ctl` carries the id of a reply whose Stop was requested.
Each process holds one pub/sub connection (the Fanout) that wakes its local
waiters, and commands share a bounded pool, so 500 idle streams hold 500
sockets to browsers and one to Redis, and opening a stream costs no
SUBSCRIBE round trip.

The common case (the SSE stream is served by the process that generates)
does not read Redis back at all: the writer keeps the events of its live
replies in memory once Redis has them, and wakes the local streams itself.
Redis stays the source for replays from other processes, after a restart,
and for the log's TTL.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from django.conf import settings

from chatapp import runtime
from conversations.models import Message
from conversations.rendering import render_markdown

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"done", "error"})
# How long a finished reply's events stay in this process's memory: streams
# that are reading it finish from there; later replays read Redis.
LOCAL_KEEP_S = 30.0

# Which process wrote an append, so that its own Fanout skips the poke (its
# local streams were woken directly).
ORIGIN = uuid.uuid4().hex[:12]

def client() -> aioredis.Redis:
    return runtime.redis_async()


def _prefix() -> str:
    return settings.CACHES["default"].get("KEY_PREFIX", "chatapp")


def _key(reply_id, suffix: str) -> str:
    return f"{_prefix()}:reply:{reply_id}:{suffix}"


def log_key(reply_id) -> str:
    return _key(reply_id, "log")


def subs_key(reply_id) -> str:
    return _key(reply_id, "subs")


def stop_key(reply_id) -> str:
    return _key(reply_id, "stop")


def new_channel() -> str:
    return f"{_prefix()}:replies:new"


def control_channel() -> str:
    return f"{_prefix()}:replies:ctl"


@dataclass(frozen=True)
class StreamEvent:
    seq: int
    event: str  # token | status | done | error
    data: dict

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def encode(self) -> bytes:
        """One SSE frame. JSON keeps newlines in the text off the wire format."""
        payload = json.dumps(self.data, separators=(",", ":"))
        return f"id: {self.seq}\nevent: {self.event}\ndata: {payload}\n\n".encode()


def terminal_event(
    seq: int, status: str, content: str, *, error: str = "", usage=None, finish_reason: str = "",
    replace: bool = False,
) -> StreamEvent:
    """The one event that ends a reply's stream: `done`, or `error` for a
    failed or blocked reply, with the final text rendered. `replace`: the
    text may differ from the tokens streamed (a Stop fallback ended it with
    what was materialized)."""
    data = {"status": status, "html": render_markdown(content), "error": error}
    if usage is not None:
        data["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                         "cached_tokens": usage.cached_tokens}
    if finish_reason:
        data["finish_reason"] = finish_reason
    if replace:
        data["replace"] = True
    failed = status in (Message.Status.ERROR, Message.Status.BLOCKED)
    return StreamEvent(seq=seq, event="error" if failed else "done", data=data)


def _decode(entry_id: bytes, fields: dict) -> StreamEvent:
    seq = int(entry_id.split(b"-", 1)[0])
    return StreamEvent(seq=seq, event=fields[b"e"].decode(), data=json.loads(fields[b"d"]))


# ------------------------------------------------------------ writing

async def append(reply_id, event: StreamEvent) -> None:
    """Add an event to a reply's log and poke its readers. Returns once it is
    in Redis. Appends made by all replies of this process in the same loop
    iteration share one pipelined round trip and one publish (32 replies
    decoding together produce 32 events per engine step)."""
    await append_nowait(reply_id, event)


def append_nowait(reply_id, event: StreamEvent) -> asyncio.Future:
    """`append` without the wait: the event is queued now, behind every event
    queued before it, and the future completes once Redis has it (or fails
    as `append` would raise)."""
    return _state().writer.queue(str(reply_id), event)


@dataclass
class _LocalLog:
    """The events this process appended to one reply, in seq order."""
    events: list = field(default_factory=list)
    seqs: list = field(default_factory=list)
    ttl_set_at: float = 0.0
    touched_at: float = 0.0

    def after(self, seq: int) -> list[StreamEvent] | None:
        """Everything after `seq`, or None when this log does not reach back that far."""
        if not self.seqs or self.seqs[0] > seq + 1:
            return None
        return self.events[bisect.bisect_right(self.seqs, seq):]


class _Writer:
    def __init__(self, state: "_LoopState"):
        self.state = state
        self.pending: list = []
        self.flusher: asyncio.Task | None = None

    def queue(self, reply_id: str, event: StreamEvent) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((reply_id, event, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush(), name="stream-writer")
        return future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other replies of this step add theirs
        while self.pending:
            batch, self.pending = self.pending, []
            now = time.monotonic()
            error = await self._write(batch, now)
            if error is not None:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for reply_id, event, future in batch:
                self.state.remember(reply_id, event, now)
                if not future.done():
                    future.set_result(None)
            for reply_id in {reply_id: None for reply_id, _, _ in batch}:
                self.state.wake("new", reply_id)

    async def _write(self, batch, now: float) -> Exception | None:
        """One pipelined round trip for the batch; retried for a while when
        the connection fails, so a Redis restart pauses the replies instead
        of failing them (their text is in the turn's memory meanwhile). A
        retry after a round trip that did land finds its events there: an
        XADD refused because its id is already in the log counts as done."""
        for delay_s in (*settings.STREAM_REDIS_RETRY_DELAYS_S, None):
            try:
                results = await self._pipeline(batch, now).execute(raise_on_error=False)
            except runtime.REDIS_ERRORS as exc:
                if delay_s is None:
                    return exc
                log.warning("stream writer: Redis unreachable; retrying in %s s", delay_s)
                await asyncio.sleep(delay_s)
                continue
            errors = [r for r in results if isinstance(r, Exception) and not _already_in_log(r)]
            return errors[0] if errors else None
        return None  # unreachable: the last delay is None

    def _pipeline(self, batch, now: float):
        ttl = settings.STREAM_LOG_TTL_S
        pipe = client().pipeline(transaction=False)
        grew: dict[str, None] = {}
        for reply_id, event, _ in batch:
            pipe.xadd(log_key(reply_id), {"e": event.event, "d": json.dumps(event.data)}, id=f"{event.seq}-0")
            grew[reply_id] = None
            local = self.state.logs.get(reply_id)
            # The TTL is set with the first event, renewed well before it
            # runs out, and restarted by the terminal event.
            if local is None or event.terminal or now - local.ttl_set_at > ttl / 4:
                pipe.expire(log_key(reply_id), ttl)
                if local is not None:
                    local.ttl_set_at = now
        pipe.publish(new_channel(), " ".join([ORIGIN, *grew]))
        return pipe


def _already_in_log(error: Exception) -> bool:
    return isinstance(error, redis.exceptions.ResponseError) and "equal or smaller" in str(error)


# ------------------------------------------------------------ per event loop

class _LoopState:
    """What one event loop (one Daphne process) knows about live replies:
    the logs it writes, the local waiters to wake, its readers."""

    def __init__(self):
        self.writer = _Writer(self)
        self.logs: dict[str, _LocalLog] = {}
        self.waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self.readers: defaultdict[str, int] = defaultdict(int)
        self.fanout: Fanout | None = None
        self.beats: dict[tuple[str, str], float] = {}
        self.beat_flusher: asyncio.Task | None = None

    def remember(self, reply_id: str, event: StreamEvent, now: float) -> None:
        local = self.logs.get(reply_id)
        if local is None:
            # A reply whose task died before its terminal event would stay
            # here for good: drop what Redis itself has expired by now.
            stale = now - settings.STREAM_LOG_TTL_S
            for old_id in [k for k, log_ in self.logs.items() if log_.touched_at < stale]:
                del self.logs[old_id]
            local = self.logs[reply_id] = _LocalLog(ttl_set_at=now)
        local.touched_at = now
        if local.seqs and event.seq <= local.seqs[-1]:
            return  # Redis refused nothing, so this cannot happen; never unsort the log
        local.events.append(event)
        local.seqs.append(event.seq)
        if event.terminal:
            asyncio.get_running_loop().call_later(LOCAL_KEEP_S, self.logs.pop, reply_id, None)

    def wake(self, kind: str, reply_id: str) -> None:
        for event in list(self.waiters.get((kind, reply_id), ())):
            event.set()


def _state() -> _LoopState:
    return runtime.loop_local("reply-streams", _LoopState)


def drop_local(reply_id) -> None:
    """Forget this process's copy of a reply's events: readers go to Redis."""
    _state().logs.pop(str(reply_id), None)


# ------------------------------------------------------------ reading

async def log_exists(reply_id) -> bool:
    if str(reply_id) in _state().logs:
        return True
    return bool(await client().exists(log_key(reply_id)))


async def last_seq(reply_id) -> int:
    entries = await client().xrevrange(log_key(reply_id), count=1)
    return int(entries[0][0].split(b"-", 1)[0]) if entries else 0


async def publish_end(reply_id, stored_seq: int, status: str, content: str, *, error: str = "") -> int:
    """The terminal event of a reply ended outside its task (the reaper):
    after whatever its log holds, the stored text replacing what was
    streamed, so readers still tailing it close with it. Returns its seq."""
    seq = max(await last_seq(reply_id), stored_seq) + 1
    await append(reply_id, terminal_event(seq, status, content, error=error, replace=True))
    return seq


async def read_after(reply_id, after_seq: int, count: int = 1000) -> list[StreamEvent]:
    local = _state().logs.get(str(reply_id))
    if local is not None:
        events = local.after(after_seq)
        if events is not None:
            return events[:count]
    entries = await client().xrange(log_key(reply_id), min=f"({after_seq}-0" if after_seq else "-", count=count)
    return [_decode(entry_id, fields) for entry_id, fields in entries]


async def text_after(reply_id, after_seq: int) -> tuple[str, int]:
    """The text of the token events after `after_seq` and the last seq read,
    stopping at a terminal event: what a reply streamed since its text was
    last stored. Token events hold only text the output moderation window
    released, so it is safe to store."""
    parts, seq = [], after_seq
    while True:
        events = await read_after(reply_id, seq)
        for event in events:
            if event.terminal:
                return "".join(parts), seq
            seq = event.seq
            if event.event == "token":
                parts.append(event.data.get("t", ""))
        if not events:
            return "".join(parts), seq


class Fanout:
    """One pub/sub connection per event loop, shared by every local waiter.

    It subscribes to the two shared channels once. `watch(kind, reply_id)`
    returns an asyncio.Event set whenever a message for that reply arrives
    ("new": its log grew in another process; "ctl": its Stop was requested);
    it returns only once the subscription is confirmed, so a publish after
    `watch` returns is never missed.
    """

    def __init__(self, state: _LoopState):
        self.state = state
        self.redis = runtime.redis_pubsub_connection()
        self.pubsub = self.redis.pubsub()
        self.channels = {new_channel().encode(): "new", control_channel().encode(): "ctl"}
        self.ready: asyncio.Future | None = None
        self.reader: asyncio.Task | None = None

    async def watch(self, kind: str, reply_id) -> asyncio.Event:
        event = asyncio.Event()
        key = (kind, str(reply_id))
        self.state.waiters.setdefault(key, set()).add(event)
        try:
            await self._subscribed()
        except BaseException:
            self.unwatch(kind, reply_id, event)
            raise
        return event

    def unwatch(self, kind: str, reply_id, event: asyncio.Event) -> None:
        key = (kind, str(reply_id))
        waiters = self.state.waiters.get(key)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self.state.waiters[key]

    async def _subscribed(self) -> None:
        if self.ready is None:
            self.ready = asyncio.get_running_loop().create_future()
            try:
                await self.pubsub.subscribe(*self.channels)
            except BaseException:
                self.ready = None
                raise
            self.reader = asyncio.create_task(self._read(), name="stream-fanout")
        async with asyncio.timeout(10):  # not wait_for: on 3.11 it can drop a cancellation
            await asyncio.shield(self.ready)

    async def _read(self) -> None:
        confirmed: set = set()
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Connection lost: waiters fall back to their heartbeat polls
                # until redis-py re-establishes the connection and subscriptions.
                log.warning("stream fan-out lost its connection", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            kind = self.channels.get(message["channel"])
            if message["type"] == "subscribe":
                confirmed.add(kind)
                if len(confirmed) == len(self.channels) and not self.ready.done():
                    self.ready.set_result(True)
            elif message["type"] == "message" and kind is not None:
                words = message["data"].decode().split()
                if kind == "new":
                    if words and words[0] != ORIGIN:  # our own appends woke their readers already
                        for reply_id in words[1:]:
                            self.state.wake("new", reply_id)
                else:
                    for reply_id in words:
                        self.state.wake("ctl", reply_id)


def fanout() -> Fanout:
    state = _state()
    if state.fanout is None:
        state.fanout = Fanout(state)
    return state.fanout


# ------------------------------------------------------------ readers and Stop

def reader_joined(reply_id) -> None:
    """A stream of this process is reading the reply (the watcher of a reply
    generated here needs no Redis round trip to know someone is)."""
    _state().readers[str(reply_id)] += 1


def reader_left(reply_id) -> None:
    readers = _state().readers
    key = str(reply_id)
    readers[key] -= 1
    if readers[key] <= 0:
        del readers[key]


def local_readers(reply_id) -> int:
    return _state().readers.get(str(reply_id), 0)


async def subscriber_touch(reply_id, connection_id: str) -> None:
    """Mark an SSE connection live now (when it opens)."""
    await _touch_all({(str(reply_id), connection_id): time.time()})


def subscriber_heartbeat(reply_id, connection_id: str) -> None:
    """Mark an SSE connection still live. Heartbeats of all the streams of
    this process go to Redis together, at most twice a second: 500 idle
    streams beating every 10 s would otherwise be 50 round trips (and loop
    wake-ups beside the engine) a second; half a second late is nothing
    against a freshness window of three beats."""
    state = _state()
    state.beats[(str(reply_id), connection_id)] = time.time()
    if state.beat_flusher is None or state.beat_flusher.done():
        state.beat_flusher = asyncio.create_task(_flush_beats(state), name="stream-heartbeats")


async def _flush_beats(state: "_LoopState") -> None:
    await asyncio.sleep(0.5)
    beats, state.beats = state.beats, {}
    try:
        # Only connections still in the set: one that left while its last
        # beat waited here must not come back to life.
        await _touch_all(beats, only_existing=True)
    except Exception:
        log.warning("could not record %d stream heartbeats", len(beats), exc_info=True)


async def _touch_all(beats: dict, only_existing: bool = False) -> None:
    by_reply: dict[str, dict] = {}
    for (reply_id, connection_id), at in beats.items():
        by_reply.setdefault(reply_id, {})[connection_id] = at
    async with client().pipeline(transaction=False) as pipe:
        for reply_id, members in by_reply.items():
            pipe.zadd(subs_key(reply_id), members, xx=only_existing)
            pipe.expire(subs_key(reply_id), settings.STREAM_LOG_TTL_S)
        await pipe.execute()


async def subscriber_leave(reply_id, connection_id: str) -> None:
    _state().beats.pop((str(reply_id), connection_id), None)
    await client().zrem(subs_key(reply_id), connection_id)


async def live_subscribers(reply_id) -> int:
    # A connection refreshes its score every heartbeat; three missed beats
    # (a web process that died without saying goodbye) and it no longer counts.
    fresh_after = time.time() - 3 * settings.STREAM_HEARTBEAT_S - 1
    return await client().zcount(subs_key(reply_id), fresh_after, "+inf")


async def request_stop(reply_id) -> None:
    conn = client()
    # The key first: a watcher that wakes (or polls) must find it set.
    await conn.set(stop_key(reply_id), "1", ex=settings.STREAM_LOG_TTL_S)
    await conn.publish(control_channel(), str(reply_id))


async def stop_requested(reply_id) -> bool:
    return bool(await client().exists(stop_key(reply_id)))
