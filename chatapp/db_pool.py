"""The request pool's check of a connection it lends (psycopg_pool's `check`).

psycopg_pool's own check (`ConnectionPool.check_connection`, what Django
passes with CONN_HEALTH_CHECKS) sends an empty query on every loan: one
round trip before any page's first query. On a quiet box that is tens of
microseconds; beside a busy engine on two cores each round trip waits for
Postgres and then for this thread to get a core back, and a new chat's
middleware (the pool's check, then the user's row) took about 7 ms between
the session and the user (bench.stages, 2026-12-06).

A connection the server ended is never silent: a restart or
`pg_terminate_backend` sends an error message and closes the socket, and
the kernel keeps both for us, so the socket of a dead idle connection reads
as ready. A pooled connection is idle (autocommit, nothing in flight), and
nothing reads it between loans, so it has nothing to read while it is
healthy. This check looks at the socket without waiting, and only when
something is there does it run psycopg_pool's round trip, which reads it
and tells a dead connection (discarded) from a harmless message (kept).
What this cannot see, a peer gone silent on a network, the round trip could
not see in time either.
"""
from __future__ import annotations

import select

from psycopg_pool import ConnectionPool


def check_lent_connection(conn) -> None:
    """Return quietly when `conn` may be lent; raise when it is dead."""
    if conn.closed or conn.broken:
        raise ConnectionError("the connection is closed")
    if _has_input(conn.fileno()):
        ConnectionPool.check_connection(conn)


def _has_input(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    # POLLHUP and POLLERR are reported whether asked for or not.
    return bool(poller.poll(0))
