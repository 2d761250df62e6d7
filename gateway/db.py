"""The gateway's database work runs on its own small thread pool.

Django's async ORM hops to asgiref's single shared thread, which also renders
every sync view under ASGI: the ledger write of each reply would queue behind
page loads and the other way round. These threads keep their own connections
(outside the request pool: `chatapp.db.own_connection`) open between jobs; a
connection found dead is dropped and the job retried once.

Their sessions commit without waiting for the WAL flush (synchronous_commit
off). Everything the gateway writes is a record or disposable (ledger rows,
cache entries, a key's last use): a database crash may lose the last fraction
of a second of them, never corrupt anything, and a reply no longer waits on
an fsync. Quota enforcement itself lives in Redis.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

from django.db import InterfaceError, OperationalError, connection, connections

from chatapp.db import own_connection

WORKERS = 2
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_local = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gateway-db",
                                           initializer=own_connection)
        return _executor


def _unsynced_session() -> None:
    connection.ensure_connection()
    if connection.vendor == "postgresql" and getattr(_local, "configured", None) is not connection.connection:
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")
        _local.configured = connection.connection


def _call(fn, *args, **kwargs):
    try:
        _unsynced_session()
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError):
        # A connection that died while idle (database restart): reconnect once.
        connections.close_all()
        _unsynced_session()
        return fn(*args, **kwargs)


async def run(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(_call, fn, *args, **kwargs))


def run_sync(fn, *args, **kwargs):
    """From sync code that may be on an event loop's thread (where the ORM refuses to run)."""
    return _pool().submit(_call, fn, *args, **kwargs).result()


def close_connections() -> None:
    """Close every pool thread's connection (tests, shutdown): one job per
    thread, held at a barrier so that each thread runs exactly one."""
    if _executor is None:
        return
    barrier = threading.Barrier(WORKERS)

    def close():
        if connection.connection is not None and getattr(_local, "configured", None) is connection.connection:
            # Back in the pool it may serve a page: give it the default durability
            # again. One that cannot even RESET is broken, and the pool discards it.
            with contextlib.suppress(Exception), connection.cursor() as cursor:
                cursor.execute("RESET synchronous_commit")
        _local.configured = None
        connections.close_all()
        barrier.wait(timeout=10)

    for future in [_executor.submit(close) for _ in range(WORKERS)]:
        future.result()

