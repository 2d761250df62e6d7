"""The chat's and the gateway's worker threads never wait on the request pool."""
import asyncio
import time

import pytest

from chatapp import runtime
from psycopg_pool import PoolTimeout
from django.db import connection



def _backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_worker_threads_work_while_requests_hold_every_pooled_connection(settings):
    """A burst of requests bigger than the pool holds every pooled connection
    while awaiting the workers; workers that borrowed from the same pool would
    wait for one until DB_POOL_TIMEOUT_S (a deadlock for the whole burst)."""
    pool = connection.pool
    assert pool is not None
    # Fresh threads, started while the pool is empty.
    runtime.close_db_threads()
    pool.open()
    _backend_pid()  # the test's own thread holds one, as a request would
    held = []
    try:
        # Take every other connection the pool will give. One an earlier test
        # gave back may still be on its way into the pool (its reset runs on
        # the pool's own worker): wait for it on a busy box.
        deadline = time.monotonic() + 30
        while len(held) < pool.max_size - 1:
            try:
                held.append(pool.getconn(timeout=0.5))
            except PoolTimeout:
                if time.monotonic() > deadline:
                    break
        stats = pool.get_stats()
        # Fewer means another thread kept a pooled connection: a test that ran
        # the ORM on a thread of its own, or one tests/conftest.py's
        # _sync_thread_connection_back does not reach.
        assert len(held) == pool.max_size - 1 and stats["pool_available"] == 0, (len(held), stats)

        async def both():
            return await asyncio.wait_for(
                asyncio.gather(runtime.on_db_thread(_backend_pid)(), runtime.on_db_thread(_backend_pid, runtime.LEDGER_DB)()), timeout=10)

        chat_pid, gateway_pid = asyncio.run(both())
        held_pids = {conn.info.backend_pid for conn in held}
        assert chat_pid not in held_pids and gateway_pid not in held_pids

        # Kept between jobs: each thread's backend serves its next ones.
        async def many():
            return await asyncio.wait_for(asyncio.gather(*(runtime.on_db_thread(_backend_pid)() for _ in range(24))), 10)

        pids = set(asyncio.run(many()))
        assert len(pids) <= settings.CHAT_DB_THREADS
        assert not pids & held_pids
    finally:
        for conn in held:
            pool.putconn(conn)
        runtime.close_db_threads()
