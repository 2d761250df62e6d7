"""The event log of a live reply, in Redis, shared by every Daphne process.

Each reply has a Redis Stream whose entry ids are `<seq>-0`, so an SSE
`id:` is the stream id and replaying "everything after Last-Event-ID" is a
plain XRANGE/XREAD from `<seq>-0`. The generating task is the only writer
(except the stop fallback for a reply whose process died). Alongside it:

- `…:subs`  a sorted set of live SSE connections scored by their last
  heartbeat, so a crashed web process stops counting after a while;
- `…:new`   a pub/sub channel poked after each append, so a stream that is
  waiting re-reads the log at once;
- `…:ctl`   a pub/sub channel on which Stop reaches the generating task
  wherever it runs; `…:stop` records the request for a task that has not
  subscribed yet.

Waiting costs no Redis connection per stream: each process has one pub/sub
connection (the Fanout) that wakes its local waiters, and commands share a
bounded pool, so 500 idle streams hold 500 sockets to browsers and one to
Redis.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from django.conf import settings

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"done", "error"})

_clients: dict = {}  # event loop -> client


def client() -> aioredis.Redis:
    """One connection pool per event loop (a pool cannot cross loops)."""
    loop = asyncio.get_running_loop()
    conn = _clients.get(loop)
    if conn is None:
        # A blocking pool: a burst of streams queues for a connection
        # instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=settings.STREAM_REDIS_CONNECTIONS, timeout=30,
            socket_connect_timeout=5, socket_timeout=30,
        )
        conn = aioredis.Redis(connection_pool=pool)
        # Keyed by the loop object itself (not its id, which a new loop may reuse);
        # closed loops are dropped so tests do not accumulate them.
        for old in [lp for lp in _clients if lp.is_closed()]:
            del _clients[old]
        _clients[loop] = conn
    return conn


def _key(reply_id, suffix: str) -> str:
    return f"{settings.CACHES['default'].get('KEY_PREFIX', 'chatapp')}:reply:{reply_id}:{suffix}"


def log_key(reply_id) -> str:
    return _key(reply_id, "log")


def subs_key(reply_id) -> str:
    return _key(reply_id, "subs")


def notify_channel(reply_id) -> str:
    return _key(reply_id, "new")


def control_channel(reply_id) -> str:
    return _key(reply_id, "ctl")


def stop_key(reply_id) -> str:
    return _key(reply_id, "stop")


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


def _decode(entry_id: bytes, fields: dict) -> StreamEvent:
    seq = int(entry_id.split(b"-", 1)[0])
    return StreamEvent(seq=seq, event=fields[b"e"].decode(), data=json.loads(fields[b"d"]))


async def append(reply_id, event: StreamEvent) -> None:
    """Add an event to a reply's log and poke its readers. Returns once it is
    in Redis. Appends made by all replies of this process in the same loop
    iteration share one pipelined round trip (32 replies decoding together
    produce 32 events per engine step)."""
    await _writer().append(reply_id, event)


class _Writer:
    def __init__(self):
        self.pending: list = []
        self.flusher: asyncio.Task | None = None

    async def append(self, reply_id, event: StreamEvent) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((reply_id, event, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush(), name="stream-writer")
        await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other replies of this step add theirs
        while self.pending:
            batch, self.pending = self.pending, []
            newest: dict = {}
            async with client().pipeline(transaction=False) as pipe:
                for reply_id, event, _ in batch:
                    pipe.xadd(log_key(reply_id), {"e": event.event, "d": json.dumps(event.data)}, id=f"{event.seq}-0")
                    newest[reply_id] = event.seq
                for reply_id, seq in newest.items():
                    pipe.expire(log_key(reply_id), settings.STREAM_LOG_TTL_S)
                    pipe.publish(notify_channel(reply_id), seq)
                try:
                    await pipe.execute()
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
            for _, _, future in batch:
                if not future.done():
                    future.set_result(None)


_writers: dict = {}  # event loop -> _Writer


def _writer() -> _Writer:
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        for old in [lp for lp in _writers if lp.is_closed()]:
            del _writers[old]
        writer = _writers[loop] = _Writer()
    return writer


async def log_exists(reply_id) -> bool:
    return bool(await client().exists(log_key(reply_id)))


async def last_seq(reply_id) -> int:
    entries = await client().xrevrange(log_key(reply_id), count=1)
    return int(entries[0][0].split(b"-", 1)[0]) if entries else 0


async def read_after(reply_id, after_seq: int, count: int = 1000) -> list[StreamEvent]:
    entries = await client().xrange(log_key(reply_id), min=f"({after_seq}-0" if after_seq else "-", count=count)
    return [_decode(entry_id, fields) for entry_id, fields in entries]


class Fanout:
    """One pub/sub connection per event loop, shared by every local waiter.

    `watch(channel)` returns an asyncio.Event set whenever a message arrives
    on the channel; it returns only once Redis confirmed the subscription, so
    a publish after `watch` returns is never missed.
    """

    def __init__(self):
        self.redis = aioredis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=None)
        self.pubsub = self.redis.pubsub()
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.confirmed: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def watch(self, channel: str) -> asyncio.Event:
        event = asyncio.Event()
        waiters = self.waiters.setdefault(channel, set())
        waiters.add(event)
        if channel not in self.confirmed:
            self.confirmed[channel] = asyncio.get_running_loop().create_future()
            await self.pubsub.subscribe(channel)
            if self.reader is None or self.reader.done():
                self.reader = asyncio.create_task(self._read(), name="stream-fanout")
        try:
            await asyncio.wait_for(asyncio.shield(self.confirmed[channel]), 10)
        except BaseException:
            await self.unwatch(channel, event)
            raise
        return event

    async def unwatch(self, channel: str, event: asyncio.Event) -> None:
        waiters = self.waiters.get(channel)
        if waiters is None:
            return
        waiters.discard(event)
        if not waiters:
            del self.waiters[channel]
            self.confirmed.pop(channel, None)
            try:
                await self.pubsub.unsubscribe(channel)
            except Exception:
                log.warning("unsubscribing %s", channel, exc_info=True)

    async def _read(self) -> None:
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Connection lost: waiters fall back to their heartbeat polls
                # until the connection and subscriptions are re-established.
                log.warning("stream fan-out lost its connection", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if message["type"] == "subscribe":
                future = self.confirmed.get(channel)
                if future is not None and not future.done():
                    future.set_result(True)
            elif message["type"] == "message":
                for event in list(self.waiters.get(channel, ())):
                    event.set()


_fanouts: dict = {}  # event loop -> Fanout


def fanout() -> Fanout:
    loop = asyncio.get_running_loop()
    instance = _fanouts.get(loop)
    if instance is None:
        for old in [lp for lp in _fanouts if lp.is_closed()]:
            del _fanouts[old]
        instance = _fanouts[loop] = Fanout()
    return instance


async def subscriber_touch(reply_id, connection_id: str) -> None:
    conn = client()
    async with conn.pipeline(transaction=False) as pipe:
        pipe.zadd(subs_key(reply_id), {connection_id: time.time()})
        pipe.expire(subs_key(reply_id), settings.STREAM_LOG_TTL_S)
        await pipe.execute()


async def subscriber_leave(reply_id, connection_id: str) -> None:
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
    await conn.publish(control_channel(reply_id), "stop")


async def stop_requested(reply_id) -> bool:
    return bool(await client().exists(stop_key(reply_id)))
