"""The event log of a live reply, in Redis, shared by every Daphne process.

Each reply has a Redis Stream whose entry ids are `<seq>-0`, so an SSE
`id:` is the stream id and replaying "everything after Last-Event-ID" is a
plain XRANGE/XREAD from `<seq>-0`. The generating task is the only writer
(except the stop fallback for a reply whose process died). Alongside it:

- `…:subs`  a sorted set of live SSE connections scored by their last
  heartbeat, so a crashed web process stops counting after a while;
- `…:ctl`   a pub/sub channel on which Stop reaches the generating task
  wherever it runs; `…:stop` records the request for a task that has not
  subscribed yet.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from django.conf import settings

TERMINAL_EVENTS = frozenset({"done", "error"})

_clients: dict = {}  # event loop -> client


def client() -> aioredis.Redis:
    """One connection pool per event loop (a pool cannot cross loops)."""
    import asyncio

    loop = asyncio.get_running_loop()
    conn = _clients.get(loop)
    if conn is None:
        conn = aioredis.from_url(settings.REDIS_URL)
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
    conn = client()
    async with conn.pipeline(transaction=False) as pipe:
        pipe.xadd(log_key(reply_id), {"e": event.event, "d": json.dumps(event.data)}, id=f"{event.seq}-0")
        pipe.expire(log_key(reply_id), settings.STREAM_LOG_TTL_S)
        await pipe.execute()


async def log_exists(reply_id) -> bool:
    return bool(await client().exists(log_key(reply_id)))


async def last_seq(reply_id) -> int:
    entries = await client().xrevrange(log_key(reply_id), count=1)
    return int(entries[0][0].split(b"-", 1)[0]) if entries else 0


async def read_after(reply_id, after_seq: int) -> list[StreamEvent]:
    entries = await client().xrange(log_key(reply_id), min=f"({after_seq}-0" if after_seq else "-")
    return [_decode(entry_id, fields) for entry_id, fields in entries]


async def wait_after(reply_id, after_seq: int, timeout_s: float) -> list[StreamEvent]:
    """Events after `after_seq`, blocking up to timeout_s for the first one."""
    result = await client().xread(
        {log_key(reply_id): f"{after_seq}-0"}, block=max(1, int(timeout_s * 1000)), count=500
    )
    if not result:
        return []
    return [_decode(entry_id, fields) for entry_id, fields in result[0][1]]


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
    await conn.set(stop_key(reply_id), "1", ex=settings.STREAM_LOG_TTL_S)
    await conn.publish(control_channel(reply_id), "stop")


async def stop_requested(reply_id) -> bool:
    return bool(await client().exists(stop_key(reply_id)))
