"""redis-py's asyncio connections, made to deliver every cancellation.

redis-py bounds each write with `asyncio.wait_for(..., socket_timeout)`. On
Python 3.11 `wait_for` returns the result instead of raising when a
cancellation lands in the loop iteration where the write completes (CPython
gh-86296, fixed in 3.12 by rebuilding `wait_for` on `asyncio.timeout`). A
write completes at once, so the window is hit often: in a loop of
cancel-mid-command, redis-py 8.1 on 3.11.7 dropped 759 of 824 accepted
cancellations. A dropped cancellation is a Stop that does not stop, an SSE
stream that outlives its client, and a keeper task that never ends (the
event loop then cannot close).

Here the write is wrapped: a cancellation requested while it ran and not
raised is raised after it, with the connection closed first, since its
reply was never read and would be served to the next command. No Django:
settings use it for the channel layer.
"""
from __future__ import annotations

import asyncio

import redis.asyncio as aredis
from redis.asyncio.connection import parse_url


class _DeliversCancellation:
    async def send_packed_command(self, command, check_health: bool = True) -> None:
        task = asyncio.current_task()
        requested = task.cancelling() if task is not None else 0
        await super().send_packed_command(command, check_health)
        if task is not None and task.cancelling() > requested:
            await self.disconnect(nowait=True)
            raise asyncio.CancelledError


class Connection(_DeliversCancellation, aredis.Connection):
    """TCP (redis://)."""


class UnixDomainSocketConnection(_DeliversCancellation, aredis.UnixDomainSocketConnection):
    """A unix socket (unix://): the embedded Redis."""


class SSLConnection(_DeliversCancellation, aredis.SSLConnection):
    """TLS (rediss://)."""


_CLASSES = {aredis.Connection: Connection, aredis.UnixDomainSocketConnection: UnixDomainSocketConnection,
            aredis.SSLConnection: SSLConnection}


def pool_options(url: str, **options) -> dict:
    """`ConnectionPool(**pool_options(url, ...))`: `url` parsed as redis-py's
    `from_url` does, with these connections. (`from_url` itself cannot take
    them: the class its URL implies, unix or TLS, overrides an argument.)"""
    parsed = {**options, **parse_url(url)}
    base = parsed.get("connection_class", aredis.Connection)
    parsed["connection_class"] = _CLASSES.get(base, base)
    return parsed
