"""Redis clients for the gateway's quota counters and exact cache.

redis.asyncio connections belong to the event loop that opened them, and the
gateway runs under several loops (Daphne's, one per test, async_to_sync's), so
clients are kept per loop. Short timeouts: a dead Redis must turn into a quick
503, never a hung request.
"""
from __future__ import annotations

import asyncio
import weakref

import redis
import redis.asyncio as aredis
from django.conf import settings

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

_per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def async_client() -> aredis.Redis:
    loop = asyncio.get_running_loop()
    clients = _per_loop.setdefault(loop, {})
    url = settings.REDIS_URL
    client = clients.get(url)
    if client is None:
        client = aredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        clients[url] = client
    return client


def sync_client() -> redis.Redis:
    return redis.from_url(settings.REDIS_URL, socket_connect_timeout=1.0, socket_timeout=2.0)
